"""Value-gradient kernels side by side: time and error against fp64, with the input-gradient GEMM for scale.

    python benchmarks/value_grad_kernels.py --threads 1  # CPU; writes benchmarks/results/value_grad_kernels.md

For each (out, in) shape, token count N, density and dtype: every implementation of ``peft_seft.value_grad`` on the
same random ``grad_out`` (N, out), ``inputs`` (N, in) and K random positions, timed interleaved (median of
``--reps``), plus ``grad_out @ W`` (the frozen layer's input-gradient GEMM, which every training step pays anyway).
Error: max |kernel - fp64| over up to 2048 sampled positions, divided by the largest |fp64| there.
``benchmarks/gpu_check.py`` runs the same measurement at 4096x4096 and 4096x14336 with 8k tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's peft_seft, installed or not
from peft_seft.tuner.value_grad import IMPLEMENTATIONS, SamplePattern, choose_implementation, sampled_gradient  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ERROR_SAMPLES = 2048


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


def measure(
    out_features: int, in_features: int, tokens: int, density: float, dtype: str, device: torch.device, reps: int
) -> dict:
    """One row: median ms and relative error of each kernel, the input-gradient GEMM's ms and the rule's choice."""
    generator = torch.Generator(device).manual_seed(0)
    torch_dtype = DTYPES[dtype]
    grad_out = torch.randn(tokens, out_features, device=device, generator=generator).to(torch_dtype)
    inputs = torch.randn(tokens, in_features, device=device, generator=generator).to(torch_dtype)
    weight = torch.randn(out_features, in_features, device=device, generator=generator).to(torch_dtype)
    k = max(1, round(density * out_features * in_features))
    positions = torch.randperm(out_features * in_features, device=device, generator=generator)[:k]
    pattern = SamplePattern.from_flat(positions, (out_features, in_features))

    sample = torch.randperm(k, device=device, generator=generator)[:ERROR_SAMPLES]
    rows, cols = positions[sample] // in_features, positions[sample] % in_features
    exact = (grad_out[:, rows].double() * inputs[:, cols].double()).sum(0)
    runs = {name: lambda name=name: sampled_gradient(grad_out, inputs, pattern, name) for name in IMPLEMENTATIONS}
    runs["input_grad_gemm"] = lambda: grad_out @ weight
    errors = {}
    for name in IMPLEMENTATIONS:
        result = runs[name]()[sample].double()
        errors[name] = ((result - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()
    times = {name: [] for name in runs}
    for rep in range(reps + 1):  # the first round warms up
        names = list(runs)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            elapsed = _time_ms(runs[name], device)
            if rep:
                times[name].append(elapsed)
    return {
        "shape": f"{out_features}x{in_features}",
        "tokens": tokens,
        "density": density,
        "dtype": dtype,
        "ms": {name: statistics.median(ts) for name, ts in times.items()},
        "error": errors,
        "rule": choose_implementation(device, torch_dtype, pattern.density),
    }


def markdown(rows: list[dict]) -> list[str]:
    kernels = list(IMPLEMENTATIONS)
    header = " | ".join(f"{name} ms" for name in kernels)
    lines = [
        f"| shape | N | density | dtype | {header} | input-grad GEMM ms | fastest | rule | "
        + " | ".join(f"{name} rel. error" for name in kernels)
        + " |",
        "|---|---:|---:|---|" + "---:|" * len(kernels) + "---:|---|---|" + "---:|" * len(kernels),
    ]
    for row in rows:
        ms = row["ms"]
        fastest = min(kernels, key=ms.get)
        lines.append(
            f"| {row['shape']} | {row['tokens']} | {row['density']:g} | {row['dtype']} | "
            + " | ".join(f"{ms[name]:.2f}" for name in kernels)
            + f" | {ms['input_grad_gemm']:.2f} | {fastest} | {row['rule']} | "
            + " | ".join(f"{row['error'][name]:.1e}" for name in kernels)
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["512x512", "1376x512", "512x1376", "2816x1024"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "value_grad_kernels.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        for tokens in args.tokens:
            for density in args.densities:
                for dtype in args.dtypes:
                    rows.append(measure(out_features, in_features, tokens, density, dtype, device, args.reps))
                    print(markdown(rows)[-1], flush=True)
    command = " ".join(["python", "benchmarks/value_grad_kernels.py", *sys.argv[1:]])
    text = "\n".join(
        [
            "# Value-gradient kernels",
            "",
            f"Command: `{command}` (torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device}; "
            f"median of {args.reps} interleaved repetitions)",
            "",
            *markdown(rows),
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
