"""Model cards and Hub upload for SEFT adapters.

``PeftModel.save_pretrained`` writes PEFT's generic card, and ``push_to_hub`` (transformers' mixin) or
``trainer.push_to_hub()`` replace it with a ``library_name: transformers`` or TRL card. :func:`write_model_card`
writes a SEFT card instead (``library_name: peft``, ``base_model``, tags ``peft``/``seft``/``sparse``, the base's
sparsity, the SEFT and evolution settings, and what evolution did), and :func:`upload_adapter` saves the adapter
with that card into a temporary folder and uploads the folder as it is, so nothing can replace the card.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from .layer import SEFTLayer

logger = logging.getLogger(__name__)

SEFT_TAGS = ("peft", "seft", "sparse")
EVOLUTION_SETTINGS = (
    "update_interval",
    "selection_steps",
    "initial_drop_rate",
    "drop_schedule",
    "full_reselection_first",
    "grow_pruned",
    "prune_criterion",
    "seed_optimizer_state",
    "total_steps",
)
PAPER = "https://arxiv.org/abs/2505.24037"


def _layers(peft_model: Any, adapter_name: str) -> list[SEFTLayer]:
    return [m for m in peft_model.modules() if isinstance(m, SEFTLayer) and adapter_name in m.seft_fingerprint]


def base_sparsity(peft_model: Any, adapter_name: str = "default") -> dict[str, Any]:
    """Non-zeros and weights of the base in the adapter's target layers (from the fingerprints saved with it)."""
    nonzeros = numel = trainable = 0
    layers = _layers(peft_model, adapter_name)
    for layer in layers:
        out_features, in_features, count = (int(v) for v in layer.seft_fingerprint[adapter_name][:3])
        nonzeros, numel = nonzeros + count, numel + out_features * in_features
        trainable += layer.seft_values[adapter_name].numel()
    sparsity = 1 - nonzeros / numel if numel else 0.0
    return {"layers": len(layers), "nonzeros": nonzeros, "numel": numel, "sparsity": sparsity, "trainable": trainable}


def evolution_summary(peft_model: Any, adapter_name: str = "default") -> str | None:
    """One paragraph on the evolution rounds run in this session (``None`` when there were none)."""
    evolution = getattr(getattr(peft_model, "base_model", None), "evolution", None)
    reports = [r for r in getattr(evolution, "reports", []) if r.adapter == adapter_name]
    if not reports:
        return None
    totals = reports[0].counts
    for report in reports[1:]:
        totals = totals + report.counts
    kept = all(r.active == r.budget for r in reports)
    return (
        f"{len(reports)} evolution rounds (optimizer steps {reports[0].step} to {reports[-1].step}, drop rate "
        f"{reports[0].drop_rate:.3f} to {reports[-1].drop_rate:.3f}) dropped {totals.dropped:,} and grew "
        f"{totals.grown:,} trainable positions, re-activated {totals.reactivated:,} pruned weights, re-pruned "
        f"{totals.repruned:,} frozen weights to pay for them and restored {totals.restored:,}. "
        + (
            "After every round the number of structurally active weights equalled the base's non-zero count "
            f"({reports[-1].budget:,})."
            if kept
            else "Warning: some rounds ended with a different active count than the base's non-zero count."
        )
    )


def _cell(value: Any) -> str:
    """A markdown table cell: pipes (e.g. in a target_modules regex) escaped."""
    return str(value).replace("|", "\\|")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).exists()


def model_card_text(
    peft_model: Any,
    adapter_name: str = "default",
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The README.md of a SEFT adapter: YAML front matter and a description of the adapter."""
    import peft
    import transformers
    from huggingface_hub import ModelCardData

    config = peft_model.peft_config[adapter_name]
    weights = config.base_model_name_or_path or "unknown"
    base = base_model or weights
    stats = base_sparsity(peft_model, adapter_name)
    tags = [*SEFT_TAGS, "transformers", f"base_model:adapter:{base}"]
    pipeline = (
        "text-generation" if str(getattr(config, "task_type", "")) in ("CAUSAL_LM", "TaskType.CAUSAL_LM") else None
    )
    data = ModelCardData(library_name="peft", base_model=base, tags=tags, pipeline_tag=pipeline)
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules or [])
    settings = {
        "density": config.density,
        "num_trainable": config.num_trainable,
        "trainable values": f"{stats['trainable']:,}",
        "target_modules": targets,
        **{name: getattr(config, name) for name in EVOLUTION_SETTINGS},
        "pattern": config.pattern or "unstructured",
    }
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# SEFT adapter for {base}",
        "",
        f"A sparse fine-tuning adapter trained with [SEFT (Sparsity Evolution Fine-Tuning)]({PAPER}) using "
        "`peft-seft`. It trains a small set of weight values whose positions evolve during training: pruned "
        "weights may be re-activated, and other weights are pruned to pay for them, so merging it keeps the "
        "sparsity of the base model exactly (every target layer keeps its number of non-zeros).",
        "",
        "## Base model sparsity",
        "",
        f"- base model: `{base}`" + (f", pruned: `{weights}`" if weights != base else ""),
        f"- sparsity of the {stats['layers']} target layers: {stats['sparsity']:.2%} "
        f"({stats['nonzeros']:,} non-zeros of {stats['numel']:,} weights)",
        "",
        "The adapter loads only onto the exact (pruned) weights it was trained on: every layer's shape, non-zero "
        "count and checksums are saved with it and checked on loading.",
        "",
        "## SEFT settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {name} | {_cell(value)} |" for name, value in settings.items()),
        "",
        "## Evolution summary",
        "",
        evolution_summary(peft_model, adapter_name)
        or "No evolution rounds were recorded when this card was written (for example, the adapter was loaded "
        "rather than trained in this session, or evolution was switched off).",
        "",
    ]
    if extra:
        lines += ["## Training details", "", *(f"- {name}: {value}" for name, value in extra.items()), ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "import peft_seft  # registers SEFT with PEFT",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{weights}")  # the pruned model the adapter was trained on',
        'model = PeftModel.from_pretrained(base, "path/or/repo-of-this-adapter")',
        "merged = model.merge_and_unload()  # a plain sparse transformers model, as sparse as the base",
        "```",
        "",
        "### Framework versions",
        "",
        f"- PEFT {peft.__version__}",
        f"- peft-seft {_dist_version()}",
        f"- Transformers {transformers.__version__}",
        "",
    ]
    return "\n".join(lines)


def _dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-seft")
    except PackageNotFoundError:
        return "unknown"


def write_model_card(
    peft_model: Any,
    directory: str | Path,
    adapter_name: str = "default",
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write (replace) ``README.md`` in ``directory``, the folder an adapter was saved to; returns its path."""
    path = Path(directory) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card_text(peft_model, adapter_name, base_model, extra), encoding="utf-8")
    return path


def upload_adapter(
    peft_model: Any,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    adapter_name: str = "default",
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
    commit_message: str = "Upload SEFT adapter",
) -> Any:
    """Upload a SEFT adapter with its SEFT model card to the Hub model repo ``repo_id`` (created if needed).

    The adapter is saved to a temporary folder (``adapter_config.json``, ``adapter_model.safetensors``), the card is
    written there, and the folder is uploaded in one commit. ``base_model`` overrides the card's base model (use
    it when the adapter was trained on a local copy of a Hub model). Returns ``huggingface_hub``'s ``CommitInfo``.
    """
    from huggingface_hub import HfApi

    base = base_model or peft_model.peft_config[adapter_name].base_model_name_or_path or ""
    if _looks_local(base):
        logger.warning(
            "The adapter's base model is a local path (%s); the card's base_model field will name it. "
            "Pass base_model='owner/name' to name a Hub model instead.",
            base,
        )
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="seft-upload-") as folder:
        peft_model.save_pretrained(folder, selected_adapters=[adapter_name])
        if adapter_name != "default":  # save_pretrained puts non-default adapters into a sub-folder
            folder_path = Path(folder) / adapter_name
        else:
            folder_path = Path(folder)
        write_model_card(peft_model, folder_path, adapter_name, base_model, extra)
        commit = api.upload_folder(
            repo_id=repo.repo_id, folder_path=folder_path, repo_type="model", commit_message=commit_message
        )
    logger.info("Uploaded the SEFT adapter to %s.", repo)
    return commit
