"""The evolution driver in a plain PyTorch loop: robustness to NaN gradients and to layers that cannot move."""

from __future__ import annotations

import logging

import torch
from peft import get_peft_model

from peft_seft import SEFTConfig, SEFTLayer
from tests.test_evolution import check_invariants


class TwoLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(12, 12)
        self.second = torch.nn.Linear(12, 4)
        with torch.no_grad():
            self.first.weight[torch.rand_like(self.first.weight) < 0.5] = 0
            self.second.weight.zero_()  # a layer with no non-zero weight: its budget is 0 and cannot move

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_nan_gradients_skip_the_round_and_zero_budget_layers_are_no_ops(caplog):
    config = SEFTConfig(
        target_modules=["first", "second"], density=0.2, update_interval=4, selection_steps=2, total_steps=12
    )
    model = get_peft_model(TwoLayers(), config)
    layers = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules() if isinstance(m, SEFTLayer)}
    assert layers["second"].seft_values["default"].numel() == 0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    positions_before_nan_round = None
    with caplog.at_level(logging.WARNING, logger="peft_seft"):
        for step in range(1, 13):
            x = torch.randn(8, 12)
            loss = model(x).pow(2).mean()
            if step == 8:  # inside the window of the round at step 8
                loss = loss * float("nan")
                positions_before_nan_round = layers["first"].seft_indices["default"].clone()
            loss.backward()
            if step == 8:
                layers["first"].seft_values["default"].grad.zero_()  # keep the values finite; stats saw NaN
            optimizer.step()
            optimizer.zero_grad()
    reports = {report.step: report for report in model.base_model.evolution.reports}
    assert sorted(reports) == [4, 8]  # the drop rate is 0 at step 12 = total_steps
    assert reports[4].counts.dropped > 0
    assert reports[8].skipped_layers >= 1 and reports[8].counts.dropped == 0
    assert torch.equal(layers["first"].seft_indices["default"], positions_before_nan_round)
    assert "no finite gradient" in caplog.text
    assert reports[8].active == reports[8].budget
    for layer in layers.values():
        check_invariants(layer)
