"""Loss and global gradient norm around SEFT's evolution rounds, from ``compare_methods.py --sweep`` results.

    python benchmarks/compare_methods.py --sweep --sweep-setting 70% --sweep-steps 64 --selection-steps 10 \
        --work-dir /tmp/cm_clip --out /tmp/clip --methods seft_static seft seft_warmup --sweep-lrs 0.02
    python benchmarks/compare_methods.py --sweep --sweep-setting 70% --sweep-steps 64 --selection-steps 10 \
        --max-grad-norm 0 --work-dir /tmp/cm_noclip --out /tmp/noclip --methods seft_static seft --sweep-lrs 0.003 0.02
    python benchmarks/round_dynamics.py /tmp/clip_sweep.json /tmp/noclip_sweep.json --plot-lr 0.02 \
        --output benchmarks/results/round_dynamics_70

Every sweep run records the global gradient norm of each step before clipping (``grad_norms``). The report shows, per
run, how a round changes it: a grown entry sits where the gradient is largest, so after a round the norm is set by
the grown entries, and global-norm clipping (the Trainer's default, 1.0) then shrinks every entry's step.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def max_grad_norm(argv: list[str]) -> float:
    """The run's clipping threshold (0: off), from the sweep's command line (1.0 before the flag existed)."""
    match = re.search(r"--max-grad-norm[ =](\S+)", " ".join(argv))
    return float(match.group(1)) if match else 1.0


def runs(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        saved = json.loads(path.read_text())
        clip = max_grad_norm(saved["argv"])
        for result in saved["results"]:
            if "grad_norms" not in result:
                raise SystemExit(f"{path}: {result['method']} has no grad_norms; rerun it with this compare_methods.py")
            rounds = [r["step"] for r in result.get("seft_rounds", []) if r.get("seft/grown", 0)]
            label = f"{result['method']} lr {result['lr']:g}, " + (f"clip {clip:g}" if clip else "no clipping")
            rows.append(result | {"clip": clip, "label": label, "rounds": rounds, "source": path.name})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| run | validation ppl | grad norm, median before the first round | median after it | largest "
        "| steps clipped | loss, steps 11-20 (mean) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        norms, losses = row["grad_norms"], row["losses"]
        first = row["rounds"][0] if row["rounds"] else 10  # static runs: the steps of the evolving runs' intervals
        clipped = sum(n > row["clip"] for n in norms) if row["clip"] else 0
        lines.append(
            f"| {row['label']} | {row['ppl']:.2f} | {statistics.median(norms[:10]):.2f} | "
            f"{statistics.median(norms[first:]):.2f} | {max(norms):.1f} | {clipped} of {len(norms)} | "
            f"{statistics.fmean(losses[10:20]):.3f} |"
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for row in rows:
        losses = row["losses"]
        smooth = [statistics.fmean(losses[max(0, i - 4) : i + 1]) for i in range(len(losses))]
        style = "-" if row["clip"] else "--"
        (line,) = ax_loss.plot(range(1, len(losses) + 1), smooth, style, label=row["label"])
        ax_norm.plot(range(1, len(losses) + 1), row["grad_norms"], style, color=line.get_color())
    for step in sorted({s for row in rows for s in row["rounds"]}):
        for ax in (ax_loss, ax_norm):
            ax.axvline(step + 0.5, color="0.85", zorder=0)
    ax_norm.axhline(1.0, color="k", linewidth=0.8, linestyle=":")
    ax_loss.set_ylabel("training loss (mean of 5 steps)")
    ax_norm.set_ylabel("global gradient norm (before clipping)")
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("optimizer step (grey: evolution rounds; dotted: the clipping threshold 1.0)")
    ax_loss.legend(fontsize=8)
    fig.suptitle("70 % Wanda SmolLM2-135M: what a round does to the gradient norm (solid: clipped at 1.0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="<out>_sweep.json files of compare_methods.py --sweep")
    p.add_argument("--output", type=Path, required=True, help="writes OUTPUT.md and OUTPUT.png")
    p.add_argument("--plot-lr", type=float, help="plot only the runs at this learning rate (the table has all)")
    args = p.parse_args()
    rows = runs(args.sweeps)
    md, png = args.output.with_suffix(".md"), args.output.with_suffix(".png")
    plot([row for row in rows if args.plot_lr is None or row["lr"] == args.plot_lr], png)
    argvs = [json.loads(path.read_text())["argv"] for path in args.sweeps]
    commands = [" ".join(["python benchmarks/compare_methods.py", *argv]) for argv in argvs]
    lines = [
        "# Gradient norm around evolution rounds (70 % Wanda SmolLM2-135M, 64 steps)",
        "",
        "Runs: "
        + ", ".join(f"`{c}`" for c in commands)
        + f". Plot: `{png.name}`"
        + (f" (the runs at lr {args.plot_lr:g})." if args.plot_lr is not None else "."),
        "",
        "The first round runs after step 10 (`update_interval` 10, window of 10 steps); for static runs the columns "
        "split at the same step. Gradient norms are global, over all trainable values, before clipping.",
        "",
        *table(rows),
    ]
    md.write_text("\n".join(lines) + "\n")
    print(md.read_text())


if __name__ == "__main__":
    main()
