"""What evolution costs: evolving SEFT against static SEFT (initial_drop_rate=0), step by step in one process.

    python benchmarks/round_cost.py [--repeats 3] [--selection-steps 5] [--output benchmarks/results/round_cost.md]

Random Llama (hidden 512, 4 layers, intermediate 1376, vocab 8192), batch 4 x 256, density 0.01, the default
update_interval (20) and selection_steps (5, or --selection-steps up to 20: a window over the whole interval), AdamW,
1 torch thread. Each repetition trains both models for
3 intervals, their steps interleaved (static, evolving, static, ...), so that both see the same machine load;
steps 21-60 (two full intervals) are compared. Peak memory: each variant runs alone in a child process, and the
growth of its peak RSS over the RSS after building the model is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

import peft_seft
from peft_seft.testing import tiny_llama

INTERVAL, WINDOW, STEPS = 20, 5, 60
CLOCKS = ("cpu", "wall")
KINDS = ("ordinary", "first window step", "later window steps", "last window step + round")


def build(evolving: bool, window: int = WINDOW):
    dims = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, vocab_size=8192)
    model = tiny_llama(0.0, eval_mode=False, **dims, num_key_value_heads=8, max_position_embeddings=2048)  # dense
    seft = peft_seft.SEFTConfig(
        density=0.01,
        initial_drop_rate=0.2 if evolving else 0.0,
        total_steps=10**6,
        random_seed=0,
        selection_steps=window,
    )
    assert seft.update_interval == INTERVAL
    model = get_peft_model(model, seft)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, torch.randint(0, 8192, (4, 256), generator=torch.Generator().manual_seed(0))


def train_step(model, optimizer, ids) -> dict[str, float]:
    """Seconds of one step on two clocks: this process's CPU time (what other jobs on shared cores distort least)
    and wall time."""
    cpu, wall = time.process_time(), time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


def kind_of(step: int, window: int) -> str:
    position = (step - 1) % INTERVAL + 1  # 1..20; the round runs after step 20's optimizer step
    if position == INTERVAL:
        return "last window step + round"
    if position == INTERVAL - window + 1:
        return "first window step"
    if position > INTERVAL - window:
        return "later window steps"
    return "ordinary"


def time_interleaved(window: int) -> dict:
    """seconds[clock][variant][step]."""
    variants = {"static": build(False), "evolving": build(True, window)}
    seconds = {clock: {name: {} for name in variants} for clock in CLOCKS}
    for step in range(1, STEPS + 1):
        for name in ("static", "evolving") if step % 2 else ("evolving", "static"):
            for clock, value in train_step(*variants[name]).items():
                seconds[clock][name][step] = value
    return seconds


def ratios(seconds: dict, window: int) -> dict:
    """Evolution's overhead over steps 21-60 and the median evolving/static ratio of each kind of step."""
    measured = range(INTERVAL + 1, STEPS + 1)
    total = {name: sum(seconds[name][s] for s in measured) for name in seconds}
    row = {"evolution overhead": total["evolving"] / total["static"] - 1}
    for kind in KINDS:
        steps = [s for s in measured if kind_of(s, window) == kind]
        row[kind] = statistics.median(seconds["evolving"][s] / seconds["static"][s] for s in steps) if steps else None
    row["static step ms"] = 1e3 * statistics.median(seconds["static"][s] for s in measured)
    return row


def vm_kib(field: str) -> int:
    """A ``Vm*`` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory(variant: str, window: int) -> dict[str, float]:
    """Peak RSS (MiB) of training ``variant`` alone for STEPS steps in a child process, and its growth over the RSS
    after building the model."""
    # ru_maxrss survives fork and exec (a child starts with its parent's peak): read VmHWM after resetting it.
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import round_cost as rc; import torch; "
        "torch.set_num_threads(1); m, o, ids = rc.build(sys.argv[1] == 'evolving', int(sys.argv[2])); "
        "open('/proc/self/clear_refs', 'w').write('5'); base = rc.vm_kib('VmRSS'); "
        "[rc.train_step(m, o, ids) for _ in range(rc.STEPS)]; "
        "peak = rc.vm_kib('VmHWM'); print(peak / 1024, (peak - base) / 1024)"
    )
    # glibc keeps freed heap memory for reuse, so a plain peak RSS also measures fragmentation: the evolving run's
    # growth over static varied from 22 to 48 MiB between identical runs. Served by mmap, every tensor's memory
    # returns to the system when freed and the peak is that of live memory (repeated runs agree within 1 MiB).
    allocator = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code, variant, str(window)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **allocator},
    )
    peak, growth = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    return {"peak": peak, "growth": growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of the interleaved run")
    parser.add_argument("--selection-steps", type=int, default=WINDOW, help="window length (1 to update_interval)")
    parser.add_argument("--output", type=Path, default=None, help="write the markdown table (and .json) here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    rows = []
    for repeat in range(args.repeats):
        seconds = time_interleaved(args.selection_steps)
        row = {"repeat": repeat, **{clock: ratios(seconds[clock], args.selection_steps) for clock in CLOCKS}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    memory = {
        variant: [peak_memory(variant, args.selection_steps) for _ in range(2)] for variant in ("static", "evolving")
    }
    rss = vm_kib("VmHWM") / 1024
    print(json.dumps({"peak RSS growth MiB": memory}), flush=True)

    lines = [
        "# Cost of evolution: evolving vs static SEFT, interleaved in one process",
        "",
        f"Command: `python benchmarks/round_cost.py --repeats {args.repeats} --selection-steps "
        f"{args.selection_steps}`. Random Llama (hidden 512, 4 layers), batch 4 x 256, density 0.01, update_interval "
        f"20, selection_steps {args.selection_steps} (defaults: 20 and 5), AdamW, 1 torch thread, "
        f"torch {torch.__version__}. Steps 21-60 of each repetition; ratios are evolving / static for the same step, "
        "on this process's CPU time (other jobs on the shared cores distort it far less than wall time); the last "
        "column is the overhead on wall time.",
        "",
        "| repeat | evolution overhead (steps 21-60) | ordinary steps | first window step | later window steps "
        "| last window step + round | static step (median) | overhead, wall time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cpu = row["cpu"]
        kinds = " | ".join("-" if cpu[kind] is None else f"{cpu[kind]:.3f}x" for kind in KINDS)
        lines.append(
            f"| {row['repeat']} | {100 * cpu['evolution overhead']:+.1f} % | {kinds} | {cpu['static step ms']:.0f} ms "
            f"| {100 * row['wall']['evolution overhead']:+.1f} % |"
        )
    peak = {v: statistics.mean(m["peak"] for m in memory[v]) for v in memory}
    growth = {v: statistics.mean(m["growth"] for m in memory[v]) for v in memory}
    lines += [
        "",
        "Peak memory, each variant alone in a child process for 60 steps (mean of two runs; glibc's allocator "
        "set to return freed tensors' memory at once, so that the peak is that of live memory):",
        "",
        "| variant | peak RSS | growth during training |",
        "|---|---:|---:|",
        *(f"| {v} | {peak[v]:.0f} MiB | {growth[v]:.1f} MiB |" for v in ("static", "evolving")),
        "",
        # The RSS after building the model varies by tens of MiB between processes: compare the growth.
        f"Evolution adds {growth['evolving'] - growth['static']:+.1f} MiB of growth, "
        f"{100 * (growth['evolving'] - growth['static']) / peak['static']:+.2f} % of static SEFT's peak RSS. "
        f"(This process's own peak RSS: {rss:.0f} MiB.)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps({"rows": rows, "peak_rss_growth_mib": memory}, indent=1))


if __name__ == "__main__":
    main()
