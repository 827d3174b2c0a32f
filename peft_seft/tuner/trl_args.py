"""SEFT options for TRL's script flow: :class:`SEFTArguments` is a dataclass ``TrlParser``/``HfArgumentParser``
accept (plain, ``Optional`` or ``Literal`` field types only; ``SEFTConfig`` itself has union-typed fields they
refuse), and :func:`get_seft_config` turns it into a ``SEFTConfig``, as TRL's ``get_peft_config`` does for LoRA. Each
``seft_<name>`` option takes its default and help from the ``SEFTConfig`` field ``<name>``. See
``examples/sft_seft.py``."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

from .config import SEFTConfig

_CONFIG_FIELDS = {config_field.name: config_field for config_field in fields(SEFTConfig)}


def _mirror(name: str, help: str | None = None) -> Any:
    """A field for ``seft_<name>`` with the default and help of ``SEFTConfig.<name>`` (``help`` replaces the
    latter where the command line reads differently)."""
    config_field = _CONFIG_FIELDS[name]
    if config_field.default is MISSING:
        raise TypeError(f"SEFTConfig.{name} has no plain default to mirror")
    return field(default=config_field.default, metadata={"help": help or config_field.metadata["help"]})


@dataclass
class SEFTArguments:
    """SEFT adapter and publishing options for a TRL training script (all prefixed ``seft_``)."""

    seft_density: float = _mirror("density")
    seft_num_trainable: int | None = _mirror("num_trainable")
    seft_target_modules: list[str] | None = _mirror(
        "target_modules",
        help="Module names or suffixes to adapt, or 'all-linear' (default: every linear projection inside the "
        "transformer blocks).",
    )
    seft_exclude_modules: list[str] | None = _mirror("exclude_modules", help="Module names or suffixes never to adapt.")
    seft_update_interval: int = _mirror("update_interval")
    seft_selection_steps: int = _mirror("selection_steps")
    seft_initial_drop_rate: float = _mirror("initial_drop_rate")
    seft_drop_schedule: Literal["cosine", "linear"] = _mirror("drop_schedule")
    seft_drop_criterion: Literal["magnitude", "gradient"] = _mirror("drop_criterion")
    seft_full_reselection_first: bool = _mirror("full_reselection_first")
    seft_grow_pruned: bool | None = _mirror("grow_pruned")
    seft_prune_criterion: Literal["sensitivity", "magnitude", "wanda"] = _mirror("prune_criterion")
    seft_growth_statistic: Literal["abs_sum", "mean_abs", "consistent"] = _mirror("growth_statistic")
    seft_growth_normalization: Literal["none", "input", "input_output"] = _mirror("growth_normalization")
    seft_sensitivity_statistic: Literal["abs_sum", "mean_abs", "rms"] = _mirror("sensitivity_statistic")
    seft_candidate_factor: float = _mirror("candidate_factor")
    seft_grown_optimizer_state: Literal["zero", "warmup", "seed"] = _mirror("grown_optimizer_state")
    seft_total_steps: int | None = _mirror("total_steps")
    seft_pattern: str | None = _mirror("pattern")
    seft_random_seed: int | None = _mirror("random_seed")
    seft_base_repo: str | None = field(
        default=None,
        metadata={
            "help": "With --push_to_hub and a local pruned model: publish the pruned model to this Hub repo first, "
            "and name it as the adapter's base_model."
        },
    )
    seft_merged_repo: str | None = field(
        default=None, metadata={"help": "With --push_to_hub: also publish the merged sparse model to this Hub repo."}
    )


def get_seft_config(args: SEFTArguments, task_type: str = "CAUSAL_LM") -> SEFTConfig:
    """The ``SEFTConfig`` the arguments describe."""
    options = {
        name: getattr(args, argument.name)
        for argument in fields(args)
        if (name := argument.name.removeprefix("seft_")) in _CONFIG_FIELDS
    }
    if options["target_modules"] == ["all-linear"]:
        options["target_modules"] = "all-linear"
    return SEFTConfig(task_type=task_type, **options)
