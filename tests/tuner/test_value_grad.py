"""The value-gradient kernels against an fp64 dense reference, and how one is chosen."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_seft.tuner import value_grad
from peft_seft.tuner.sparse_ops import seft_linear
from peft_seft.tuner.value_grad import (
    ENV_VAR,
    IMPLEMENTATIONS,
    SamplePattern,
    choose_implementation,
    sampled_gradient,
    set_value_grad_implementation,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def reference_and_bound(grad_out, inputs, positions, dtype):
    """fp64 (grad_out^T inputs) at the positions, and the error allowed: fp32 accumulation over N exact products
    (N * eps32 * sum |g x|), plus one rounding of the result to ``dtype`` (a bf16/fp16 GEMM output on CPU)."""
    g, x = grad_out.double(), inputs.double()
    exact = (g.T @ x).reshape(-1)[positions]
    magnitude = (g.abs().T @ x.abs()).reshape(-1)[positions]
    bound = grad_out.shape[0] * torch.finfo(torch.float32).eps * magnitude
    if dtype != torch.float32:
        bound = bound + torch.finfo(dtype).eps * exact.abs()
    return exact, bound + 1e-30


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 48),
    out_features=st.integers(1, 24),
    in_features=st.integers(1, 24),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    implementation=st.sampled_from(IMPLEMENTATIONS),
    block_elements=st.sampled_from([1, 7, 1 << 24]),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_fp64_reference(
    n, out_features, in_features, density, dtype, implementation, block_elements, seed
):
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(n, out_features, generator=generator).to(dtype)
    inputs = torch.randn(n, in_features, generator=generator).to(dtype)
    k = round(density * out_features * in_features)
    positions = torch.randperm(out_features * in_features, generator=generator)[:k]
    original_block = value_grad.DENSE_BLOCK_ELEMENTS
    value_grad.DENSE_BLOCK_ELEMENTS = block_elements  # several row blocks, down to one row each
    try:
        pattern = SamplePattern.from_flat(positions.int(), (out_features, in_features))
        result = sampled_gradient(grad_out, inputs, pattern, implementation)
    finally:
        value_grad.DENSE_BLOCK_ELEMENTS = original_block
    assert result.dtype == torch.float32 and result.shape == (k,)
    exact, bound = reference_and_bound(grad_out, inputs, positions, dtype)
    assert ((result.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_gradients_with_each_kernel(implementation, dtype):
    torch.manual_seed(0)
    weight = torch.randn(12, 20).to(dtype)
    positions = torch.randperm(240)[:30]
    values = torch.zeros(30, requires_grad=True)
    x = torch.randn(3, 7, 20).to(dtype)
    set_value_grad_implementation(implementation)
    try:
        out = seft_linear(x, weight, None, [values], [SamplePattern.from_flat(positions, (12, 20))])
    finally:
        set_value_grad_implementation(None)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    exact, bound = reference_and_bound(grad_out.reshape(-1, 12), x.reshape(-1, 20), positions, dtype)
    assert ((values.grad.double() - exact).abs() <= bound).all()


def test_rule_and_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert choose_implementation(cpu, torch.float32, 0.01) == "sampled_addmm"
    assert choose_implementation(cpu, torch.bfloat16, 0.01) == "dense_gather"
    assert choose_implementation(cpu, torch.float16, 0.01) == "sampled_addmm"
    assert choose_implementation(cpu, torch.float32, 0.1) == "dense_gather"
    assert choose_implementation(torch.device("cuda"), torch.float16, 0.01) == "dense_gather"
    assert choose_implementation(torch.device("cuda"), torch.float32, 0.1) == "sampled_addmm"
    monkeypatch.setenv(ENV_VAR, "sampled_addmm")
    assert choose_implementation(cpu, torch.bfloat16, 0.01) == "sampled_addmm"
    set_value_grad_implementation("dense_gather")  # the module-level setting wins over the environment
    try:
        assert choose_implementation(cpu, torch.float32, 0.01) == "dense_gather"
    finally:
        set_value_grad_implementation(None)
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match="PEFT_SEFT_VALUE_GRAD: unknown value-gradient implementation 'triton'"):
        choose_implementation(cpu, torch.float32, 0.01)
    with pytest.raises(ValueError, match="unknown value-gradient implementation"):
        set_value_grad_implementation("rowwise")
