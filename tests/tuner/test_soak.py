"""A long run: thousands of optimizer steps with evolution on, in a plain loop, on a tiny MLP.

Memory must not grow after warm-up (no per-step or per-round leak of graphs, windows, patterns or originals), and
the non-zero budget must hold at every round.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from peft import get_peft_model

from peft_seft import SEFTConfig

STEPS, WARMUP, INTERVAL = 2000, 400, 5


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(3))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight[torch.rand_like(layer.weight) < 0.5] = 0

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def test_thousands_of_steps_with_evolution_keep_memory_and_budget_flat():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    try:
        run_soak()
    finally:
        torch.set_num_threads(threads)


def run_soak() -> None:
    config = SEFTConfig(
        target_modules=["0", "1", "2"], density=0.05, update_interval=INTERVAL, selection_steps=2, total_steps=STEPS
    )
    model = get_peft_model(MLP(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(64, 8, 32, generator=generator), torch.randn(64, 8, 32, generator=generator)
    rss = {}
    for step in range(1, STEPS + 1):
        loss = torch.nn.functional.mse_loss(model(inputs[step % 64]), targets[step % 64])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (WARMUP, STEPS):
            gc.collect()
            rss[step] = rss_bytes()
    reports = model.base_model.evolution.reports
    assert len(reports) >= STEPS // INTERVAL - 2  # the last rounds have a drop rate of 0 and do not run
    assert sum(report.counts.grown for report in reports) > 500
    assert all(report.active == report.budget for report in reports)
    growth = rss[STEPS] - rss[WARMUP]
    print(f"RSS after warm-up {rss[WARMUP] / 2**20:.1f} MiB, after {STEPS} steps {rss[STEPS] / 2**20:.1f} MiB")
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {STEPS - WARMUP} steps"
