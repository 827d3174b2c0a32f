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
    values = [perplexity[n] for n in names]
    bars = axes.bar([STAGE_LABELS.get(n, n) for n in names], values, color="tab:blue")
    axes.bar_label(bars, fmt="%.2f")
    if min(values) > 0 and max(values) / min(values) > 10:  # the values span decades: a linear axis hides the small
        axes.set_yscale("log")
    axes.set(ylabel="held-out perplexity", title="Held-out perplexity")
    axes.tick_params(axis="x", labelsize=8)
    figure.savefig(path, dpi=110)
    return path


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q_proj``: the block index and the projection."""
    parts = name.split(".")
    index = next((p for p in parts if p.isdigit()), "")
    return f"{index}.{parts[-1]}" if index else parts[-1]


def _layer_axis(axes, names: Sequence[str]) -> None:
    axes.set_xticks(range(len(names)), [_short(n) for n in names], rotation=90, fontsize=6)
    axes.set_xlim(-0.7, len(names) - 0.3)


def plot_layer_sparsity(layers: Sequence[dict[str, Any]], stages: Sequence[str], path: Path) -> Path:
    """Per-layer sparsity of every stage, and below it the change in non-zeros of the last stage against the one
    before it, so that a difference of even one weight is visible (and its absence stated)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(8.0, 0.16 * len(layers)), 5.6), layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    names = [layer["name"] for layer in layers]
    for stage, marker in zip(stages, "o.x+", strict=False):
        top.plot([100 * (1 - layer[stage] / layer["numel"]) for layer in layers], marker, label=STAGE_LABELS[stage])
    top.set(ylabel="sparsity (%)", title="Per-layer sparsity", ylim=(-2, 102))
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    if len(stages) >= 2:
        before, after = stages[-2], stages[-1]
        change = [layer[after] - layer[before] for layer in layers]
        colors = ["tab:red" if c > 0 else "tab:green" if c < 0 else "tab:gray" for c in change]
        bottom.bar(range(len(layers)), change, color=colors)
        bottom.axhline(0, color="black", linewidth=0.8)
        bottom.set(ylabel="non-zeros change", title=f"Non-zeros {STAGE_LABELS[after]} minus {STAGE_LABELS[before]}")
        if not any(change):
            bottom.set_ylim(-1, 1)
            bottom.text(0.5, 0.6, "identical non-zero count in every layer", transform=bottom.transAxes, ha="center")
    _layer_axis(bottom, names)
    bottom.set_xlabel("target layer (block.projection, model order)")
    figure.savefig(path, dpi=110)
    return path


def plot_rounds(rounds: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars per evolution round; the rounds sit side by side, labelled with the optimizer step they ran at."""
    figure, axes = _figure(max(6.4, 0.5 * len(rounds) * len(ROUND_KEYS) / 2))
    width = 0.8 / len(ROUND_KEYS)
    for i, key in enumerate(ROUND_KEYS):
        offsets = [r + (i - (len(ROUND_KEYS) - 1) / 2) * width for r in range(len(rounds))]
        axes.bar(offsets, [r[key] for r in rounds], width, label=key)
    axes.set_xticks(range(len(rounds)), [str(r["step"]) for r in rounds])
    axes.set(xlabel="optimizer step of the round", ylabel="positions (all layers)", title="SEFT evolution rounds")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def plot_topology(topology: Sequence[dict[str, Any]], path: Path) -> Path:
    """Per layer, the pruned weights evolution re-activated and the frozen weights it re-pruned to pay for them."""
    figure, axes = _figure(max(8.0, 0.16 * len(topology)), 3.8)
    positions = range(len(topology))
    axes.bar([p - 0.2 for p in positions], [t["reactivated"] for t in topology], 0.4, label="re-activated (were 0)")
    axes.bar([p + 0.2 for p in positions], [t["repruned"] for t in topology], 0.4, label="re-pruned (now 0)")
    _layer_axis(axes, [t["name"] for t in topology])
    axes.set(ylabel="weights", title="Where evolution moved the sparsity pattern (at the end of training)")
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
    if "topology" in plots:
        moved = training["topology"]
        lines += [
            "",
            f"At the end, {sum(t['reactivated'] for t in moved):,} weights that were pruned are trainable again "
            f"(re-activated) and {sum(t['repruned'] for t in moved):,} frozen weights were pruned to pay for them.",
            "",
            f"![topology]({plots['topology']})",
        ]
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
    if training.get("topology"):
        plots["topology"] = plot_topology(training["topology"], output_dir / "topology.png").name

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
