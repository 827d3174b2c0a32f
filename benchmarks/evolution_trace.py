"""What each evolution round does on the 70 % SmolLM2 benchmark: churn of young entries and the round's own loss effect.

    python benchmarks/evolution_trace.py --methods seft_warmup seft_consistent_gdrop_warmup --lr 0.02 \
        --selection-steps 10 --output benchmarks/results/evolution_trace.md

Same pruned checkpoint, batches, schedule and SEFT variants as ``compare_methods.py`` (its work directory is reused).
For every round it reports how many slots changed, how many of those had been grown by the round before (an entry
replaced one interval after it arrived), |delta| of the dropped entries against the kept ones, and the loss on a fixed
probe batch (the first training batch) just before and just after the round: two optimizer-step hooks, one registered
before the model (it runs before SEFT's own hook) and one after.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import compare_methods  # noqa: E402  (the benchmark's data, variants and schedule)


def trace(method: str, lr: float, steps: int, spec: dict) -> list[dict]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec["seed"])
    batches = torch.load(spec["data"])["batches"]
    probe = batches[0]
    state: dict = {"round_due": False}
    rounds: list[dict] = []

    def probe_loss() -> float:
        with torch.no_grad():
            return float(state["model"](input_ids=probe, labels=probe).loss)

    def before_round(optimizer, *_):  # runs before SEFT's hook: the values are updated, the round has not run
        if state["round_due"]:
            state["before"] = probe_loss()
            state["old"] = [
                (layer.seft_indices["default"].clone(), layer.seft_values["default"].detach().clone())
                for layer in state["layers"]
            ]

    def after_round(optimizer, *_):
        if not state["round_due"]:
            return
        step = state["evolution"].step_of("default")
        changed_total = young = 0
        dropped, kept = [], []
        for layer, grown_at, (old_indices, old_values) in zip(
            state["layers"], state["born"], state["old"], strict=True
        ):
            changed = layer.seft_indices["default"] != old_indices
            changed_total += int(changed.sum())
            young += int((changed & (grown_at == step - spec["update_interval"])).sum())
            dropped.append(old_values[changed].abs())
            kept.append(old_values[~changed].abs())
            grown_at[changed] = step
        dropped_abs, kept_abs = torch.cat(dropped), torch.cat(kept)
        rounds.append(
            {
                "step": step,
                "changed": changed_total,
                "young": young,
                "dropped_mean_abs": float(dropped_abs.mean()) if dropped_abs.numel() else 0.0,
                "kept_median_abs": float(kept_abs.median()),
                "before": state["before"],
                "after": probe_loss(),
            }
        )

    hooks = [register_optimizer_step_post_hook(before_round)]  # registered before SEFT's own hook: runs first
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["pruned_dir"], dtype=torch.float32)
        model, params = compare_methods.build_method(method, model, spec | {"method": method, "lr": lr})
        hooks.append(register_optimizer_step_post_hook(after_round))
        layers = [m for m in model.modules() if hasattr(m, "seft_values")]
        born = [torch.full_like(layer.seft_indices["default"], -1, dtype=torch.long) for layer in layers]
        state.update(model=model, layers=layers, born=born, evolution=model.base_model.evolution)
        model.train()
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: compare_methods.lr_factor(s, spec["steps"], spec["warmup_fraction"])
        )
        for step, ids in enumerate(batches[:steps]):
            optimizer.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            state["round_due"] = state["evolution"].round_due("default", step + 1)
            optimizer.step()
            scheduler.step()
    finally:
        for hook in hooks:
            hook.remove()
    return rounds


def render(
    rows: list[tuple[str, list[dict]]], args: argparse.Namespace, own: argparse.Namespace, argv: list[str]
) -> str:
    lines = [
        "# Evolution trace: what each round changes (70 % Wanda SmolLM2-135M)",
        "",
        f"Command: `python benchmarks/evolution_trace.py {' '.join(argv)}`",
        "",
        f"lr {own.lr:g}, update_interval {args.update_interval}, selection_steps {args.selection_steps}, seed "
        f"{args.seed}, the first {own.steps} of the benchmark's {args.steps} steps. *Young*: changed slots whose entry "
        "was grown by the round before (it trained one interval). Probe loss: the first training batch, just before "
        "and just after the round (no optimizer step in between).",
        "",
        "| method | round at step | changed slots | of them young | mean \\|delta\\| dropped | median \\|delta\\| kept "
        "| probe loss before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, rounds in rows:
        for r in rounds:
            young = f"{r['young']:,} ({r['young'] / max(r['changed'], 1):.0%})"
            lines.append(
                f"| {method} | {r['step']} | {r['changed']:,} | {young} | {r['dropped_mean_abs']:.4f} | "
                f"{r['kept_median_abs']:.4f} | {r['before']:.3f} | {r['after']:.3f} |"
            )
    for method, rounds in rows:
        effects = [r["after"] - r["before"] for r in rounds]
        if effects:
            lines.append(
                f"\n{method}: the rounds themselves change the probe loss by {min(effects):+.3f} to "
                f"{max(effects):+.3f} nats (median {statistics.median(effects):+.3f})."
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    argv = sys.argv[1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["seft_warmup", "seft_consistent_gdrop_warmup"])
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--steps", type=int, default=41, help="optimizer steps traced (rounds every update_interval)")
    p.add_argument("--output", type=Path, default=HERE / "results" / "evolution_trace.md")
    own, rest = p.parse_known_args(argv)
    args = compare_methods.parse_args(["--settings", "70%", "--no-dense", *rest])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    data_path, info = compare_methods.prepare(args, log)
    spec = compare_methods.base_spec(args, "70%", data_path, info)
    rows = []
    for method in own.methods:
        rows.append((method, trace(method, own.lr, own.steps, spec)))
        log(f"{method}: {rows[-1][1]}")
    own.output.write_text(render(rows, args, own, argv))
    log(f"wrote {own.output}")


if __name__ == "__main__":
    main()
