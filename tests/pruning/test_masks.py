"""Properties of the plain tensor pruning criteria (no model involved)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_seft.pruning.masks import magnitude_mask, num_to_prune, sparsegpt_prune, wanda_mask
from peft_seft.utils.sparsity import nm_group_counts, parse_nm_pattern

PROPERTY = settings(max_examples=40, deadline=None)


def random_layer(out_features: int, in_features: int, seed: int, tokens: int | None = None):
    """Weight, calibration inputs with correlated columns of very different norms, their Hessian and column norms."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * in_features
    mixing = torch.randn(in_features, in_features, generator=g) * torch.randn(in_features, generator=g).exp()
    x = torch.randn(tokens, in_features, generator=g) @ mixing
    weight = torch.randn(out_features, in_features, generator=g)
    return weight, x, 2 / tokens * x.T @ x, (x * x).sum(0)


def prune_all(weight, x, hessian, sq_norms, blocksize=128, **pattern):
    return {
        "magnitude": weight * magnitude_mask(weight, **pattern),
        "wanda": weight * wanda_mask(weight, sq_norms, **pattern),
        "sparsegpt": sparsegpt_prune(weight, hessian, blocksize=blocksize, **pattern),
    }


@PROPERTY
@given(
    out_features=st.integers(1, 8),
    in_features=st.integers(1, 40),
    sparsity=st.floats(0, 0.99),
    blocksize=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_unstructured_counts_are_exact(out_features, in_features, sparsity, blocksize, seed):
    weight, x, hessian, sq_norms = random_layer(out_features, in_features, seed)
    pruned = prune_all(weight, x, hessian, sq_norms, blocksize=blocksize, sparsity=sparsity)
    kept_per_row = in_features - num_to_prune(in_features, sparsity)
    for method in ("magnitude", "wanda"):
        assert (pruned[method] != 0).sum(1).tolist() == [kept_per_row] * out_features, method
    numel = out_features * in_features
    assert int((pruned["sparsegpt"] != 0).sum()) == numel - num_to_prune(numel, sparsity)


@PROPERTY
@given(
    out_features=st.integers(1, 8),
    groups=st.integers(1, 6),
    pattern=st.sampled_from(["1:2", "2:4", "1:4", "3:4", "4:8", "2:8"]),
    blocksize=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_nm_groups_are_exact_for_every_method(out_features, groups, pattern, blocksize, seed):
    n, m = parse_nm_pattern(pattern)
    weight, x, hessian, sq_norms = random_layer(out_features, groups * m, seed)
    for method, pruned in prune_all(weight, x, hessian, sq_norms, blocksize=blocksize, nm=(n, m)).items():
        assert (nm_group_counts(pruned, m) == n).all(), method


@PROPERTY
@given(out_features=st.integers(1, 8), in_features=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_masks_keep_the_highest_scores_of_each_row(out_features, in_features, seed):
    weight, x, hessian, sq_norms = random_layer(out_features, in_features, seed)
    for keep, scores in (
        (magnitude_mask(weight, 0.5), weight.abs()),
        (wanda_mask(weight, sq_norms, 0.5), weight.abs() * sq_norms.sqrt()),
    ):
        lowest_kept = scores.masked_fill(~keep, float("inf")).min(1).values
        highest_pruned = scores.masked_fill(keep, float("-inf")).max(1).values
        assert (lowest_kept >= highest_pruned).all()


@PROPERTY
@given(out_features=st.integers(1, 8), groups=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_sparsegpt_with_identity_hessian_is_magnitude_pruning(out_features, groups, seed):
    # Uncorrelated inputs of equal norm: nothing to compensate, and w^2/diag(Hinv)^2 ranks like |w|.
    weight = torch.randn(out_features, groups * 4, generator=torch.Generator().manual_seed(seed))
    identity = torch.eye(groups * 4)
    assert torch.equal(sparsegpt_prune(weight, identity, nm=(2, 4)), weight * magnitude_mask(weight, nm=(2, 4)))
    flat = weight.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[flat.abs().argsort()[: num_to_prune(flat.numel(), 0.5)]] = False
    assert torch.equal(sparsegpt_prune(weight, identity, 0.5), weight * keep.reshape(weight.shape))


def test_wanda_equals_magnitude_only_when_input_norms_are_equal():
    weight, x, hessian, sq_norms = random_layer(16, 64, seed=0)
    assert torch.equal(wanda_mask(weight, torch.full((64,), 3.0), 0.5), magnitude_mask(weight, 0.5))
    assert not torch.equal(wanda_mask(weight, sq_norms, 0.5), magnitude_mask(weight, 0.5))


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"nm": (2, 4)}], ids=["50%", "70%", "2:4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_sparsegpt_then_wanda_then_magnitude(pattern, seed):
    weight, x, hessian, sq_norms = random_layer(32, 256, seed, tokens=1024)
    errors = {
        method: float((x @ (weight - pruned).T).norm())
        for method, pruned in prune_all(weight, x, hessian, sq_norms, **pattern).items()
    }
    assert errors["sparsegpt"] < 0.95 * errors["wanda"] < 0.95 * errors["magnitude"], errors


def test_sparsegpt_handles_dead_inputs_and_keeps_dtype():
    weight, x, _, _ = random_layer(8, 32, seed=3)
    x[:, :4] = 0  # inputs that never fire: zero Hessian rows
    hessian = 2 / x.shape[0] * x.T @ x
    pruned = sparsegpt_prune(weight.to(torch.bfloat16), hessian, 0.5)
    assert pruned.dtype == torch.bfloat16
    assert int((pruned != 0).sum()) == 8 * 32 // 2
    assert torch.isfinite(pruned.float()).all()


def test_unstructured_without_sparsity_is_an_error():
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(torch.ones(2, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        sparsegpt_prune(torch.ones(2, 6), torch.eye(6), nm=(2, 4))
