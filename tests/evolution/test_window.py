"""The gradient window: exact sums of optimizer-step gradients at the tracked positions, the counterexamples that
ranking by single readings got wrong, candidate choice, checkpoint entries and their validation."""

from __future__ import annotations

from dataclasses import astuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_seft import SEFTConfig, SEFTLayer
from peft_seft.evolution.rounds import drop_count
from peft_seft.evolution.window import GradientWindow
from peft_seft.testing import VOCAB, tiny_llama

KINDS = ("abs_sum", "mean_abs", "rms")  # the sensitivity statistics


def feed(
    window: GradientWindow,
    steps: list[torch.Tensor],
    weight: torch.Tensor,
    inputs: list[torch.Tensor] | None = None,
    output_grads: list[torch.Tensor] | None = None,
) -> None:
    """Run a window over optimizer steps whose dense gradients (out, in) are given (one micro-batch each), reading
    them only where the layer would: everywhere on the first micro-batch, at T and the candidates afterwards.
    ``inputs`` and ``output_grads``: each micro-batch's layer inputs (N, in) and output gradients (N, out)."""
    for number, grad in enumerate(steps):
        x = None if inputs is None else inputs[number]
        e = None if output_grads is None else output_grads[number]
        squares = [None if t is None else t.pow(2).sum(0) for t in (x, e)]
        if number == 0:
            window.select(grad, weight, torch.empty(0, dtype=torch.long), *squares)
        flat = grad.reshape(-1)
        window.add_micro_batch(flat[window.trainable], flat[window.candidates], *squares)
        window.end_step(None)


def test_pruning_ranks_by_the_whole_window_not_one_reading():
    # Position 1 reads |W*g| = 1.0, 1.0, 0.01 and position 2 reads 0.05 three times: 2 has the smaller window
    # sensitivity and must be pruned first, whichever order the readings come in.
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    for readings in ([1.0, 1.0, 0.01], [0.01, 1.0, 1.0]):
        steps = [torch.tensor([[5.0, r, 0.05, 3.0]]) for r in readings]
        window = GradientWindow(torch.tensor([0]), 0, 2, grow_pruned=True, in_features=4, out_features=1)
        feed(window, steps, weight)
        prune = window.sensitivity("abs_sum")
        assert prune.positions[prune.scores.argmin()] == 2, readings
        assert sorted(prune.scores.tolist())[0] == pytest.approx(0.15)


def test_fisher_sensitivity_keeps_a_weight_whose_gradient_changes_sign():
    # Position 1 (|W| = 2) reads g = 2, -1, 1, -2: first-order Taylor |W sum g| calls it harmless (0), but
    # removing it changes the loss at every step; position 2 (|W| = 0.5) reads 0.3 four times.
    weight = torch.tensor([[1.0, 2.0, 0.5, 1.0]])
    steps = [torch.tensor([[5.0, g, 0.3, 6.0]]) for g in (2.0, -1.0, 1.0, -2.0)]
    window = GradientWindow(torch.tensor([0]), 0, 2, grow_pruned=True, in_features=4, out_features=1)
    feed(window, steps, weight)
    scores = {kind: dict(zip(*(t.tolist() for t in astuple(window.sensitivity(kind))), strict=True)) for kind in KINDS}
    assert scores["abs_sum"] == pytest.approx({1: 0.0, 2: 0.6})
    assert scores["rms"] == pytest.approx({1: 2.0 * 2.5**0.5, 2: 0.15})  # |W| sqrt(mean g^2)
    assert min(scores["rms"], key=scores["rms"].get) == 2


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(KINDS), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_sensitivity_scores_match_a_dense_reference(kind, num_steps, seed):
    generator = torch.Generator().manual_seed(seed)
    steps = [torch.randn(3, 5, generator=generator) for _ in range(num_steps)]
    weight = torch.randn(3, 5, generator=generator)
    window = GradientWindow(torch.tensor([0]), 0, 14, grow_pruned=True, in_features=5, out_features=3)
    feed(window, steps, weight)
    stacked = torch.stack([step.reshape(-1) for step in steps]).double()
    statistic = {
        "abs_sum": stacked.sum(0).abs(),
        "mean_abs": stacked.abs().mean(0),
        "rms": stacked.pow(2).mean(0).sqrt(),
    }[kind]
    reference = weight.reshape(-1).double().abs() * statistic
    prune = window.sensitivity(kind)
    assert sorted(prune.positions.tolist()) == list(range(1, 15))  # every frozen active weight is a candidate
    torch.testing.assert_close(prune.scores.double(), reference[prune.positions], rtol=1e-5, atol=1e-7)


def test_a_spike_does_not_displace_a_consistent_larger_sum():
    # Position 1: 0.4 on each of 5 steps (sum 2.0); position 2: one spike of 0.95; position 3: noise that cancels.
    weight = torch.ones(1, 4)
    readings = [(0.4, 0.95, 0.9), (0.4, 0.0, -0.9), (0.4, 0.0, 0.9), (0.4, 0.0, -0.9), (0.4, 0.0, 0.0)]
    steps = [torch.tensor([[0.0, a, b, c]]) for a, b, c in readings]
    window = GradientWindow(torch.tensor([0]), num_grow=3, num_prune=0, grow_pruned=True, in_features=4, out_features=1)
    feed(window, steps, weight)
    _, grow = window.growth("abs_sum")
    ranked = grow.positions[grow.scores.argsort(descending=True)].tolist()
    assert ranked == [1, 2, 3]  # |sum g|: 2.0, 0.95, 0.0
    _, grow = window.growth("mean_abs")  # the alternative statistic: noise that cancels leads there
    mean_abs = dict(zip(grow.positions.tolist(), grow.scores.tolist(), strict=True))
    assert mean_abs == pytest.approx({1: 0.4, 2: 0.19, 3: 0.72})
    _, grow = window.growth("consistent")  # products of different steps: the spike scores 0, the noise below 0
    consistent = dict(zip(grow.positions.tolist(), grow.scores.tolist(), strict=True))
    assert consistent == pytest.approx({1: 3.2, 2: 0.0, 3: -3.24})


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_consistent_growth_score_is_the_sum_over_pairs_of_different_steps(num_steps, seed):
    generator = torch.Generator().manual_seed(seed)
    steps = [torch.randn(3, 5, generator=generator, dtype=torch.float64).float() for _ in range(num_steps)]
    window = GradientWindow(torch.tensor([0]), 14, 0, grow_pruned=True, in_features=5, out_features=3)
    feed(window, steps, torch.ones(3, 5))
    trainable_scores, grow = window.growth("consistent")
    stacked = torch.stack([step.reshape(-1) for step in steps]).double()
    pairs = sum(stacked[i] * stacked[j] for i in range(num_steps) for j in range(num_steps) if i != j)
    assert torch.allclose(grow.scores.double(), pairs[grow.positions], atol=1e-4)
    assert torch.allclose(trainable_scores.double(), pairs[:1], atol=1e-4)


def test_output_normalized_growth_spreads_over_outputs():
    # Row 0's output gradient has RMS 10, row 1's RMS 1; per unit of input, row 0 reads |g| 4 and 3, row 1 reads 0.9:
    # normalized by input only, both grown positions sit in row 0. Per unit of output gradient too, row 1's 0.9 (a
    # correlation of 0.9) beats row 0's 0.3 at its second position.
    grad, weight = torch.tensor([[0.0, 4.0, 3.0], [0.0, 0.0, 0.9]]), torch.ones(2, 3)
    inputs, output_grads = torch.ones(1, 3), torch.tensor([[10.0, 1.0]])
    chosen = {}
    for normalization in ("input", "input_output"):
        window = GradientWindow(
            torch.tensor([0]), 2, 0, grow_pruned=True, in_features=3, out_features=2, growth_normalization=normalization
        )
        feed(window, [grad] * 2, weight, [inputs] * 2, [output_grads] * 2)
        _, grow = window.growth("abs_sum")
        chosen[normalization] = grow.positions[grow.scores.argsort(descending=True)][:2].tolist()
    assert chosen == {"input": [1, 2], "input_output": [5, 1]}
    with pytest.raises(ValueError, match="row_sq"):
        window.select(grad, weight, torch.empty(0, dtype=torch.long), torch.ones(3))


def test_input_normalized_growth_ranks_the_gradient_per_unit_of_input():
    # Column 1 sees inputs of RMS 10 and reads |g| 5 at every step, column 2 inputs of RMS 1 and |g| 1: raw |g| grows
    # column 1 (where an Adam step of size lr moves the output 10x as far), per unit of input column 2 leads.
    grad, weight = torch.tensor([[0.0, 5.0, 1.0]]), torch.ones(1, 3)
    inputs = torch.tensor([[0.0, 10.0, 1.0]])  # one token per micro-batch: ||x_j|| = 10 and 1
    chosen = {}
    for normalization in ("none", "input"):
        window = GradientWindow(
            torch.tensor([0]), 1, 0, grow_pruned=True, in_features=3, out_features=1, growth_normalization=normalization
        )
        feed(window, [grad] * 3, weight, [inputs] * 3, [torch.ones(1, 1)] * 3)
        _, grow = window.growth("abs_sum")
        chosen[normalization] = grow.positions.tolist()
        if normalization == "input":  # |sum g| / sqrt(sum of squared inputs over the window): 3 / sqrt(3)
            assert grow.scores.tolist() == pytest.approx([3**0.5])
    assert chosen == {"none": [1], "input": [2]}
    with pytest.raises(ValueError, match="column_sq"):
        window.select(grad, weight, torch.empty(0, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["abs_sum", "mean_abs", "consistent"]),
    st.sampled_from(["input", "input_output"]),
    st.integers(2, 5),
    st.integers(0, 2**31 - 1),
)
def test_normalized_growth_scores_match_a_dense_reference(kind, normalization, num_steps, seed):
    generator = torch.Generator().manual_seed(seed)
    steps = [torch.randn(3, 5, generator=generator) for _ in range(num_steps)]
    inputs = [torch.randn(4, 5, generator=generator) * torch.tensor([0.1, 1.0, 3.0, 10.0, 0.5]) for _ in steps]
    output_grads = [torch.randn(4, 3, generator=generator) * torch.tensor([5.0, 1.0, 0.2]) for _ in steps]
    window = GradientWindow(
        torch.tensor([0]), 14, 0, grow_pruned=True, in_features=5, out_features=3, growth_normalization=normalization
    )
    feed(window, steps, torch.ones(3, 5), inputs, output_grads)
    stacked = torch.stack([step.reshape(-1) for step in steps]).double()
    divisor = torch.stack(inputs).double().pow(2).sum((0, 1)).sqrt().repeat(3)  # flat position -> its column
    if normalization == "input_output":
        divisor = divisor * torch.stack(output_grads).double().pow(2).sum((0, 1)).sqrt().repeat_interleave(5)
    raw = {
        "abs_sum": stacked.sum(0).abs() / divisor,
        "mean_abs": stacked.abs().mean(0) / divisor,
        "consistent": (stacked.sum(0).pow(2) - stacked.pow(2).sum(0)) / divisor.pow(2),
    }[kind]
    trainable_scores, grow = window.growth(kind)
    torch.testing.assert_close(grow.scores.double(), raw[grow.positions], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(trainable_scores.double(), raw[:1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalization", ["input", "input_output"])
def test_layers_choose_growth_candidates_by_normalized_gradient(normalization):
    config = SEFTConfig(
        density=0.05,
        update_interval=4,
        selection_steps=3,
        total_steps=100,
        init_weights=False,
        growth_normalization=normalization,
    )
    model = get_peft_model(tiny_llama(sparsity=0.5), config)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, SEFTLayer)}
    reference = {name: layer.effective_weight().detach().clone().requires_grad_(True) for name, layer in layers.items()}
    inputs, output_grads = {}, {}

    def keep_output_grad(name, output):
        output.register_hook(lambda grad: output_grads.update({name: grad.detach()}))

    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda _, args, name=name: inputs.update({name: args[0].detach()}))
        layer.register_forward_hook(lambda _, args, output, name=name: keep_output_grad(name, output))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    data = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step is the window's first: its only micro-batch chooses the candidates
        ids = torch.randint(0, VOCAB, (2, 10), generator=data)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dense = dense_step_gradients(model, layers, reference, [ids])
    for name, layer in layers.items():
        window = layer._windows["default"]
        x = inputs[name].reshape(-1, layer.in_features)
        divisor = x.pow(2).sum(0).sqrt()[None, :]
        if normalization == "input_output":
            divisor = divisor * output_grads[name].reshape(-1, layer.out_features).pow(2).sum(0).sqrt()[:, None]
        keys = (dense[name].abs() / divisor).reshape(-1)
        keys[window.trainable] = -1.0
        expected = keys.topk(window.num_grow).indices.sort().values
        assert torch.equal(window.candidates[window.is_grow], expected), name


def test_candidates_exclude_trainable_and_inactive_positions():
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 4.0]])
    grad = torch.tensor([[9.0, 8.0, 1.0], [7.0, 0.5, 0.1]])
    window = GradientWindow(torch.tensor([0]), 2, 2, grow_pruned=False, in_features=3, out_features=2)
    window.select(grad, weight, torch.tensor([1]))
    grow = window.candidates[window.is_grow].tolist()
    assert grow == [2, 4]  # not trainable 0, not inactive 1 and 3 (grow_pruned=False)
    prune = window.candidates[window.is_prune].tolist()
    assert prune == [4, 5]  # the two smallest |W*G| among frozen active 2, 4, 5: 1.5 and 0.4
    assert 1 in window.candidates.tolist()  # P is tracked for its restore score
    window = GradientWindow(torch.tensor([0]), num_grow=2, num_prune=0, grow_pruned=True, in_features=3, out_features=2)
    window.select(grad, weight, torch.tensor([1]))
    assert window.candidates[window.is_grow].tolist() == [1, 3]  # 8.0 and 7.0: pruned positions may grow


def test_non_finite_gradients_poison_the_window():
    window = GradientWindow(torch.tensor([0]), num_grow=1, num_prune=1, grow_pruned=True, in_features=2, out_features=2)
    feed(window, [torch.tensor([[float("nan"), 1.0], [1.0, 1.0]])], torch.ones(2, 2))
    assert not window.finite and window.steps == 0


def test_window_sums_are_exact_optimizer_step_sums_under_accumulation_and_clipping():
    model = get_peft_model(
        tiny_llama(sparsity=0.5),
        SEFTConfig(density=0.05, update_interval=4, selection_steps=3, total_steps=100, init_weights=False),
    )
    reference = {  # the dense weights W the adapter's forward uses (constant: learning rate 0)
        name: module.effective_weight().detach().clone().requires_grad_(True)
        for name, module in model.named_modules()
        if isinstance(module, SEFTLayer)
    }
    layers = {name: module for name, module in model.named_modules() if isinstance(module, SEFTLayer)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    data = torch.Generator().manual_seed(3)
    expected = {name: [] for name in layers}  # per window step: the clipped dense step gradient
    for step in range(1, 4):
        batches = [torch.randint(0, VOCAB, (2, 10), generator=data) for _ in range(3)]
        for ids in batches:
            (model(input_ids=ids, labels=ids).loss / 3).backward()
        factor = min(1.0, 0.05 / (float(torch.nn.utils.clip_grad_norm_(trainable, 0.05)) + 1e-6))
        optimizer.step()  # the window folds this step in, with the clipped value gradients' scale
        optimizer.zero_grad()
        if step >= 2:
            dense_grads = dense_step_gradients(model, layers, reference, batches)
            for name in layers:
                expected[name].append(dense_grads[name].reshape(-1) * factor)
    assert factor < 1.0  # clipping was active
    for name, layer in layers.items():
        window = layer._windows["default"]
        assert window.steps == 2 and window.candidates.numel() > 0
        positions = torch.cat([window.trainable, window.candidates])
        steps = torch.stack([g[positions] for g in expected[name]])
        torch.testing.assert_close(window.sums, steps.sum(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(window.abs_sums, steps.abs().sum(0), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(window.sq_sums, steps.pow(2).sum(0), rtol=1e-4, atol=1e-12)


def dense_step_gradients(model, layers, reference, batches) -> dict[str, torch.Tensor]:
    """The dense weight gradients of one optimizer step: the same micro-batches through a model whose SEFT layers
    are replaced by plain linear maps with the reference weights."""
    originals = {}
    for name, layer in layers.items():
        reference[name].grad = None
        originals[name] = layer.forward
        layer.forward = lambda x, weight=reference[name], layer=layer: torch.nn.functional.linear(
            x, weight, layer.get_base_layer().bias
        )
    try:
        for ids in batches:
            (model(input_ids=ids, labels=ids).loss / 3).backward()
    finally:
        for name, layer in layers.items():
            layer.forward = originals[name]
        model.zero_grad()
    return {name: reference[name].grad for name in layers}


def test_window_checkpoint_entries_round_trip_and_tampering_is_refused():
    trainable = torch.tensor([0, 5])
    window = GradientWindow(
        trainable, 2, 2, grow_pruned=True, in_features=4, out_features=2, growth_normalization="input_output"
    )
    steps = [torch.randn(2, 4) for _ in range(3)]
    feed(window, steps, torch.randn(2, 4), [torch.randn(5, 4) for _ in steps], [torch.randn(5, 2) for _ in steps])
    state = window.state_dict()
    copy = GradientWindow.from_state_dict(state, trainable, 8, torch.device("cpu"))
    names = ("candidates", "is_grow", "is_prune", "sums", "abs_sums", "sq_sums", "weight_abs")
    for name in (*names, "column_sq_sums", "row_sq_sums"):
        assert torch.equal(getattr(copy, name), getattr(window, name)), name
    assert copy.steps == 3 and copy.selected

    def tampered(**changes):
        return {**state, **changes}

    bad = {
        "candidates out of range": tampered(candidates=state["candidates"] + 100),
        "candidates unsorted": tampered(candidates=state["candidates"].flip(0)),
        "wrong sum length": tampered(sums=torch.zeros(3)),
        "non-finite sums": tampered(sq_sums=torch.full_like(state["sq_sums"], float("inf"))),
        "huge counts": tampered(meta=torch.tensor([3, 1, 1, 1, 10**12, 2])),
        "other trainable": tampered(trainable=torch.tensor([1, 5])),
        "rows that do not fit the weight": tampered(row_sq_sums=torch.ones(3)),
    }
    for entries in bad.values():
        with pytest.raises(ValueError):
            GradientWindow.from_state_dict(entries, trainable, 8, torch.device("cpu"))
    missing = dict(state)
    del missing["sums"]
    with pytest.raises(ValueError, match="missing"):
        GradientWindow.from_state_dict(missing, trainable, 8, torch.device("cpu"))


def growth_capture(candidate_factor: float, seed: int) -> float:
    """Mean over layers of: the exact window score |sum g| of the d best growth candidates the window tracked, over
    that of the exact best d positions outside T (computed densely), for a round at step 6 of random-token data."""
    config = SEFTConfig(
        density=0.05,
        update_interval=6,
        selection_steps=5,
        total_steps=100,
        init_weights=False,
        candidate_factor=candidate_factor,
    )
    model = get_peft_model(tiny_llama(sparsity=0.5, seed=seed), config)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, SEFTLayer)}
    reference = {name: layer.effective_weight().detach().clone().requires_grad_(True) for name, layer in layers.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    data = torch.Generator().manual_seed(seed + 1)
    exact = dict.fromkeys(layers, 0.0)
    for step in range(1, 6):
        batches = [torch.randint(0, VOCAB, (2, 16), generator=data) for _ in range(3)]
        for ids in batches:
            (model(input_ids=ids, labels=ids).loss / 3).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:
            for name, grad in dense_step_gradients(model, layers, reference, batches).items():
                exact[name] = exact[name] + grad.reshape(-1)
    fractions = []
    for name, layer in layers.items():
        window = layer._windows["default"]
        d = drop_count(window.trainable.numel(), model.base_model.evolution.rate_at("default", 6))
        score = exact[name].abs()
        score[window.trainable] = -1.0
        tracked = score[window.candidates[window.is_grow]]
        fractions.append(float(tracked.topk(min(d, tracked.numel())).values.sum() / score.topk(d).values.sum()))
    return sum(fractions) / len(fractions)


def test_the_default_candidate_factor_finds_most_of_the_exact_best_growth():
    # Measured (2 seeds): c=1 0.37/0.42, c=2 0.55/0.61, c=4 0.68/0.72, c=8 0.76/0.80 of the exact objective on
    # random tokens, the hardest case for choosing on one micro-batch (real text has steadier gradients).
    assert SEFTConfig().candidate_factor == 4
    for seed in (0, 1):
        default, single = growth_capture(4, seed), growth_capture(1, seed)
        assert default >= 0.6 and default > single + 0.15, (seed, default, single)
