"""Where growth by raw |g| lands on the 70 % SmolLM2 benchmark: on the inputs with the largest activations.

    python benchmarks/growth_columns.py --work-dir /tmp/cm_norm

One training micro-batch of ``compare_methods.py`` (its pruned checkpoint and data; run a sweep there first) through
the pruned model; for every target layer, the d positions a first round would grow (d = 0.2 x the layer's share of
LoRA-r4's trainable count, the benchmark's first drop rate) chosen by |G| and by |G| / ||x_j|| (what
``growth_normalization="input"`` ranks by). The report gives how often each choice lands on the layer's top 1 % of
input columns by RMS, the mean input RMS of the chosen positions over the layer's mean, and the share of the layer's
rows (outputs) that hold at least one of them; also for |G| / (||x_j|| ||e_i||) (e_i: the output's gradient) and
for d random positions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare_methods  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, required=True, help="a compare_methods work dir with the 70 % model")
    p.add_argument("--drop-rate", type=float, default=0.2)
    args = p.parse_args()
    smollm2 = args.work_dir / "smollm2"
    model = AutoModelForCausalLM.from_pretrained(next(smollm2.glob("pruned_70pct_*")), dtype=torch.float32)
    ids = torch.load(smollm2 / "data.pt")["batches"][0]
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in compare_methods.PROJECTIONS
    }
    model.requires_grad_(False)
    column_sq, row_sq = {}, {}
    for name, layer in layers.items():
        layer.weight.requires_grad_(True)
        layer.register_forward_pre_hook(
            lambda _, inputs, name=name: column_sq.update({name: inputs[0].detach().flatten(0, -2).pow(2).sum(0)})
        )
        layer.register_full_backward_hook(
            lambda _, grad_in, grad_out, name=name: row_sq.update({name: grad_out[0].flatten(0, -2).pow(2).sum(0)})
        )
    model(input_ids=ids, labels=ids).loss.backward()
    total = sum(layer.weight.numel() for layer in layers.values())
    budget = compare_methods.lora_count(model, 4)
    generator = torch.Generator().manual_seed(0)
    rankings = ("|G|", "|G| / ||x_j||", "|G| / (||x_j|| ||e_i||)", "random")
    rows = {label: ([], [], []) for label in rankings}
    for name, layer in layers.items():
        grad, norms = layer.weight.grad, column_sq[name].sqrt().clamp_min(1e-12)
        row_norms = row_sq[name].sqrt().clamp_min(1e-12)  # e_i: the gradient at output i
        d = max(1, round(args.drop_rate * budget * grad.numel() / total))
        top_columns = norms >= norms.quantile(0.99)
        keys = {
            "|G|": grad.abs(),
            "|G| / ||x_j||": grad.abs() / norms,
            "|G| / (||x_j|| ||e_i||)": grad.abs() / norms / row_norms[:, None],
            "random": torch.rand(grad.shape, generator=generator),
        }
        for label in rankings:
            chosen = keys[label].reshape(-1).topk(d).indices
            columns = chosen % grad.shape[1]
            rows[label][0].append(float(top_columns[columns].float().mean()))
            rows[label][1].append(float(norms[columns].mean() / norms.mean()))
            rows[label][2].append(chosen.div(grad.shape[1], rounding_mode="floor").unique().numel() / grad.shape[0])
    print(f"{len(layers)} layers, one micro-batch of {ids.numel()} tokens, d = {args.drop_rate} x the trainable count")
    print(
        "| growth by | chosen positions on the top 1 % of input columns (mean of layers) | their input RMS / mean "
        "| rows (outputs) holding one or more |"
    )
    print("|---|---:|---:|---:|")
    for label, (shares, ratios, covered) in rows.items():
        print(
            f"| {label} | {statistics.fmean(shares):.0%} | {statistics.fmean(ratios):.1f}x | "
            f"{statistics.fmean(covered):.0%} |"
        )


if __name__ == "__main__":
    main()
