"""N:M sparsity that evolves: in-group re-activation keeps every group's count (hypothesis), clear errors for a base
that is not N:M, exact N:M after merge, the export report, and re-activation beating frozen-topology N:M."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

from peft_seft import SEFTConfig, SEFTLayer, SEFTLinear
from peft_seft.evolution.nm_rounds import evolve_nm, nm_group_of, nm_group_positions
from peft_seft.evolution.rounds import Candidates
from peft_seft.export.semi_structured import nm_compliance, to_semi_structured
from peft_seft.testing import VOCAB, tiny_llama
from peft_seft.utils.sparsity import logical_weight, nm_group_counts, parse_nm_pattern
from peft_seft.utils.targets import find_target_linears
from tests.evolution.test_rounds import train_student, window_round

PATTERNS = ["1:2", "2:4", "4:8", "1:4"]


def nm_base(out_features: int, in_features: int, pattern: str, generator: torch.Generator, extra_zeros: float = 0.0):
    """A random weight with exactly N non-zeros per group of M (fewer where ``extra_zeros`` removes some)."""
    n, m = parse_nm_pattern(pattern)
    weight = torch.randn(out_features, in_features, generator=generator)
    scores = torch.rand(out_features, in_features // m, m, generator=generator)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, dim=2).indices, True)
    keep &= torch.rand(keep.shape, generator=generator) >= extra_zeros
    return weight * keep.reshape(out_features, in_features)


def nm_prune_(model: nn.Module, pattern: str = "2:4") -> nn.Module:
    """Keep the N largest |W| of every group of M consecutive inputs in every default target layer."""
    n, m = parse_nm_pattern(pattern)
    with torch.no_grad():
        for module in find_target_linears(model).values():
            weight = logical_weight(module)
            groups = weight.abs().reshape(weight.shape[0], -1, m)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
            weight.mul_(keep.reshape(weight.shape))
    return model


def check_group_invariants(w0: torch.Tensor, indices: torch.Tensor, pruned: torch.Tensor, pattern: str) -> None:
    """T and P are consistent and every group holds exactly as many structurally active positions as in W0."""
    n, m = parse_nm_pattern(pattern)
    out_features, in_features = w0.shape
    flat = w0.reshape(-1)
    indices, pruned = indices.long(), pruned.long()
    assert indices.unique().numel() == indices.numel()
    assert pruned.unique().numel() == pruned.numel() <= indices.numel()
    assert not torch.isin(pruned, indices).any()
    assert (flat[pruned] != 0).all()
    active = flat != 0
    active[pruned] = False
    active[indices] = True
    assert torch.equal(active.reshape(out_features, in_features // m, m).sum(-1), nm_group_counts(w0, m))
    assert int(active.sum()) == int((flat != 0).sum())
    # Per group |P & g| == |T & zero(W0) & g|.
    groups = out_features * in_features // m
    pruned_per_group = torch.bincount(nm_group_of(pruned, in_features, m), minlength=groups)
    reactivated = indices[flat[indices] == 0]
    assert torch.equal(pruned_per_group, torch.bincount(nm_group_of(reactivated, in_features, m), minlength=groups))


def check_layer(layer: SEFTLinear, pattern: str, name: str = "default") -> None:
    w0 = layer.effective_weight([])
    check_group_invariants(w0, layer.seft_indices[name], layer.pruned_positions(name), pattern)
    n, m = parse_nm_pattern(pattern)
    assert (nm_group_counts(layer.effective_weight([name]), m) <= n).all()


def test_group_helpers():
    # in = 8, M = 4: positions 0..3 group 0, 4..7 group 1, 8..11 group 2 (row 1).
    positions = torch.tensor([0, 3, 4, 7, 8, 15])
    assert nm_group_of(positions, 8, 4).tolist() == [0, 0, 1, 1, 2, 3]
    assert nm_group_positions(torch.tensor([1, 2]), 8, 4).tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]


# One row, in = 8, 2:4. Group 0 = positions 0..3, group 1 = 4..7.
W0 = torch.tensor([0.0, 0.0, 0.5, 3.0, 1.0, 0.0, 2.0, 0.0])


def round_on(
    weight0, indices, values, pruned=(), grow=(), prune=(), restore=(), num_drop=1, grow_pruned=True, column_scale=None
):
    """Run evolve_nm on a one-row layer given W0 (flat), T, delta, P and (position, score) candidate lists."""
    indices, values = torch.tensor(indices), torch.tensor(values)
    pruned = torch.tensor(pruned, dtype=torch.long)
    weight = weight0.clone()
    weight[pruned] = 0
    weight[indices] += values

    def as_candidates(pairs) -> Candidates:
        if not pairs:
            return Candidates.empty()
        return Candidates(torch.tensor([p for p, _ in pairs]), torch.tensor([s for _, s in pairs]))

    result = evolve_nm(
        indices=indices,
        drop_keys=values.abs(),
        pruned=pruned,
        zero_in_base=weight0[indices] == 0,
        weight=weight,
        in_features=weight0.numel(),
        m=4,
        grow=as_candidates(grow),
        prune=as_candidates(prune),
        restore_scores=torch.tensor(restore),
        num_drop=num_drop,
        grow_pruned=grow_pruned,
        column_scale=column_scale,
    )
    check_group_invariants(weight0.view(1, -1), result.indices, result.pruned, "2:4")
    return result


def test_reactivation_prunes_the_least_sensitive_frozen_weight_of_its_group():
    # T = {4} (dropped); position 0 (group 0) is grown: group 0's frozen weights are 2 and 3. The sensitivity window
    # knows 3 only, so 3 pays although |W0[2]| is smaller; position 4 of group 1 cannot pay for group 0.
    result = round_on(W0, [4], [0.01], grow=[(0, 5.0), (6, 1.0)], prune=[(3, 0.1), (6, 0.0)])
    assert result.indices.tolist() == [0] and result.pruned.tolist() == [3]
    assert (result.counts.reactivated, result.counts.repruned, result.counts.restored) == (1, 1, 0)


def test_frozen_partner_falls_back_to_magnitude_and_wanda():
    result = round_on(W0, [4], [0.01], grow=[(0, 5.0)])
    assert result.pruned.tolist() == [2]  # |0.5| < |3.0|
    column_scale = torch.tensor([1.0, 1.0, 100.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    result = round_on(W0, [4], [0.01], grow=[(0, 5.0)], column_scale=column_scale)
    assert result.pruned.tolist() == [3]  # Wanda: 0.5 * 100 > 3.0 * 1


def test_dropped_reactivated_weight_pays_for_a_growth_in_its_group():
    # Position 1 (zero in W0) was re-activated earlier, paid for by pruning 2. Dropping it pays for growing 0.
    result = round_on(W0, [1, 6], [0.01, 0.9], pruned=[2], grow=[(0, 5.0)], restore=[1.0])
    assert result.indices.tolist() == [0, 6] and result.pruned.tolist() == [2]
    assert (result.counts.repruned, result.counts.restored) == (0, 0)


def test_unused_dropped_reactivation_restores_a_pruned_weight_of_the_same_group():
    # Earlier, 1 was re-activated by pruning 2 (group 0) and 5 by pruning 6 (group 1). Dropping 1 (and growing the
    # active 3) restores 2, of 1's group, although 6 has the larger restore score.
    result = round_on(W0, [1, 5], [0.01, 0.9], pruned=[2, 6], grow=[(3, 1.0)], restore=[0.1, 9.0])
    assert result.indices.tolist() == [3, 5] and result.pruned.tolist() == [6]
    assert result.counts.restored == 1


def test_when_every_active_weight_of_the_group_is_trainable_a_dropped_one_is_pruned():
    # Group 0's active weights 2 and 3 are both trainable; 2 is dropped and pruned to pay for growing 0.
    result = round_on(W0, [2, 3], [0.01, 0.9], grow=[(0, 5.0)])
    assert result.indices.tolist() == [0, 3] and result.pruned.tolist() == [2]
    assert result.counts.repruned == 1


def test_growth_without_a_partner_in_its_group_is_skipped():
    # Group 0 has no frozen weight and nothing dropped: 0 cannot be grown. 5 (group 1) can: its group's frozen
    # weight 6 is pruned (a frozen weight pays before the dropped trainable 4 would).
    result = round_on(W0, [2, 3, 4], [0.9, 0.9, 0.01], grow=[(0, 9.0), (5, 8.0), (6, 1.0)])
    assert result.indices.tolist() == [2, 3, 5] and result.pruned.tolist() == [6]
    # Frozen topology (the paper's N:M mode): only the active candidate may be grown.
    result = round_on(W0, [2, 3, 4], [0.9, 0.9, 0.01], grow=[(0, 9.0), (5, 8.0), (6, 1.0)], grow_pruned=False)
    assert result.indices.tolist() == [2, 3, 6] and result.pruned.tolist() == []


def test_active_growth_uses_up_the_frozen_partner():
    # Group 0 holds one frozen weight (3). Growing 3 (active) and 0 (inactive) together is impossible: 0 would need
    # 3 as its partner. The round takes 3 and the next best candidate 7, paid for by the dropped 4 (smallest delta).
    result = round_on(W0, [2, 4, 6], [0.9, 0.01, 0.02], grow=[(0, 9.0), (3, 8.0), (7, 0.5), (5, 0.1)], num_drop=2)
    assert sorted(result.indices.tolist()) == [2, 3, 7] and result.pruned.tolist() == [4]


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 6),
    groups_per_row=st.integers(1, 5),
    pattern=st.sampled_from(PATTERNS),
    extra_zeros=st.sampled_from([0.0, 0.3]),
    density=st.floats(0.05, 1.0),
    rates=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
    grow_pruned=st.booleans(),
    criterion=st.sampled_from(["sensitivity", "magnitude", "wanda"]),
    seed=st.integers(0, 2**16),
)
def test_random_rounds_keep_every_group(
    out_features, groups_per_row, pattern, extra_zeros, density, rates, grow_pruned, criterion, seed
):
    """evolve_nm on random states: every candidate of the layer scored at random, random preferred partners."""
    generator = torch.Generator().manual_seed(seed)
    m = parse_nm_pattern(pattern)[1]
    in_features = m * groups_per_row
    w0 = nm_base(out_features, in_features, pattern, generator, extra_zeros)
    flat = w0.reshape(-1)
    nonzero = flat.nonzero().squeeze(1)
    k = min(nonzero.numel(), max(1, round(density * flat.numel())))
    indices = nonzero[torch.randperm(nonzero.numel(), generator=generator)[:k]]
    values = torch.randn(k, generator=generator)
    pruned = torch.empty(0, dtype=torch.long)
    for rate in rates:
        weight = flat.clone()
        weight[pruned] = 0
        weight[indices] += values
        size = flat.numel()
        num_grow = max(k, 1)
        grow = Candidates(
            torch.randperm(size, generator=generator)[:num_grow], torch.rand(num_grow, generator=generator)
        )
        prune = Candidates(torch.randperm(size, generator=generator)[:k], torch.rand(k, generator=generator))
        result = evolve_nm(
            indices=indices,
            drop_keys=values.abs(),
            pruned=pruned,
            zero_in_base=flat[indices] == 0,
            weight=weight,
            in_features=in_features,
            m=m,
            grow=grow,
            prune=prune if criterion == "sensitivity" else Candidates.empty(),
            restore_scores=torch.rand(pruned.numel(), generator=generator),
            num_drop=int(rate * k),
            grow_pruned=grow_pruned,
            column_scale=torch.rand(in_features, generator=generator) if criterion == "wanda" else None,
        )
        check_group_invariants(w0, result.indices, result.pruned, pattern)
        counts = result.counts
        assert counts.dropped == counts.grown == int(result.changed_slots.sum()) <= int(rate * k)
        assert torch.equal(result.indices[~result.changed_slots], indices[~result.changed_slots])
        if not grow_pruned:
            assert counts.reactivated == 0 and result.pruned.numel() == 0
        indices, pruned = result.indices, result.pruned
        values = torch.where(result.changed_slots, torch.zeros_like(values), values)
        values = values + torch.randn(k, generator=generator) * 0.1


@settings(max_examples=20, deadline=None)
@given(
    out_features=st.integers(1, 8),
    groups_per_row=st.integers(1, 4),
    pattern=st.sampled_from(PATTERNS),
    density=st.floats(0.05, 0.8),
    rates=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    criterion=st.sampled_from(["sensitivity", "magnitude", "wanda"]),
    grow_pruned=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_layer_rounds_keep_the_pattern(
    out_features, groups_per_row, pattern, density, rates, criterion, grow_pruned, seed
):
    """The layer's own rounds (window statistics from random gradients) keep N:M and the exact count."""
    torch.manual_seed(seed)
    in_features = parse_nm_pattern(pattern)[1] * groups_per_row
    base = nn.Linear(in_features, out_features)
    with torch.no_grad():
        base.weight.copy_(nm_base(out_features, in_features, pattern, torch.Generator().manual_seed(seed)))
    budget = max(1, round(density * base.weight.numel()))
    layer = SEFTLinear(base, "default", SEFTConfig(init_weights=False, pattern=pattern), num_trainable=budget)
    budget = layer.seft_values["default"].numel()
    check_layer(layer, pattern)
    config = SEFTConfig(pattern=pattern, prune_criterion=criterion, grow_pruned=grow_pruned)
    for rate in rates:
        counts = window_round(layer, rate, config)[0]
        with torch.no_grad():
            layer.seft_values["default"].add_(torch.randn(budget))
        check_layer(layer, pattern)
        assert counts.dropped == counts.grown <= int(rate * budget)


def test_a_base_that_is_not_nm_fails_naming_the_first_layer_and_group():
    model = tiny_llama(sparsity=0.5)  # unstructured magnitude pruning: not 2:4
    weight = model.model.layers[0].self_attn.q_proj.weight
    row, group = (nm_group_counts(weight, 4) > 2).nonzero()[0].tolist()
    with pytest.raises(ValueError) as error:
        get_peft_model(model, SEFTConfig(pattern="2:4"))
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert f"row {row}, input columns {group * 4}..{group * 4 + 3}" in message
    assert "pattern='2:4'" in message and "pruning" in message

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 4)

    with pytest.raises(ValueError, match="layer proj has 6 inputs"):
        get_peft_model(Odd(), SEFTConfig(pattern="4:8", target_modules=["proj"]))


def test_training_a_2_4_llama_keeps_2_4_through_merge_and_export():
    model = nm_prune_(tiny_llama(sparsity=0.0), "2:4")
    before = {name: int(torch.count_nonzero(logical_weight(m))) for name, m in find_target_linears(model).items()}
    config = SEFTConfig(
        pattern="2:4",
        grow_pruned=True,  # in-group re-activation (our extension; the default with a pattern is frozen topology)
        density=0.05,
        update_interval=3,
        selection_steps=2,
        total_steps=12,
        initial_drop_rate=0.5,
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.02)
    data = torch.Generator().manual_seed(0)
    for _ in range(12):
        ids = torch.randint(0, VOCAB, (2, 12), generator=data)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reports = peft_model.base_model.evolution.reports
    assert reports and sum(report.counts.reactivated for report in reports) > 0
    assert all(report.active == report.budget for report in reports)
    for module in peft_model.modules():
        if isinstance(module, SEFTLayer):
            check_layer(module, "2:4")
    merged = peft_model.merge_and_unload()
    for name, module in find_target_linears(merged).items():
        weight = logical_weight(module)
        assert (nm_group_counts(weight, 4) <= 2).all(), name
        assert before[name] - 2 <= int(torch.count_nonzero(weight)) <= before[name], name  # a value may be exactly 0
    report = to_semi_structured(merged, "2:4", verbose=False)
    assert report.valid and report.converted == 0 and "CUDA" in report.reason
    assert len(report.layers) == len(before) and all(layer.violating_groups == 0 for layer in report.layers)
    assert "model.layers.1.mlp.down_proj" in str(report)


def test_export_reports_and_rejects_a_model_that_is_not_nm():
    model = tiny_llama(sparsity=0.5)
    report = nm_compliance(model, "2:4")
    assert not report.valid and report.layers[0].first_violation is not None
    with pytest.raises(ValueError, match=r"not 2:4 sparse: layer model\.layers\.0\.self_attn\.q_proj .* row \d+"):
        to_semi_structured(model, "2:4", verbose=False)
    report = to_semi_structured(model, "2:4", strict=False, verbose=False)
    assert not report.valid and report.converted == 0 and "INVALID" in str(report)
    with pytest.raises(ValueError, match="merge"):
        to_semi_structured(get_peft_model(nm_prune_(tiny_llama(sparsity=0.0)), SEFTConfig(pattern="2:4")))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="semi-structured sparse kernels need a CUDA GPU of compute capability 8.0+",
)
def test_export_converts_2_4_weights_on_cuda():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(128, 128)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    model = nm_prune_(Net()).half().cuda()
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    expected = model.layers[1].proj(model.layers[0].proj(x))
    report = to_semi_structured(model, "2:4", verbose=False)
    assert report.converted == 2
    actual = model.layers[1].proj(model.layers[0].proj(x))
    assert torch.allclose(actual, expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


def test_in_group_reactivation_beats_frozen_topology_nm():
    """A 2:4 base; in two groups of every row the teacher needs a weight that sits at a pruned position of that
    group. Frozen topology (the paper's N:M mode) can only train the active weights; in-group re-activation grows the
    needed weight and prunes a frozen one of the same group. Same steps, same budget, both exactly 2:4 after merge."""
    generator = torch.Generator().manual_seed(0)
    out_features, in_features = 16, 32
    base = nm_base(out_features, in_features, "2:4", generator) * 0.05
    teacher = torch.zeros(out_features, in_features)
    for row in range(out_features):
        for group in torch.randperm(in_features // 4, generator=generator)[:2].tolist():
            pruned_columns = (base[row, group * 4 : group * 4 + 4] == 0).nonzero().squeeze(1) + group * 4
            column = pruned_columns[torch.randint(pruned_columns.numel(), (1,), generator=generator)]
            teacher[row, column] = 1.0 if torch.rand(1, generator=generator) < 0.5 else -1.0
    nonzeros = int(torch.count_nonzero(base))
    common = dict(
        target_modules=["proj"],
        pattern="2:4",
        density=0.1,
        update_interval=5,
        selection_steps=3,
        total_steps=100,
        initial_drop_rate=0.5,
    )
    losses = {}
    for label, grow_pruned in {"evolving": True, "frozen_topology": False}.items():
        losses[label], merged = train_student(SEFTConfig(**common, grow_pruned=grow_pruned), base, teacher, steps=100)
        weight = logical_weight(merged.proj)
        assert (nm_group_counts(weight, 4) <= 2).all(), label
        assert nonzeros - 2 <= int(torch.count_nonzero(weight)) <= nonzeros, label
    assert losses["evolving"] < 0.1 * losses["frozen_topology"], losses  # about 0.01x measured
