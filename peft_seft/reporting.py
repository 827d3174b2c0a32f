"""Reports of the ``seft`` command: ``metrics.json``, ``report.md`` and PNG plots (matplotlib, Agg canvas).

The metrics are a plain dict (see :func:`peft_seft.commands.repair`); every section of the report is written only
when its data is there, so ``prune``, ``train``, ``eval`` and ``repair`` share this module.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGE_LABELS = {
    "dense": "before pruning",
    "pruned": "after pruning",
    "repaired": "after SEFT repair (merged)",
    "model": "model",
}
ROUND_KEYS = ("dropped", "grown", "reactivated", "repruned", "restored")


def _figure(width: float = 6.4, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_losses(losses: Sequence[Sequence[float]], path: Path) -> Path:
    figure, axes = _figure()
    axes.plot([s for s, _ in losses], [v for _, v in losses], marker=".")
    axes.set(xlabel="optimizer step", ylabel="training loss", title="SEFT training loss")
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return path


def plot_perplexity(perplexity: dict[str, float], path: Path) -> Path:
    figure, axes = _figure(5.0, 3.6)
    names = list(perplexity)
    bars = axes.bar([STAGE_LABELS.get(n, n) for n in names], [perplexity[n] for n in names], color="tab:blue")
    axes.bar_label(bars, fmt="%.2f")
    axes.set(ylabel="held-out perplexity", title="Held-out perplexity")
    axes.tick_params(axis="x", labelsize=8)
    figure.savefig(path, dpi=110)
    return path


def plot_layer_sparsity(layers: Sequence[dict[str, Any]], stages: Sequence[str], path: Path) -> Path:
    figure, axes = _figure(8.0, 3.6)
    for stage, marker in zip(stages, "o.x+", strict=False):
        axes.plot([100 * (1 - layer[stage] / layer["numel"]) for layer in layers], marker, label=STAGE_LABELS[stage])
    axes.set(xlabel="target layer (model order)", ylabel="sparsity (%)", title="Per-layer sparsity", ylim=(-2, 102))
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return path


def plot_rounds(rounds: Sequence[dict[str, Any]], path: Path) -> Path:
    figure, axes = _figure()
    steps = [r["step"] for r in rounds]
    width = (
        0.8 * (min(b - a for a, b in zip(steps, steps[1:], strict=False)) if len(steps) > 1 else 1) / len(ROUND_KEYS)
    )
    for i, key in enumerate(ROUND_KEYS):
        axes.bar([s + (i - 2) * width for s in steps], [r[key] for r in rounds], width, label=key)
    axes.set(xlabel="optimizer step", ylabel="positions (all layers)", title="SEFT evolution rounds")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _results_section(metrics: dict[str, Any]) -> list[str]:
    perplexity, nonzeros = metrics.get("perplexity", {}), metrics.get("nonzeros", {})
    numel = metrics.get("numel")
    stages = [s for s in STAGE_LABELS if s in perplexity or s in nonzeros]
    rows = []
    for stage in stages:
        ppl = f"{perplexity[stage]:.3f}" if stage in perplexity else "-"
        nnz = f"{nonzeros[stage]:,}" if stage in nonzeros else "-"
        sparsity = f"{1 - nonzeros[stage] / numel:.2%}" if stage in nonzeros and numel else "-"
        rows.append((STAGE_LABELS[stage], ppl, nnz, sparsity))
    lines = ["## Results", ""]
    if "eval_tokens" in metrics:
        lines += [f"Held-out perplexity on {metrics['eval_tokens']:,} tokens (windows of {metrics['seq_len']}).", ""]
    lines += _table(("stage", "held-out perplexity", "non-zeros (target layers)", "sparsity"), rows)
    if numel:
        lines += ["", f"Target layers: {metrics.get('num_layers', '?')} linear layers, {numel:,} weights."]
    if "merge_check" in metrics:
        lines += ["", f"**{metrics['merge_check']['summary']}**"]
    if perplexity.get("repaired", float("inf")) < perplexity.get("dense", 0):
        lines += [
            "",
            "The repaired model beats the dense one here because SEFT trained on documents of the same corpus as "
            "the held-out ones (domain adaptation); the dense model fine-tuned the same way would improve as well.",
        ]
    return lines + [""]


def _settings_section(metrics: dict[str, Any]) -> list[str]:
    lines = ["## Settings", ""]
    for group, values in metrics.get("settings", {}).items():
        lines.append(f"- {group}: " + ", ".join(f"{key}={value}" for key, value in values.items()))
    return lines + [""]


def _training_section(training: dict[str, Any], plots: dict[str, str]) -> list[str]:
    losses = training.get("losses", [])
    lines = ["## Training", ""]
    lines.append(
        f"{training.get('steps', '?')} optimizer steps in {training.get('runtime_s', 0):.0f} s; "
        f"{training.get('trainable', 0):,} trainable values."
    )
    if losses:
        lines.append(
            f"Training loss: {losses[0][1]:.3f} at step {losses[0][0]} -> {losses[-1][1]:.3f} at step {losses[-1][0]}."
        )
    if "loss" in plots:
        lines += ["", f"![training loss]({plots['loss']})"]
    rounds = training.get("rounds", [])
    if rounds:
        lines += ["", "### Evolution rounds", ""]
        header = ("step", "drop rate", *ROUND_KEYS, "active", "budget")
        rows = [
            (r["step"], f"{r['drop_rate']:.3f}", *(r[k] for k in ROUND_KEYS), r["active"], r["budget"]) for r in rounds
        ]
        lines += _table(header, rows)
        if "rounds" in plots:
            lines += ["", f"![evolution rounds]({plots['rounds']})"]
    return lines + [""]


def _layers_section(metrics: dict[str, Any], stages: Sequence[str], plots: dict[str, str]) -> list[str]:
    lines = ["## Per-layer sparsity", ""]
    if "sparsity" in plots:
        lines += [f"![per-layer sparsity]({plots['sparsity']})", ""]
    header = ("layer", "weights", *(f"non-zeros {STAGE_LABELS[s]}" for s in stages))
    rows = [(layer["name"], f"{layer['numel']:,}", *(f"{layer[s]:,}" for s in stages)) for layer in metrics["layers"]]
    return lines + ["<details><summary>table</summary>", "", *_table(header, rows), "", "</details>", ""]


def write_report(metrics: dict[str, Any], output_dir: str | Path, title: str) -> Path:
    """Write ``metrics.json``, the PNG plots and ``report.md`` into ``output_dir``; returns the report's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    training = metrics.get("training", {})
    layers = metrics.get("layers", [])
    stages = [s for s in STAGE_LABELS if layers and s in layers[0]]
    plots: dict[str, str] = {}
    if training.get("losses"):
        plots["loss"] = plot_losses(training["losses"], output_dir / "loss.png").name
    if len(metrics.get("perplexity", {})) > 0:
        plots["perplexity"] = plot_perplexity(metrics["perplexity"], output_dir / "perplexity.png").name
    if layers:
        plots["sparsity"] = plot_layer_sparsity(layers, stages, output_dir / "sparsity.png").name
    if training.get("rounds"):
        plots["rounds"] = plot_rounds(training["rounds"], output_dir / "evolution.png").name

    lines = [f"# {title}", ""]
    lines += [f"- model: {metrics.get('model')}", f"- dataset: {metrics.get('dataset')}"]
    lines += [f"- {name}: {value}" for name, value in metrics.get("data", {}).items()]
    lines.append("")
    lines += _results_section(metrics)
    if "perplexity" in plots:
        lines += [f"![held-out perplexity]({plots['perplexity']})", ""]
    lines += _settings_section(metrics)
    if training:
        lines += _training_section(training, plots)
    if layers:
        lines += _layers_section(metrics, stages, plots)
    if metrics.get("timings"):
        lines += ["## Wall time", ""]
        lines += _table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in metrics["timings"].items()]) + [""]
    if metrics.get("outputs"):
        lines += ["## Outputs", ""] + [f"- {name}: `{path}`" for name, path in metrics["outputs"].items()] + [""]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
