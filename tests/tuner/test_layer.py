"""The SEFT layer: exact forward and gradients against a dense reference, in-place bookkeeping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from peft_seft import SEFTConfig, SEFTLinear
from peft_seft.tuner.layer import EMPTY_SLOT
from peft_seft.utils.sparsity import logical_weight


def make_layer(kind: str, dtype=torch.float32, seed: int = 0) -> SEFTLinear:
    """A 50 % sparse base layer with an 'evolved' SEFT state: some trainable positions re-activate zeros of W0,
    and as many frozen weights are in P (the invariant |P| = |T ∩ zero(W0)| holds)."""
    torch.manual_seed(seed)
    base = torch.nn.Linear(24, 16) if kind == "linear" else Conv1D(16, 24)
    with torch.no_grad():
        weight = logical_weight(base)
        weight[torch.rand_like(weight) < 0.5] = 0
    base = base.to(dtype)
    layer = SEFTLinear(base, "default", SEFTConfig(density=0.1, init_weights=False), num_trainable=38)
    flat_w0 = logical_weight(base).detach().reshape(-1)
    trainable = layer.seft_indices["default"].long()
    zeros = (flat_w0 == 0).nonzero().squeeze(1)
    zeros = zeros[~torch.isin(zeros, trainable)][:5]
    frozen = (flat_w0 != 0).nonzero().squeeze(1)
    frozen = frozen[~torch.isin(frozen, trainable)][:5]
    with torch.no_grad():
        layer.seft_indices["default"][:5] = zeros.int()
        layer.seft_pruned["default"][:5] = frozen.int()
    return layer


def reference_output(layer: SEFTLinear, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x @ W^T + b with W = (W0 with P zeroed) + scatter(T, delta), differentiable in values and x."""
    base = layer.get_base_layer()
    w0 = layer.effective_weight([]).float()
    flat = w0.reshape(-1).clone()
    flat[layer.pruned_positions("default").long()] = 0
    trainable = layer.seft_indices["default"].long()
    weight = flat.index_put((trainable,), flat[trainable] + values).reshape(w0.shape)
    return F.linear(x, weight.to(x.dtype), base.bias.to(x.dtype))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_gradients_match_dense_reference(kind):
    layer = make_layer(kind)
    x = torch.randn(3, 5, 24, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    values = layer.seft_values["default"].detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_output(layer, x_ref, values)
    ref.backward(grad_out)

    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.seft_values["default"].grad, values.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_gradients_under_bf16_autocast(base_dtype):
    layer = make_layer("linear", dtype=base_dtype)
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn_like(out, dtype=torch.float32)
    out.float().backward(grad_out)
    assert layer.seft_values["default"].dtype == torch.float32

    values = layer.seft_values["default"].detach().clone().requires_grad_(True)
    ref = reference_output(layer, x.detach().float(), values)
    ref.backward(grad_out)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(layer.seft_values["default"].grad, values.grad, rtol=3e-2, atol=5e-2)


def test_gradient_checkpointing_and_accumulation_are_exact():
    layer = make_layer("linear")
    inputs = [torch.randn(6, 24) for _ in range(2)]
    for x in inputs:  # two micro-batches accumulate into .grad
        checkpoint(layer, x, use_reentrant=False).pow(2).sum().backward()
    accumulated = layer.seft_values["default"].grad.clone()

    values = layer.seft_values["default"].detach().clone().requires_grad_(True)
    for x in inputs:
        reference_output(layer, x, values).pow(2).sum().backward()
    torch.testing.assert_close(accumulated, values.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_in_place_weight_is_restored_bit_exactly(kind):
    layer = make_layer(kind)
    original = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(5, 24)
    adapted = layer(x)
    assert not torch.equal(layer.get_base_layer().weight, original)  # W is written in place while active

    layer.enable_adapters(False)
    assert torch.equal(layer.get_base_layer().weight, original)
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x), rtol=0, atol=0)
    layer.enable_adapters(True)
    torch.testing.assert_close(layer(x), adapted, rtol=0, atol=0)

    layer.merge()
    merged_weight = layer.get_base_layer().weight.detach().clone()
    torch.testing.assert_close(layer(x), adapted, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, original)
    expected = layer.effective_weight(["default"])
    assert torch.equal(merged_weight, expected.T if kind == "conv1d" else expected)


def test_training_steps_move_the_weight_and_nothing_else():
    layer = make_layer("linear")
    optimizer = torch.optim.SGD([layer.seft_values["default"]], lr=0.1)
    w0 = layer.effective_weight([]).clone()
    for _ in range(3):
        layer(torch.randn(8, 24)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = (layer.effective_weight() != w0).reshape(-1).nonzero().squeeze(1)
    allowed = torch.cat([layer.seft_indices["default"].long(), layer.pruned_positions("default").long()])
    assert torch.isin(changed, allowed).all()
    assert layer.pruned_positions("default").numel() == 5
    assert (layer.seft_pruned["default"] == EMPTY_SLOT).sum() == layer.seft_values["default"].numel() - 5


def test_merging_nan_values_raises_peft_error():
    layer = make_layer("linear")
    with torch.no_grad():
        layer.seft_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert not layer.merged


def test_unsupported_base_layer_is_a_clear_error():
    with pytest.raises(TypeError, match="nn.Linear and transformers' Conv1D"):
        SEFTLinear(torch.nn.Embedding(4, 4), "default", SEFTConfig(), num_trainable=1)
