"""Step-speed benchmark: one training step of SEFT and LoRA against the frozen model's forward + backward.

Run by hand (not in CI), e.g. ``python benchmarks/step_speed.py`` or ``python benchmarks/step_speed.py --dtype bf16``.
All variants are timed in one process, interleaved: every round runs each variant once, in rotating order, and
the table reports the median over the measured rounds. Peak memory is measured separately, one fresh subprocess
per variant (see ``measure_memory``). The model is a random ``LlamaForCausalLM`` built from a config (no Hub).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's peft_seft, installed or not
import peft_seft  # noqa: E402
from peft_seft.tuner.value_grad import IMPLEMENTATIONS, set_value_grad_implementation  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("frozen", "seft", "seft_fwd_bwd", "lora")
KERNEL_VARIANTS = tuple(f"seft:{name}" for name in IMPLEMENTATIONS)  # SEFT train step with one value-gradient kernel
LABELS = {
    "frozen": "frozen (fwd + bwd to inputs)",
    "seft": "SEFT train step",
    "seft_fwd_bwd": "SEFT fwd + bwd (no optimizer)",
    "lora": "LoRA train step",
    **{name: f"SEFT train step, value gradient {name[5:]}" for name in KERNEL_VARIANTS},
}


@dataclass
class Variant:
    step: Callable[[], torch.Tensor]  # runs one step, returns the loss
    trainable: int
    grad_tensors: list[torch.Tensor]  # every one must hold a non-zero grad after a step
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=15, help="measured rounds (each runs every variant once)")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = torch.autocast")
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="dtype of the base weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's default)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory subprocess")
    parser.add_argument(
        "--evolve",
        action="store_true",
        help="SEFT with its default evolution (gradient windows and rounds); default: a static sparse delta. "
        "Use --reps a multiple of update_interval (20) so that the mean is the amortized step",
    )
    parser.add_argument("--profile", action="store_true", help="also profile one frozen and one SEFT step")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_speed.md")
    parser.add_argument(
        "--kernels", action="store_true", help="also a SEFT train step forced to each value-gradient kernel"
    )
    parser.add_argument("--memory-child", choices=VARIANTS + KERNEL_VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- model and variants --------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> tuple[LlamaForCausalLM, torch.Tensor]:
    intermediate = math.ceil(8 * args.hidden / 3 / 32) * 32  # Llama's 8/3 * hidden, rounded up: 512 -> 1376
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it runs: initialising 1B parameters on a CPU takes long
        model = LlamaForCausalLM(config).to(DTYPES[args.weights]).train()
    ids = torch.randint(args.vocab, (args.batch, args.seq), device=args.device)
    return model, ids


def autocast(args: argparse.Namespace):
    if args.dtype == "bf16":
        return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, **inputs) -> torch.Tensor:
    with autocast(args):
        return model(**(inputs or {"input_ids": ids}), labels=ids).loss


def frozen(base: LlamaForCausalLM, ids: torch.Tensor, args: argparse.Namespace) -> Variant:
    model = copy.deepcopy(base).requires_grad_(False)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)

    def step() -> torch.Tensor:
        embeds.grad = None
        loss = lm_loss(model, ids, args, inputs_embeds=embeds)
        loss.backward()
        return loss

    return Variant(step, 0, [embeds])


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ids, args) -> Callable:
    def step() -> torch.Tensor:
        if optimizer is None:
            model.zero_grad(set_to_none=True)
        else:  # zero_grad first, so the grads of the last step stay readable for the sanity check
            optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, ids, args)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss

    return step


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def seft(base, ids, args, optimizer_step: bool = True) -> Variant:
    # Default: evolution off (initial_drop_rate=0), i.e. the plain sparse step. total_steps only matters with --evolve.
    evolution = {"total_steps": 10**6} if args.evolve else {"initial_drop_rate": 0.0}
    config = peft_seft.SEFTConfig(density=args.density, random_seed=0, **evolution)
    model = get_peft_model(copy.deepcopy(base), config)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if optimizer_step else None
    values = [p for n, p in model.named_parameters() if "seft_values" in n]
    assert len(values) == len(params) == 7 * args.layers, "SEFT should adapt the 7 projections of every layer"
    return Variant(train_step(model, optimizer, ids, args), sum(p.numel() for p in params), values)


def seft_fwd_bwd(base, ids, args) -> Variant:
    return seft(base, ids, args, optimizer_step=False)


def lora_rank(base: torch.nn.Module, args: argparse.Namespace) -> int:
    """The rank whose trainable count is closest to SEFT's (K = round(density * out * in) per layer)."""
    targets = [m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
    seft_count = sum(round(args.density * m.weight.numel()) for m in targets)
    return max(1, round(seft_count / sum(m.in_features + m.out_features for m in targets)))


def lora(base, ids, args) -> Variant:
    rank = lora_rank(base, args)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS)
    model = get_peft_model(copy.deepcopy(base), config)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]  # lora_A's grad is 0 while B is 0
    return Variant(train_step(model, optimizer, ids, args), sum(p.numel() for p in params), lora_b, f"r={rank}")


def seft_with_kernel(base, ids, args, kernel: str) -> Variant:
    variant = seft(base, ids, args)
    step = variant.step

    def forced_step() -> torch.Tensor:
        set_value_grad_implementation(kernel)
        try:
            return step()
        finally:
            set_value_grad_implementation(None)

    variant.step = forced_step
    return variant


def variant_names(args: argparse.Namespace) -> tuple[str, ...]:
    return VARIANTS + KERNEL_VARIANTS if args.kernels else VARIANTS


def build_variant(name: str, base, ids, args) -> Variant:
    if name in KERNEL_VARIANTS:
        return seft_with_kernel(base, ids, args, name[5:])
    return {"frozen": frozen, "seft": seft, "seft_fwd_bwd": seft_fwd_bwd, "lora": lora}[name](base, ids, args)


def check(name: str, variant: Variant) -> None:
    """After one step: a finite loss and a non-zero gradient on every tensor the variant trains."""
    loss = variant.step()
    assert torch.isfinite(loss), f"{name}: loss is {loss}"
    for tensor in variant.grad_tensors:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, f"{name}: a tensor got no gradient"


# ---- timing and memory ----------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_rounds(variants: dict[str, Variant], args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU milliseconds of the measured rounds; round r starts at variant r mod n."""
    names = list(variants)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(args.warmup + args.reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            variants[name].step()
            synchronize(args.device)
            if r >= args.warmup:
                times[name]["wall"].append((time.perf_counter() - wall) * 1e3)
                times[name]["cpu"].append((time.process_time() - cpu) * 1e3)
    return times


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: build the model and one variant, then report how far the steps raise memory.

    CPU: the growth of the resident set's high-water mark (VmHWM) over the RSS right before the first step.
    VmHWM is reset at that point through /proc/self/clear_refs, so model construction cannot hide in it.
    (tracemalloc sees only Python's allocations, not torch's; ru_maxrss cannot be reset and, after fork, may
    hold the parent's peak.)
    CUDA: torch.cuda.max_memory_allocated over memory_allocated right before the first step.
    """
    base, ids = build_model(args)
    variant = build_variant(args.memory_child, base, ids, args)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _proc_status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")
    # with --evolve: a whole update interval, so that a gradient window and a round are inside
    for _ in range(max(args.memory_steps, 20 if args.evolve and "seft" in args.memory_child else 0)):
        variant.step()
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_status_kib("VmHWM") * 1024
    print(json.dumps({"peak_growth": peak - before, "before": before}))


def measure_memory(name: str, argv: list[str]) -> dict[str, int]:
    # glibc's malloc raises its mmap threshold as large blocks are freed and then keeps freed memory in the heap, so
    # the RSS peak would depend on allocation history (run to run +-30 MiB here, LoRA's peak doubled). A fixed threshold
    # gives every block over 64 KiB its own mapping, returned on free: RSS then follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, *argv, "--memory-child", name]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- report ---------------------------------------------------------------------------------------------


def profile_step(variant: Variant, rows: int = 20) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        variant.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def machine_info(args: argparse.Namespace) -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    lines = [
        f"- CPU: {cpu.group(1) if cpu else platform.processor()} ({cpuinfo.count('processor')} logical CPUs)",
        f"- torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"peft {peft.__version__}, Python {platform.python_version()}",
    ]
    if torch.device(args.device).type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()}")
    else:  # other processes on the same cores inflate and scatter the times
        lines.append(f"- load average at the end (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    base, ids = build_model(args)
    variants = {name: build_variant(name, base, ids, args) for name in variant_names(args)}
    for name, variant in variants.items():
        check(name, variant)
    times = time_rounds(variants, args)
    median = {name: statistics.median(ts["wall"]) for name, ts in times.items()}
    memory = {name: measure_memory(name, argv) for name in variant_names(args)}

    config = base.config
    header = (
        f"Random LlamaForCausalLM: hidden {config.hidden_size}, {config.num_hidden_layers} layers, intermediate "
        f"{config.intermediate_size}, {config.num_attention_heads} heads, vocab {config.vocab_size}; batch "
        f"{args.batch} x seq {args.seq}, {args.dtype} on {args.device} ({args.weights} weights); SEFT density "
        f"{args.density} on "
        f"{', '.join(PROJECTIONS)}, "
        f"{'default evolution (update_interval 20, selection_steps 5)' if args.evolve else 'evolution off'}; "
        f"LoRA on the same modules, {variants['lora'].note}. "
        f"Median of {args.reps} interleaved rounds after {args.warmup} warm-up rounds."
    )
    memory_kind = "max_memory_allocated growth" if args.device.startswith("cuda") else "peak RSS growth"
    table = [
        f"| variant | median ms | mean ms | min ms | x frozen | x LoRA | median CPU ms | trainable params "
        f"| {memory_kind} (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in variant_names(args):
        wall, cpu = times[name]["wall"], times[name]["cpu"]
        table.append(
            f"| {LABELS[name]} | {median[name]:.1f} | {statistics.mean(wall):.1f} | {min(wall):.1f} | "
            f"{median[name] / median['frozen']:.2f} | {median[name] / median['lora']:.2f} | "
            f"{statistics.median(cpu):.1f} | {variants[name].trainable:,} | {memory[name]['peak_growth'] / 2**20:.0f} |"
        )
    memory_steps = f"{args.memory_steps} (SEFT: 20, a whole update interval)" if args.evolve else args.memory_steps
    command = shlex.join(["python", "benchmarks/step_speed.py", *argv])
    report = [
        "# Step speed: SEFT vs LoRA vs frozen",
        "",
        f"Command: `{command}`",
        "",
        machine_info(args),
        "",
        header,
        "",
        *table,
        "",
        "Frozen = all parameters frozen, forward + backward to `inputs_embeds` (requires grad), LM loss. "
        "Train steps = zero_grad, forward, backward, AdamW step. Ratios use the medians; mean and min show how much "
        "other load on the cores scattered the wall times. CPU ms = time.process_time of the step (all threads, "
        "spin-waits included), less disturbed by other processes than wall time. Memory: each variant in a fresh "
        f"subprocess, {memory_steps} steps; growth of the high-water mark over the level right before the first "
        "step (activations, gradients, optimizer state, temporaries; not the weights). On CPU: VmHWM, reset through "
        "/proc/self/clear_refs, with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed tensors.",
    ]
    if args.profile:
        for name in ("frozen", "seft"):
            report += ["", f"## Profile of one {LABELS[name]} (top ops by self CPU time)", "", "```"]
            report += [profile_step(variants[name]), "```"]
    text = "\n".join(report) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
