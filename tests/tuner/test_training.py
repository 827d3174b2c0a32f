"""The evolution driver in a plain PyTorch loop: robustness to NaN gradients and to layers that cannot move."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import get_peft_model

from peft_seft import SEFTConfig, SEFTLayer
from tests.evolution.test_rounds import check_invariants


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
        hidden = torch.relu(self.first(x))
        return self.second(hidden) + hidden[:, :4]  # the first layer gets gradients past the all-zero second one


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


@pytest.mark.parametrize("grow_pruned", [True, False])
def test_windows_track_prune_candidates_only_when_a_round_can_reprune(grow_pruned):
    config = SEFTConfig(
        target_modules=["first"],
        density=0.2,
        update_interval=4,
        selection_steps=2,
        total_steps=12,
        grow_pruned=grow_pruned,
    )
    model = get_peft_model(TwoLayers(), config)
    layer = next(m for m in model.modules() if isinstance(m, SEFTLayer))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):  # the window of the round at step 4 opens before step 3's forward
        model(torch.randn(8, 12)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    window = layer._windows["default"]
    assert window.selected and window.num_grow > 0
    assert (window.num_prune > 0) == grow_pruned
    assert bool(window.is_prune.any()) == grow_pruned


def update_ratios_after_round(round_step: int, micro_batches: int, grown_optimizer_state: str) -> list[float]:
    """Median |update| of the entries grown at ``round_step`` over the median |update| of established entries in the
    same AdamW step, for each of the 9 steps after the round (before the next one). A fixed batch and a tiny learning
    rate keep every entry's gradient constant, so an established entry's update is lr * m/sqrt(v) with converged
    moments. The steps before the window only step the optimizer with that fixed gradient (the model would produce
    the same one), which keeps a 5000-step run short."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        net[0].weight[torch.rand_like(net[0].weight) < 0.5] = 0
    config = SEFTConfig(
        target_modules=["0", "2"],
        density=0.1,
        update_interval=round_step,
        selection_steps=5,
        total_steps=2 * round_step,
        grown_optimizer_state=grown_optimizer_state,
    )
    model = get_peft_model(net, config)
    layers = model.base_model.evolution.layers()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0)
    x, y = torch.randn(64, 32), torch.randn(64, 8)

    def step() -> None:
        for inputs, targets in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
            ((model(inputs) - targets).pow(2).mean() / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(round_step - 6):  # steps 1 .. round_step - 6: the gradient of the fixed batch, computed once
        if any(layer.seft_values["default"].grad is None for layer in layers):
            (model(x) - y).pow(2).mean().backward()
        optimizer.step()
    assert int(optimizer.state[layers[0].seft_values["default"]]["step"]) == round_step - 6
    optimizer.zero_grad()
    for _ in range(5):  # up to the window and its first four steps
        step()
    before = [layer.seft_indices["default"].clone() for layer in layers]
    step()  # the last window step and the round
    assert int(model.base_model.evolution.reports[-1].step) == round_step
    grown = torch.cat([layer.seft_indices["default"] != old for layer, old in zip(layers, before, strict=True)])
    assert grown.any()
    ratios = []
    for _ in range(9):
        values = torch.cat([layer.seft_values["default"].detach().clone() for layer in layers])
        step()
        update = (torch.cat([layer.seft_values["default"].detach() for layer in layers]) - values).abs()
        ratios.append(float(update[grown].median() / update[~grown].median()))
    return ratios


@pytest.mark.parametrize("round_step", [10, 5000])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_grown_entries_updates_under_each_optimizer_state(round_step, micro_batches):
    seeded = update_ratios_after_round(round_step, micro_batches, "seed")
    assert 0.5 <= seeded[0] <= 2.0  # an established entry's size at once (SpIEL's seeding)
    # Warm-up: the second moment is seeded, the first starts at zero, so the updates ramp up with the momentum, from
    # (1 - beta1) / (1 - beta1^(t+1)) of an established entry's (0.15 at step 10, 0.1 at step 5000) to
    # (1 - beta1^9) / (1 - beta1^(t+9)) after 9 steps (0.71, 0.61), at any global step t.
    warm = update_ratios_after_round(round_step, micro_batches, "warmup")
    first, ninth = (0.1 / (1 - 0.9 ** (round_step + 1)), (1 - 0.9**9) / (1 - 0.9 ** (round_step + 9)))
    assert warm[0] == pytest.approx(first, rel=0.2) and warm[8] == pytest.approx(ninth, rel=0.2)
    assert all(later > earlier for earlier, later in zip(warm, warm[1:], strict=False))
    if micro_batches == 1:  # zeroed moments depend on the global step: about 0.5x at step 10, 3x at step 5000
        zeroed = update_ratios_after_round(round_step, micro_batches, "zero")[0]
        assert zeroed < 0.7 if round_step == 10 else zeroed > 2.5


def test_only_trainable_values_evolve():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 4))
    config = SEFTConfig(target_modules=["0", "2"], density=0.3, update_interval=2, selection_steps=1, total_steps=20)
    model = get_peft_model(net, config)
    frozen, trained = model.base_model.model[0], model.base_model.model[2]
    # The optimizer holds both layers' values, as one built before the freeze would.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen.seft_values["default"].requires_grad_(False)
    positions, values = frozen.seft_indices["default"].clone(), frozen.seft_values["default"].detach().clone()
    trained_positions = trained.seft_indices["default"].clone()
    for _ in range(10):
        model(torch.randn(8, 12)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not frozen._windows
    assert torch.equal(frozen.seft_indices["default"], positions)
    assert torch.equal(frozen.seft_values["default"], values)
    assert not torch.equal(trained.seft_indices["default"], trained_positions)  # the trainable layer evolved
