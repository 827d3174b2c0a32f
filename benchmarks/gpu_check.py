"""GPU check: correctness on the device, step cost on a ~1B Llama and the value-gradient kernels, in one command.

    python benchmarks/gpu_check.py OUT_DIR                 # one CUDA GPU, at most --budget-s seconds (default 420)
    python benchmarks/gpu_check.py OUT_DIR --smoke         # tiny shapes on CPU in seconds (CI runs this)

Writes OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json after every section, so a run cut short still reports. Each
section is guarded: an exception or its time cap is recorded in the report and the next section runs.

- ``layer``: one SEFT layer against an fp64 dense reference (forward, input gradient, value gradient), fp32/bf16/fp16
  with base weights in that dtype and under autocast, through gradient checkpointing, with every value-gradient kernel.
- ``evolution``: a small pruned Llama trained with rounds (fp32 weights, bf16 autocast on CUDA); every round keeps the
  structurally active count equal to the budget, and the merged model has the base's non-zeros per layer.
- ``merge``: merge and unmerge restore the base weights bit-exactly, and merged outputs equal the unmerged ones.
- ``semi_structured``: a 2:4 Llama trained with SEFT, merged, converted by ``to_semi_structured`` (CUDA, bf16):
  outputs against the dense merged model.
- ``kernels``: ``benchmarks/value_grad_kernels.py``'s measurement at 4096x4096, 14336x4096 and 4096x14336, 8k tokens.
- ``step_cost``: random Llama (~1B parameters) in bf16 under bf16 autocast: frozen forward + backward, SEFT static,
  SEFT with evolution (mean over one update interval of 20 steps, window and round included), LoRA and masked LoRA at
  equal trainable count; median step, tokens/s, peak memory growth of one step.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's peft_seft, installed or not
import step_speed  # noqa: E402
import value_grad_kernels  # noqa: E402
from baselines import apply_masked_lora  # noqa: E402

import peft_seft  # noqa: E402
from peft_seft.export import nm_compliance, to_semi_structured  # noqa: E402
from peft_seft.pruning import prune  # noqa: E402
from peft_seft.testing import tiny_llama  # noqa: E402
from peft_seft.tuner.value_grad import IMPLEMENTATIONS, set_value_grad_implementation  # noqa: E402
from peft_seft.utils.sparsity import logical_weight  # noqa: E402
from peft_seft.utils.targets import find_target_linears  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |actual - fp64| / max |fp64| allowed per compute dtype (bf16/fp16 include the rounding of inputs and outputs)
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 5e-3}


class SectionTimeout(Exception):
    pass


@contextmanager
def time_cap(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (a hung kernel still needs the outer timeout)."""

    def expire(signum, frame):
        raise SectionTimeout(f"time cap of {seconds:.1f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def small_llama(hidden: int, intermediate: int, layers: int, vocab: int, device: torch.device) -> LlamaForCausalLM:
    sizes = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers, "vocab_size": vocab}
    with device:
        return tiny_llama(0.0, eval_mode=False, max_position_embeddings=256, **sizes)


def train_seft(model: nn.Module, config: peft_seft.SEFTConfig, steps: int, shape: tuple[int, int], autocast_dtype):
    """``steps`` Adam steps of SEFT on random tokens; returns the PEFT model."""
    device = next(model.parameters()).device
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.02)
    generator = torch.Generator(device).manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, shape, device=device, generator=generator)
        with torch.autocast(device.type, autocast_dtype) if autocast_dtype else nullcontext():
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model


# ---- sections ------------------------------------------------------------------------------------------------------


def layer_case(device: torch.device, dtype: str, mode: str, implementation: str, shape: tuple[int, int]) -> dict:
    out_features, in_features = shape
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, device=device)
    with torch.no_grad():
        base.weight[torch.rand_like(base.weight) < 0.5] = 0
    if mode == "weights":
        base.to(DTYPES[dtype])
    config = peft_seft.SEFTConfig(density=0.05, init_weights=False)
    layer = peft_seft.SEFTLinear(base, "default", config, num_trainable=round(0.05 * out_features * in_features))
    x = torch.randn(4, 32, in_features, device=device, dtype=base.weight.dtype, requires_grad=True)
    seed = torch.randn(4, 32, out_features, device=device)
    set_value_grad_implementation(implementation)
    try:
        with torch.autocast(device.type, DTYPES[dtype]) if mode == "autocast" else nullcontext():
            out = checkpoint(layer, x, use_reentrant=False)
        (out.float() * seed).sum().backward()
    finally:
        set_value_grad_implementation(None)
    weight, x64, seed64 = layer.effective_weight().double(), x.detach().double(), seed.double()
    positions = layer.seft_indices["default"].long()
    errors = {
        "forward": max_relative_error(out, x64 @ weight.T + base.bias.double()),
        "input_grad": max_relative_error(x.grad, seed64 @ weight),
        "value_grad": max_relative_error(
            layer.seft_values["default"].grad,
            (seed64.reshape(-1, out_features).T @ x64.reshape(-1, in_features)).reshape(-1)[positions],
        ),
    }
    passed = all(error <= TOLERANCE[dtype] for error in errors.values())
    return {
        "dtype": dtype,
        "mode": mode,
        "kernel": implementation,
        **errors,
        "tolerance": TOLERANCE[dtype],
        "passed": passed,
    }


def guarded_row(rows: list[dict], labels: dict, measure: Callable[..., dict], *args) -> None:
    """Append ``measure(*args)``, or the labels with the error, so one failing case leaves the others running."""
    try:
        rows.append(measure(*args))
    except SectionTimeout:
        raise
    except Exception as error:  # noqa: BLE001 - recorded in the report
        rows.append({**labels, "error": "".join(traceback.format_exception_only(error)).strip(), "passed": False})


def section_layer(ctx: argparse.Namespace, rows: list[dict]) -> bool:
    for dtype in DTYPES:
        for mode in ("weights",) if dtype == "fp32" else ("weights", "autocast"):
            for kernel in IMPLEMENTATIONS:
                labels = {"dtype": dtype, "mode": mode, "kernel": kernel}
                guarded_row(rows, labels, layer_case, ctx.device, dtype, mode, kernel, ctx.layer_shape)
    return all(row["passed"] for row in rows)


def section_evolution(ctx: argparse.Namespace, rows: list[dict]) -> bool:
    model = small_llama(*ctx.llama, device=ctx.device)
    prune(model, "magnitude", 0.5, show_progress=False)
    before = {name: int(torch.count_nonzero(logical_weight(m))) for name, m in find_target_linears(model).items()}
    config = peft_seft.SEFTConfig(
        density=0.05, update_interval=2, selection_steps=1, total_steps=8, initial_drop_rate=0.5, random_seed=0
    )
    autocast_dtype = torch.bfloat16 if ctx.device.type == "cuda" else None
    peft_model = train_seft(model, config, 7, (2, 32), autocast_dtype)
    for report in peft_model.base_model.evolution.reports:
        rows.append(
            {
                "step": report.step,
                "dropped": report.counts.dropped,
                "reactivated": report.counts.reactivated,
                "active": report.active,
                "budget": report.budget,
                "passed": report.active == report.budget,
            }
        )
    merged = peft_model.merge_and_unload()
    after = {name: int(torch.count_nonzero(logical_weight(m))) for name, m in find_target_linears(merged).items()}
    # a trained value can land on exactly 0, so the merged count may fall short of the budget, never exceed it
    short = sum(before[name] - after[name] for name in before)
    within = all(0 <= before[name] - after[name] <= 2 for name in before)
    rows.append({"step": "merged", "active": sum(after.values()), "budget": sum(before.values()), "passed": within})
    ctx.notes["evolution"] = f"{len(rows) - 1} rounds; merged model {short} non-zeros short of the base (values at 0)"
    return len(rows) > 2 and sum(row.get("reactivated", 0) for row in rows) > 0 and all(r["passed"] for r in rows)


def section_merge(ctx: argparse.Namespace, rows: list[dict]) -> bool:
    model = small_llama(*ctx.llama, device=ctx.device)
    prune(model, "magnitude", 0.5, show_progress=False)
    original = {name: m.weight.detach().clone() for name, m in find_target_linears(model).items()}
    config = peft_seft.SEFTConfig(density=0.05, init_weights=False, random_seed=0)
    peft_model = get_peft_model(model, config).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), device=ctx.device)
    with torch.no_grad():
        unmerged_out = peft_model(input_ids=ids).logits
        peft_model.merge_adapter()
        merged_out = peft_model(input_ids=ids).logits
        peft_model.unmerge_adapter()
        restored_out = peft_model(input_ids=ids).logits
    layers = {name: m.get_base_layer().weight for name, m in find_target_linears(peft_model).items()}
    restored = all(torch.equal(original[name.removeprefix("base_model.model.")], w) for name, w in layers.items())
    rows.append(
        {"check": "merged logits == unmerged logits (bit-exact)", "passed": torch.equal(merged_out, unmerged_out)}
    )
    rows.append({"check": "unmerge restores every base weight (bit-exact)", "passed": restored})
    rows.append(
        {"check": "logits after unmerge == before (bit-exact)", "passed": torch.equal(restored_out, unmerged_out)}
    )
    return all(row["passed"] for row in rows)


def section_semi_structured(ctx: argparse.Namespace, rows: list[dict]) -> bool | str:
    model = small_llama(*ctx.llama, device=ctx.device)
    prune(model, "magnitude", pattern="2:4", show_progress=False)
    config = peft_seft.SEFTConfig(
        pattern="2:4", density=0.05, update_interval=2, selection_steps=1, total_steps=6, initial_drop_rate=0.5
    )
    merged = train_seft(model, config, 4, (2, 32), None).merge_and_unload().to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), device=ctx.device)
    with torch.no_grad():
        dense_logits = merged(input_ids=ids).logits
        compliance = nm_compliance(merged, "2:4")
        report = to_semi_structured(merged, "2:4", strict=False, verbose=False)
        sparse_logits = merged(input_ids=ids).logits
    error = max_relative_error(sparse_logits, dense_logits)
    rows.append(
        {
            "layers": len(report.layers),
            "compliant": compliance.valid,
            "converted": report.converted,
            "reason": report.reason or "",
            "logits rel. error": error,
            "passed": compliance.valid and error <= TOLERANCE["bf16"],
        }
    )
    if report.converted == 0:
        ctx.notes["semi_structured"] = f"not converted: {report.reason}"
        return "pattern checked, not converted" if compliance.valid else False
    return rows[-1]["passed"]


def section_kernels(ctx: argparse.Namespace, rows: list[dict]) -> None:
    for dtype in ("bf16", "fp32"):  # the most telling rows first, in case the time cap cuts the section short
        for density in ctx.kernel_densities:
            for out_features, in_features in ctx.kernel_shapes:
                labels = {"shape": f"{out_features}x{in_features}", "density": density, "dtype": dtype}
                shape_args = (out_features, in_features, ctx.kernel_tokens, density, dtype, ctx.device, ctx.reps)
                guarded_row(rows, labels, value_grad_kernels.measure, *shape_args)


def section_step_cost(ctx: argparse.Namespace, rows: list[dict]) -> None:
    hidden, layers, heads, vocab, seq, batch = ctx.step_model
    argv = [
        f"--hidden={hidden}",
        f"--layers={layers}",
        f"--heads={heads}",
        f"--vocab={vocab}",
        f"--seq={seq}",
        f"--batch={batch}",
        "--dtype=bf16",
        "--weights=bf16",
        f"--device={ctx.device.type}",
        f"--warmup={ctx.warmup}",
        f"--reps={ctx.reps}",
    ]
    args = step_speed.parse_args(argv)
    base, ids = step_speed.build_model(args)
    ctx.notes["step_cost"] = (
        f"random Llama: {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters in bf16 (not pruned), "
        f"hidden {hidden}, {layers} layers, vocab {vocab}; batch {batch} x seq {seq}, bf16 autocast, AdamW; "
        f"SEFT density {args.density}; median of {ctx.reps} interleaved steps after {ctx.warmup} warm-up"
    )
    variants = {
        "frozen fwd+bwd": step_speed.frozen(base, ids, args),
        "SEFT static": step_speed.seft(base, ids, args),
        **{f"SEFT static, {k}": step_speed.seft_with_kernel(base, ids, args, k) for k in IMPLEMENTATIONS},
        "LoRA": step_speed.lora(base, ids, args),
        "masked LoRA": masked_lora(base, ids, args),
    }
    for name, variant in variants.items():
        step_speed.check(name, variant)
    times = step_speed.time_rounds(variants, args)
    tokens = batch * seq
    for name, variant in variants.items():
        median_ms = statistics.median(times[name]["wall"])
        rows.append(
            {"variant": name, "median ms": median_ms, "tokens/s": tokens / median_ms * 1e3, **peak(variant, ctx)}
        )
        rows[-1]["trainable"] = variant.trainable
    del variants
    evolving = step_speed.seft(base, ids, step_speed.parse_args([*argv, "--evolve"]))
    evolving.step()
    step_times = [time_step(evolving.step, ctx.device) for _ in range(20)]  # steps 2-21: window 16-20, round at 20
    mean_ms = statistics.mean(step_times)
    rows.append({"variant": "SEFT evolving (mean of 20)", "median ms": mean_ms, "tokens/s": tokens / mean_ms * 1e3})
    rows[-1].update(peak(evolving, ctx, steps=20), trainable=evolving.trainable)
    frozen_ms = rows[0]["median ms"]
    for row in rows:
        row["x frozen"] = row["median ms"] / frozen_ms


def masked_lora(base: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> step_speed.Variant:
    rank = step_speed.lora_rank(base, args)
    model = copy.deepcopy(base)
    apply_masked_lora(model, step_speed.PROJECTIONS, rank, 2 * rank)
    params = step_speed.trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")]
    step = step_speed.train_step(model, optimizer, ids, args)
    return step_speed.Variant(step, sum(p.numel() for p in params), lora_b, f"r={rank}")


def time_step(step: Callable[[], torch.Tensor], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def peak(variant: step_speed.Variant, ctx: argparse.Namespace, steps: int = 1) -> dict:
    if ctx.device.type != "cuda":
        return {"peak growth MiB": None}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(steps):
        variant.step()
    torch.cuda.synchronize()
    return {"peak growth MiB": (torch.cuda.max_memory_allocated() - before) / 2**20}


# ---- driver and report ---------------------------------------------------------------------------------------------

SECTIONS = {
    "layer": (section_layer, 60),
    "evolution": (section_evolution, 40),
    "merge": (section_merge, 20),
    "semi_structured": (section_semi_structured, 40),
    "kernels": (section_kernels, 110),
    "step_cost": (section_step_cost, 200),
}


def settings(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    return argparse.Namespace(
        device=torch.device("cpu" if smoke else args.device),
        layer_shape=(24, 40) if smoke else (512, 1024),
        llama=(64, 128, 2, 96) if smoke else (256, 512, 2, 512),  # hidden, intermediate, layers, vocab
        kernel_shapes=[(64, 48)] if smoke else [(4096, 4096), (14336, 4096), (4096, 14336)],
        kernel_tokens=64 if smoke else 8192,
        kernel_densities=[0.01, 0.05] if smoke else [0.01, 0.05, 0.005, 0.02],
        step_model=(64, 2, 4, 128, 32, 2) if smoke else (2048, 18, 16, 32000, 2048, 4),
        warmup=0 if smoke else 2,
        reps=1 if smoke else 5,
        notes={},
    )


def run(args: argparse.Namespace) -> dict:
    ctx = settings(args)
    if args.smoke:  # tiny shapes: threads only add overhead, and CI machines are small
        torch.set_num_threads(1)
    if ctx.device.type == "cuda":  # fp32 means fp32 in the correctness checks and the kernel table
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    report = {"command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]), **environment(ctx)}
    report["sections"] = {}
    for name, (function, cap) in SECTIONS.items():
        left = args.budget_s - (time.perf_counter() - start)
        rows: list[dict] = []
        entry = {"status": "skipped", "seconds": 0.0, "rows": rows, "note": "", "error": ""}
        report["sections"][name] = entry
        if left < 5:
            entry["note"] = "global time budget spent"
        else:
            section_start = time.perf_counter()
            try:
                with time_cap(min(cap * args.cap_scale, left)):
                    passed = function(ctx, rows)
                entry["status"] = (
                    passed if isinstance(passed, str) else {True: "passed", False: "FAILED", None: "measured"}[passed]
                )
            except Exception as error:  # noqa: BLE001 - the report records it and the next section runs
                entry["status"] = "timed out" if isinstance(error, SectionTimeout) else "ERROR"
                entry["error"] = "".join(traceback.format_exception_only(error)).strip()
                entry["traceback"] = traceback.format_exc()
            finally:
                set_value_grad_implementation(None)
            entry["seconds"] = time.perf_counter() - section_start
            entry["note"] = ctx.notes.get(name, "")
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        report["total_seconds"] = time.perf_counter() - start
        write(report, args.out_dir)
    return report


def environment(ctx: argparse.Namespace) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(ctx.device)}
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    columns = list(dict.fromkeys(key for row in rows for key in row if not isinstance(row[key], dict)))

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.2f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return lines


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    lines = [
        "# SEFT GPU check",
        "",
        f"Command: `{report['command']}`; torch {report['torch']}, device {report.get('gpu', report['device'])}; "
        f"{report['total_seconds']:.0f} s in all.",
        "",
        "| section | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name, entry in report["sections"].items():
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {entry['note']} {entry['error']} |")
    for name, entry in report["sections"].items():
        lines += ["", f"## {name}", ""]
        if entry["error"]:
            lines += [f"Error: `{entry['error']}`", ""]
        if name == "kernels":
            lines += value_grad_kernels.markdown([row for row in entry["rows"] if "error" not in row])
            lines += markdown_table([row for row in entry["rows"] if "error" in row])
        else:
            lines += markdown_table(entry["rows"])
    (out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, a few seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=420, help="global time budget in seconds")
    parser.add_argument("--cap-scale", type=float, default=1.0, help="scale every section's own time cap")
    args = parser.parse_args()
    report = run(args)
    print((args.out_dir / "gpu_check.md").read_text())
    failed = [name for name, entry in report["sections"].items() if entry["status"] in ("FAILED", "ERROR")]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
