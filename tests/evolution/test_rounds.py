"""Evolution rounds: invariants under random rounds (hypothesis), schedule, optimizer state, learning benefit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_seft import SEFTConfig, SEFTLinear
from peft_seft.evolution.rounds import Candidates, drop_rate, evolve, structural_active_count
from peft_seft.tuner.training import reset_optimizer_state, window_size
from peft_seft.utils.sparsity import logical_weight


def window_round(layer: SEFTLinear, rate: float, config: SEFTConfig, steps: int = 2, micro_batches: int = 1):
    """Open a window sized for a round of ``rate``, run ``steps`` optimizer steps of random output gradients through
    the layer's own backward, then the round; returns what ``evolve_adapter`` returns."""
    values = layer.seft_values["default"]
    num_grow, num_prune = window_size(config, values.numel(), rate)
    layer.open_window("default", num_grow, num_prune, config.grow_pruned)
    for _ in range(steps):
        for _ in range(micro_batches):
            x = torch.randn(5, layer.in_features)
            layer(x).backward(torch.randn(5, layer.out_features))  # writes W in place and collects, as in training
        layer.end_window_step("default")
        values.grad = None
    return layer.evolve_adapter("default", rate, config)


def check_invariants(layer: SEFTLinear, name: str = "default") -> None:
    w0 = layer.effective_weight([]).reshape(-1)
    indices = layer.seft_indices[name].long()
    pruned = layer.pruned_positions(name).long()
    n = int((w0 != 0).sum())
    assert indices.unique().numel() == indices.numel()
    assert ((indices >= 0) & (indices < w0.numel())).all()
    assert pruned.unique().numel() == pruned.numel() <= indices.numel()
    assert not torch.isin(pruned, indices).any()
    assert (w0[pruned] != 0).all()
    assert structural_active_count(w0 != 0, indices, pruned) == n
    merged = layer.effective_weight()
    assert int((merged != 0).sum()) <= n


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(2, 24),
    in_features=st.integers(2, 24),
    sparsity=st.floats(0.0, 0.95),
    density=st.floats(0.01, 0.6),
    rates=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    criterion=st.sampled_from(["sensitivity", "magnitude", "wanda"]),
    grow_pruned=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_rounds_keep_every_invariant(
    out_features, in_features, sparsity, density, rates, criterion, grow_pruned, seed
):
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight[torch.rand_like(base.weight) < sparsity] = 0
    budget = max(1, round(density * base.weight.numel()))
    layer = SEFTLinear(base, "default", SEFTConfig(init_weights=False), num_trainable=budget)
    budget = layer.seft_values["default"].numel()  # at most the layer's non-zero count
    check_invariants(layer)
    config = SEFTConfig(prune_criterion=criterion, grow_pruned=grow_pruned)
    for rate in rates:
        outcome = window_round(layer, rate, config)
        with torch.no_grad():
            layer.seft_values["default"].add_(torch.randn(budget) * 0.1)
        check_invariants(layer)
        counts = outcome[0]
        assert counts.dropped == counts.grown == int(outcome[1].sum()) <= int(rate * budget)
        if not grow_pruned:
            assert counts.reactivated == 0 and layer.pruned_positions("default").numel() == 0


def test_evolve_grows_the_largest_gradients_and_prunes_the_least_sensitive():
    # 8 positions, W0 zero at 0..3; T = {4, 5} with |delta| 0.1 (dropped) and 0.9.
    result = evolve(
        indices=torch.tensor([4, 5]),
        drop_keys=torch.tensor([0.1, 0.9]),
        pruned=torch.tensor([], dtype=torch.long),
        zero_in_base=torch.tensor([False, False]),
        grow=Candidates(torch.tensor([0, 1, 6]), torch.tensor([5.0, 1.0, 3.0])),
        grow_inactive=torch.tensor([True, True, False]),
        prune=Candidates(torch.tensor([6, 7]), torch.tensor([0.5, 0.2])),
        restore_scores=torch.tensor([]),
        num_drop=1,
    )
    assert result.indices.tolist() == [0, 5]  # slot 0 re-activates position 0
    assert result.pruned.tolist() == [7]  # paid for by the least sensitive frozen weight
    assert result.changed_slots.tolist() == [True, False]
    assert (result.counts.reactivated, result.counts.repruned) == (1, 1)


def test_a_round_does_not_depend_on_the_order_of_near_equal_scores():
    """Ranks that sum the same gradients in another order get scores that differ in the last bit: which positions
    are chosen must decide the result, not in which order near-equal scores put them."""
    eps = 1e-6

    def round_with(swap: bool):
        first, second = (1.0 + eps, 1.0) if swap else (1.0, 1.0 + eps)
        return evolve(
            indices=torch.tensor([10, 11, 12]),
            drop_keys=torch.tensor([0.1 * second, 0.1 * first, 0.9]),  # slots 0 and 1 are dropped
            pruned=torch.tensor([], dtype=torch.long),
            zero_in_base=torch.tensor([False, False, False]),
            grow=Candidates(torch.tensor([3, 5, 6]), torch.tensor([first, second, 0.5])),  # 3 and 5 are grown
            grow_inactive=torch.tensor([True, True, False]),
            prune=Candidates(torch.tensor([7, 8, 9]), torch.tensor([0.5 * first, 0.5 * second, 2.0])),
            restore_scores=torch.tensor([]),
            num_drop=2,
        )

    results = [round_with(swap) for swap in (False, True)]
    for result in results:
        assert result.indices.tolist() == [3, 5, 12]  # ascending positions into ascending slots
        assert result.pruned.tolist() == [7, 8]
        assert result.changed_slots.tolist() == [True, True, False]


def keep_round(trainable_scores: list[float], num_drop: int):
    """T = {4, 5} with |delta| 0.1 and 0.9 (slot 0 is dropped first); candidates 6 and 7 score 1.0 and 3.0."""
    return evolve(
        indices=torch.tensor([4, 5]),
        drop_keys=torch.tensor([0.1, 0.9]),
        pruned=torch.tensor([], dtype=torch.long),
        zero_in_base=torch.tensor([False, False]),
        grow=Candidates(torch.tensor([6, 7]), torch.tensor([1.0, 3.0])),
        grow_inactive=torch.tensor([False, False]),
        prune=Candidates.empty(),
        restore_scores=torch.tensor([]),
        num_drop=num_drop,
        trainable_scores=torch.tensor(trainable_scores),
    )


def test_a_dropped_entry_that_would_be_regrown_keeps_its_slot_and_value():
    kept = keep_round([5.0, 0.2], num_drop=1)  # slot 0's own gradient beats every candidate: it stays
    assert kept.indices.tolist() == [4, 5] and not kept.changed_slots.any() and kept.counts.dropped == 0
    replaced = keep_round([0.5, 0.2], num_drop=1)
    assert replaced.indices.tolist() == [7, 5] and replaced.changed_slots.tolist() == [True, False]
    # Full re-selection (every slot due): the best two of T and the candidates by score, T's keep their values.
    full = keep_round([5.0, 0.2], num_drop=2)
    assert sorted(full.indices.tolist()) == [4, 7] and full.changed_slots.tolist() == [False, True]


def test_full_reselection_keeps_the_values_of_reselected_entries():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 16)
    layer = SEFTLinear(base, "default", SEFTConfig(init_weights=False), num_trainable=40)
    values = layer.seft_values["default"]
    before_positions, before_values = layer.seft_indices["default"].clone(), values.detach().clone()
    outcome = window_round(layer, 1.0, SEFTConfig(full_reselection_first=True), steps=3)
    changed = outcome[1]
    assert 0 < int(changed.sum()) < values.numel()  # some re-selected, some replaced
    assert torch.equal(layer.seft_indices["default"][~changed], before_positions[~changed])
    assert torch.equal(values.detach()[~changed], before_values[~changed])
    assert not values.detach()[changed].any()


def test_dropping_a_reactivated_weight_restores_the_most_important_pruned_one():
    result = evolve(
        indices=torch.tensor([0, 5]),  # position 0 is zero in W0 (re-activated earlier): P holds 6 and... 7
        drop_keys=torch.tensor([0.01, 0.9]),
        pruned=torch.tensor([6]),
        zero_in_base=torch.tensor([True, False]),
        grow=Candidates(torch.tensor([4]), torch.tensor([1.0])),
        grow_inactive=torch.tensor([False]),
        prune=Candidates.empty(),
        restore_scores=torch.tensor([3.0]),
        num_drop=1,
    )
    assert result.indices.tolist() == [4, 5]
    assert result.pruned.tolist() == []
    assert result.counts.restored == 1


def test_growth_is_limited_by_what_can_be_pruned():
    # Nothing frozen can be pruned, so no inactive position may be grown; the active candidate is taken.
    result = evolve(
        indices=torch.tensor([3]),
        drop_keys=torch.tensor([0.0]),
        pruned=torch.tensor([], dtype=torch.long),
        zero_in_base=torch.tensor([False]),
        grow=Candidates(torch.tensor([0, 1]), torch.tensor([9.0, 1.0])),
        grow_inactive=torch.tensor([True, False]),
        prune=Candidates.empty(),
        restore_scores=torch.tensor([]),
        num_drop=1,
    )
    assert result.indices.tolist() == [1] and result.counts.reactivated == 0


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_drop_rate_schedule(schedule):
    rates = [drop_rate(step, 100, 0.2, schedule) for step in range(0, 101, 10)]
    assert rates[0] == pytest.approx(0.2) and rates[-1] == 0.0
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[5] == pytest.approx(0.1)
    if schedule == "cosine":
        assert rates[2] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert drop_rate(20, 100, 0.2, schedule, full_first_round_at=20) == 1.0


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.AdamW([p], lr=0.1),
        lambda p: torch.optim.Adam([p], lr=0.1),
        lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adagrad([p], lr=0.1),
    ],
)
def test_optimizer_state_is_reset_only_at_changed_slots(make_optimizer):
    param = torch.nn.Parameter(torch.randn(6))
    optimizer = make_optimizer(param)
    param.grad = torch.randn(6)
    optimizer.step()
    before = {k: v.clone() for k, v in optimizer.state[param].items() if torch.is_tensor(v)}
    changed = torch.tensor([True, False, False, True, False, False])
    reset_optimizer_state(optimizer, param, changed)
    for key, value in optimizer.state[param].items():
        if torch.is_tensor(value) and value.shape == param.shape:
            assert (value[changed] == 0).all() and torch.equal(value[~changed], before[key][~changed]), key
        elif torch.is_tensor(value):
            assert torch.equal(value, before[key]), key


def test_adam_moments_can_be_seeded_with_bias_counter_correction():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param], lr=0.1, betas=(0.9, 0.99))
    param.grad = torch.ones(3)
    optimizer.step()
    changed = torch.tensor([False, True, False])
    reset_optimizer_state(optimizer, param, changed, seed=(torch.tensor([-2.0]), torch.tensor([9.0])))
    state = optimizer.state[param]
    step = float(state["step"])
    assert state["exp_avg"][1] / (1 - 0.9**step) == pytest.approx(-2.0)
    assert state["exp_avg_sq"][1] / (1 - 0.99**step) == pytest.approx(9.0)


class Student(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def train_student(
    config: SEFTConfig, base: torch.Tensor, teacher: torch.Tensor, steps: int
) -> tuple[float, torch.nn.Module]:
    """Fit a one-layer student on a teacher's outputs; the held-out MSE and the merged student."""
    torch.manual_seed(0)
    model = get_peft_model(Student(base), config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, base.shape[1], generator=data)
        loss = (model(x) - x @ teacher.T).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    x = torch.randn(512, base.shape[1], generator=data)
    with torch.no_grad():
        final = float((model(x) - x @ teacher.T).pow(2).mean())
    return final, model.merge_and_unload()


def test_reactivating_pruned_weights_beats_frozen_topology():
    """The teacher needs weights exactly where the pruned base is zero: only growth into pruned positions can
    learn them. Same steps, same budget, same sparsity after merge."""
    torch.manual_seed(0)
    out_features, in_features = 16, 32
    teacher = torch.zeros(out_features, in_features)
    needed = torch.stack([torch.randperm(in_features)[:2] for _ in range(out_features)])
    teacher.scatter_(1, needed, torch.randn(out_features, 2).sign() * 1.0)
    base = torch.randn(out_features, in_features) * 0.05
    base[torch.rand_like(base) < 0.5] = 0
    base[teacher != 0] = 0  # the needed weights were pruned away
    nonzeros = int(torch.count_nonzero(base))
    common = dict(target_modules=["proj"], density=0.1, update_interval=10, selection_steps=3, total_steps=300)
    losses = {}
    for label, extra in {
        "reactivate": dict(grow_pruned=True, initial_drop_rate=0.5),
        "active_only": dict(grow_pruned=False, initial_drop_rate=0.5),
        "static": dict(initial_drop_rate=0.0),
    }.items():
        losses[label], merged = train_student(SEFTConfig(**common, **extra), base, teacher, steps=300)
        merged_nonzeros = int(torch.count_nonzero(logical_weight(merged.proj)))
        assert merged_nonzeros <= nonzeros
        if label == "reactivate":
            assert merged_nonzeros >= nonzeros - 2  # sparsity unchanged (a trained value may be exactly 0)
    assert losses["reactivate"] < 0.3 * losses["active_only"], losses
    assert losses["reactivate"] < 0.3 * losses["static"], losses


@pytest.mark.parametrize("criterion", ["magnitude", "gradient"])
def test_drop_criterion_decides_which_entries_leave(criterion):
    torch.manual_seed(1)
    layer = SEFTLinear(torch.nn.Linear(16, 16), "default", SEFTConfig(init_weights=False), num_trainable=40)
    before = layer.seft_values["default"].detach().abs().clone()
    config = SEFTConfig(drop_criterion=criterion, growth_statistic="consistent")
    _, changed, window = window_round(layer, 0.25, config, steps=3)
    assert 0 < int(changed.sum()) <= 10
    keys = before if criterion == "magnitude" else window.growth("consistent")[0]
    due = set(keys.argsort()[:10].tolist())  # the 10 smallest keys; the keep rule may re-grow some of them
    assert set(changed.nonzero().squeeze(1).tolist()) <= due
