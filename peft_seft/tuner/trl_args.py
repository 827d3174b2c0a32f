"""SEFT options for TRL's script flow: :class:`SEFTArguments` is a dataclass ``TrlParser``/``HfArgumentParser``
accept (plain or ``Optional`` field types only; ``SEFTConfig`` itself has union-typed fields they refuse), and
:func:`get_seft_config` turns it into a ``SEFTConfig``, as TRL's ``get_peft_config`` does for LoRA. See
``examples/sft_seft.py``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import SEFTConfig


@dataclass
class SEFTArguments:
    """SEFT adapter and publishing options for a TRL training script (all prefixed ``seft_``)."""

    seft_density: float = field(
        default=0.01, metadata={"help": "Fraction of each target weight that is trainable (values per layer)."}
    )
    seft_num_trainable: int | None = field(
        default=None, metadata={"help": "Total trainable values over all target layers; overrides seft_density."}
    )
    seft_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names or suffixes to adapt, or 'all-linear' (default: every linear projection inside "
            "the transformer blocks)."
        },
    )
    seft_exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names or suffixes never to adapt."}
    )
    seft_update_interval: int = field(default=20, metadata={"help": "Optimizer steps between evolution rounds."})
    seft_selection_steps: int = field(
        default=5, metadata={"help": "Steps before each round whose gradients choose growth and pruning."}
    )
    seft_initial_drop_rate: float = field(
        default=0.2, metadata={"help": "Fraction of positions replaced in the first round; 0 turns evolution off."}
    )
    seft_drop_schedule: str = field(default="cosine", metadata={"help": "Drop rate decay: 'cosine' or 'linear'."})
    seft_full_reselection_first: bool = field(
        default=False, metadata={"help": "The first round re-selects all positions (SpIEL)."}
    )
    seft_grow_pruned: bool = field(
        default=True, metadata={"help": "Allow growth into pruned positions (re-activation)."}
    )
    seft_prune_criterion: str = field(
        default="sensitivity",
        metadata={"help": "Which frozen weights pay for re-activated ones: 'sensitivity', 'magnitude' or 'wanda'."},
    )
    seft_grown_optimizer_state: str = field(
        default="zero",
        metadata={"help": "Optimizer state of grown entries: 'zero', 'warmup' or 'seed' (Adam moments, window)."},
    )
    seft_total_steps: int | None = field(
        default=None, metadata={"help": "Step at which evolution stops (default: the Trainer's max steps)."}
    )
    seft_pattern: str | None = field(
        default=None, metadata={"help": "N:M pattern of the base to keep, e.g. '2:4' (default: unstructured)."}
    )
    seft_random_seed: int | None = field(
        default=None, metadata={"help": "Seed for the initial positions (default: torch's global generator)."}
    )
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
    target = args.seft_target_modules
    return SEFTConfig(
        task_type=task_type,
        density=args.seft_density,
        num_trainable=args.seft_num_trainable,
        target_modules=target[0] if target == ["all-linear"] else target,
        exclude_modules=args.seft_exclude_modules,
        update_interval=args.seft_update_interval,
        selection_steps=args.seft_selection_steps,
        initial_drop_rate=args.seft_initial_drop_rate,
        drop_schedule=args.seft_drop_schedule,
        full_reselection_first=args.seft_full_reselection_first,
        grow_pruned=args.seft_grow_pruned,
        prune_criterion=args.seft_prune_criterion,
        grown_optimizer_state=args.seft_grown_optimizer_state,
        total_steps=args.seft_total_steps,
        pattern=args.seft_pattern,
        random_seed=args.seft_random_seed,
    )
