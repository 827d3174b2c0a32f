"""The SEFT linear operation: a dense matmul with the effective weight plus a sampled value gradient.

The effective weight W = (W0 with P zeroed) + scatter(T, delta) is written into the base weight in place
(see layer.py), so forward and the input gradient cost exactly what the frozen layer costs. The only
extra work is the value gradient dL/d delta_t = (dL/dY)^T X at the K positions of T: a sampled
dense-dense product (SDDMM, see value_grad.py), never kept as a dense weight gradient. Inside a gradient
window an optional collector also receives the output gradient, the inputs and the sampled gradients, to gather
O(K) statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .value_grad import SamplePattern, sampled_gradient

# Called in backward with the output gradient (N, out), the inputs (N, in) and the sampled gradient of every pattern.
GradientCollector = Callable[[torch.Tensor, torch.Tensor, list], None]


class _SEFTLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, patterns, collector, *values):
        compute_dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
        )
        x_c = x.to(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x_c, weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype))
        ctx.weight, ctx.patterns, ctx.collector = weight, patterns, collector
        ctx.value_sizes = [v.numel() for v in values]
        ctx.has_bias = bias is not None
        need_inputs = collector is not None or any(ctx.needs_input_grad[5:]) or ctx.needs_input_grad[1]
        ctx.save_for_backward(x_c if need_inputs else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (x_c,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        x_2d = x_c.reshape(-1, x_c.shape[-1]) if x_c is not None else None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_2d.T @ x_2d.to(grad_2d.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        # A pattern may sample more positions than its values (a gradient window's candidates after T): one product
        # serves both, and the values take the leading entries.
        sampled = [
            sampled_gradient(grad_2d, x_2d, pattern) if needed else None
            for pattern, needed in zip(ctx.patterns, ctx.needs_input_grad[5:], strict=True)
        ]
        if ctx.collector is not None:
            ctx.collector(grad_2d, x_2d, sampled)
        grad_values = [None if g is None else g[:size] for g, size in zip(sampled, ctx.value_sizes, strict=True)]
        return (grad_x, grad_weight, grad_bias, None, None, *grad_values)


def seft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: list[torch.Tensor],
    patterns: list[SamplePattern],
    collector: GradientCollector | None = None,
) -> torch.Tensor:
    """``x @ weight.T + bias`` where ``weight`` (out, in) already holds the effective weight.

    ``values[i]`` receives the gradient at the first ``values[i].numel()`` positions of ``patterns[i]`` (a pattern may
    hold more, for the collector); the weight itself is not saved for backward, so
    it may be rewritten in place between calls (it is read again in backward).
    """
    return _SEFTLinear.apply(x, weight, bias, tuple(patterns), collector, *values)
