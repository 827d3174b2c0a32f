"""Model cards: of a SEFT adapter (written by ``save_pretrained`` and by the Hub publishing functions) and of a sparse
transformers model (a pruned base or a merged, repaired model).

PEFT's ``save_pretrained`` writes a generic card; :func:`install_model_card_hook` makes it write ours for SEFT
adapters (``library_name: peft``, tags ``seft``/``sparse``, the base's sparsity, density, evolution settings, what
evolution did, and the install-and-import line). A card written by us is recognised when the folder is saved again:
its evolution summary and training details are kept when the current session has none to replace them.

A card written by ``save_pretrained`` names the base in ``base_model`` as PEFT does (``base_model_name_or_path``,
which PEFT's own tests expect, even when it is a local path); ``base_model:...`` tags name Hub repo ids only. Cards
written for publishing (``repo_id`` given) hold Hub repo ids only: the Hub rejects paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .layer import SEFTLayer

SEFT_TAGS = ("peft", "seft", "sparse")
EVOLUTION_SETTINGS = (
    "update_interval",
    "selection_steps",
    "initial_drop_rate",
    "drop_schedule",
    "full_reselection_first",
    "grow_pruned",
    "prune_criterion",
    "grown_optimizer_state",
    "total_steps",
)
PAPER = "https://arxiv.org/abs/2505.24037"
INSTALL = "pip install peft-seft"
MARKER = "<!-- written by peft-seft -->"
KEPT_SECTIONS = ("## Evolution summary", "## Training details")
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def hub_repo_id(name: str | None) -> str | None:
    """``name`` if it can only be a Hub repo id (``owner/name`` or ``name``, not an existing local path), else None."""
    if not name or name.startswith(("/", ".", "~")) or "\\" in name or Path(name).expanduser().exists():
        return None
    if not REPO_ID.match(name) or "--" in name or ".." in name or name.endswith((".", "-")):
        return None
    return name


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
        f"{len(reports)} evolution round{'s' if len(reports) > 1 else ''} (optimizer steps {reports[0].step} to "
        f"{reports[-1].step}, drop rate "
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


def _front_matter(library: str, base: str | None, tags: list[str], pipeline: str | None) -> list[str]:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name=library, base_model=base, tags=tags, pipeline_tag=pipeline)
    return ["---", data.to_yaml(), "---", "", MARKER, ""]


def _versions() -> list[str]:
    import peft
    import transformers

    return [
        "### Framework versions",
        "",
        f"- PEFT {peft.__version__}",
        f"- peft-seft {_dist_version()}",
        f"- Transformers {transformers.__version__}",
        "",
    ]


def _dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-seft")
    except PackageNotFoundError:
        return "unknown"


def kept_sections(text: str) -> dict[str, list[str]]:
    """The evolution summary and training details of a card we wrote before (empty for any other card)."""
    if MARKER not in text:
        return {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line if line in KEPT_SECTIONS else None
            if current:
                sections[current] = []
        elif current:
            sections[current].append(line)
    return {name: lines for name, lines in sections.items() if any(line.strip() for line in lines)}


def model_card_text(
    peft_model: Any,
    adapter_name: str = "default",
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
    repo_id: str | None = None,
    previous: str | None = None,
) -> str:
    """The README.md of a SEFT adapter: YAML front matter and a description of the adapter.

    ``base_model`` names the pruned model the adapter loads onto (default: the config's ``base_model_name_or_path``).
    ``repo_id`` is where the adapter is published (the usage snippet names it); with it, the metadata holds only
    Hub repo ids. ``previous`` is the card this one replaces: its evolution summary and training details are
    kept when this session has none.
    """
    config = peft_model.peft_config[adapter_name]
    base = base_model or config.base_model_name_or_path
    base_id = hub_repo_id(base)
    stats = base_sparsity(peft_model, adapter_name)
    tags = [*SEFT_TAGS, "transformers"] + ([f"base_model:adapter:{base_id}"] if base_id else [])
    causal = str(getattr(config, "task_type", "")) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules or [])
    settings = {
        "density": config.density,
        "num_trainable": config.num_trainable,
        "trainable values": f"{stats['trainable']:,}",
        "target_modules": targets,
        **{name: getattr(config, name) for name in EVOLUTION_SETTINGS},
        "pattern": config.pattern or "unstructured",
    }
    kept = kept_sections(previous or "")
    summary = evolution_summary(peft_model, adapter_name)
    evolution = (
        [summary]
        if summary
        else kept.get("## Evolution summary")
        or [
            "No evolution rounds were recorded when this card was written (for example, the adapter was loaded rather "
            "than trained in this session, or evolution was switched off)."
        ]
    )
    details = [f"- {name}: {value}" for name, value in extra.items()] if extra else kept.get("## Training details")
    auto = "AutoPeftModelForCausalLM" if causal else "AutoPeftModel"
    lines = [
        *_front_matter("peft", base_id if repo_id else base, tags, "text-generation" if causal else None),
        f"# SEFT adapter for {base or 'a pruned model'}",
        "",
        f"A sparse fine-tuning adapter trained with [SEFT (Sparsity Evolution Fine-Tuning)]({PAPER}) using "
        "`peft-seft`. It trains a small set of weight values whose positions evolve during training: pruned "
        "weights may be re-activated, and other weights are pruned to pay for them, so merging it keeps the "
        "sparsity of the base model exactly (every target layer keeps its number of non-zeros).",
        "",
        "## Base model sparsity",
        "",
        f"- base model (the pruned weights this adapter loads onto): `{base or 'unknown'}`",
        f"- sparsity of the {stats['layers']} target layers: {stats['sparsity']:.2%} "
        f"({stats['nonzeros']:,} non-zeros of {stats['numel']:,} weights)",
        f"- trainable values: {stats['trainable']:,} (density {config.density})",
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
        *evolution,
        "",
    ]
    if details:
        lines += ["## Training details", "", *details, ""]
    lines += [
        "## Usage",
        "",
        f"`{INSTALL}`, then:",
        "",
        "```python",
        "import peft_seft  # registers the PEFT method SEFT; import it before loading",
        f"from peft import {auto}",
        "",
        f'model = {auto}.from_pretrained("{repo_id or "<this folder or its Hub repo id>"}")  # loads the pruned base',
        "merged = model.merge_and_unload()  # a plain transformers model, exactly as sparse as the base",
        "```",
        "",
        *_versions(),
    ]
    return "\n".join(lines)


def write_model_card(
    peft_model: Any,
    directory: str | Path,
    adapter_name: str = "default",
    base_model: str | None = None,
    extra: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write (replace) ``README.md`` in ``directory``, the folder an adapter was saved to; returns its path."""
    path = Path(directory) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text(encoding="utf-8") if path.is_file() else None
    path.write_text(model_card_text(peft_model, adapter_name, base_model, extra, repo_id, previous), encoding="utf-8")
    return path


def sparse_model_card_text(
    model: Any,
    repo_id: str,
    title: str,
    how_made: dict[str, Any],
    base_model: str | None = None,
    pattern: str | None = None,
) -> str:
    """The README.md of a sparse transformers model (a pruned base or a merged SEFT model): the sparsity of every
    target layer, the method, the model it came from (``base_model``, a Hub repo id or None) and how it was made."""
    from ..pruning import sparsity_report

    report = sparsity_report(model, pattern)
    base_id = hub_repo_id(base_model)
    rows = [
        f"| {layer.name} | {layer.shape[0]} x {layer.shape[1]} | {layer.nonzeros:,} | {layer.sparsity:.2%} |"
        for layer in report.layers
    ]
    lines = [
        *_front_matter("transformers", base_id, ["sparse", "pruned", "seft"], "text-generation"),
        f"# {title}",
        "",
        f"A sparse model: {report.sparsity:.2%} of the weights of its {len(report.layers)} linear layers inside the "
        f"transformer blocks are zero ({report.nonzeros:,} non-zeros of {report.numel:,})"
        + (f", in the {pattern} pattern" if pattern else "")
        + (f". It comes from [{base_id}](https://huggingface.co/{base_id})." if base_id else "."),
        "",
        "## How it was made",
        "",
        *(f"- {name}: {value}" for name, value in how_made.items()),
        f"- method: [SEFT (Sparsity Evolution Fine-Tuning)]({PAPER}) with `peft-seft`",
        "",
        "## Usage",
        "",
        "A plain transformers checkpoint (the zeros are stored densely); peft-seft is not needed to run it.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        "```",
        "",
        "## Sparsity per layer",
        "",
        "| layer | shape | non-zeros | sparsity |",
        "|---|---|---:|---:|",
        *rows,
        f"| total | | {report.nonzeros:,} | {report.sparsity:.2%} |",
        "",
        *_versions(),
    ]
    return "\n".join(lines)


def install_model_card_hook() -> None:
    """Make ``PeftModel.save_pretrained`` write the SEFT card when the saved adapter is a SEFT adapter (PEFT's own
    card otherwise); idempotent."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_seft_hook", False):
        return

    def create_or_update_model_card(self, output_dir: str) -> None:
        adapter = self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapters[0]
        if str(getattr(self.peft_config.get(adapter), "peft_type", "")).split(".")[-1] != "SEFT":
            return original(self, output_dir)
        write_model_card(self, output_dir, adapter)

    create_or_update_model_card._seft_hook = True
    PeftModel.create_or_update_model_card = create_or_update_model_card
