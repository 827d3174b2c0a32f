"""The value gradient of SEFT: (dL/dY)^T X at the K trainable positions only (a sampled dense-dense product, SDDMM).

Two implementations, both giving fp32 values:

- ``sampled_addmm``: ``torch.sparse.sampled_addmm`` on the CSR pattern, in fp32 (K dot products of length N; memory
  bound, but it never forms a weight-sized tensor). Inputs in bf16/fp16 are upcast first: it has no bf16 CPU kernel.
- ``dense_gather``: the dense weight gradient in the inputs' dtype (a GEMM with fp32 accumulation), formed in blocks
  of rows of at most ``DENSE_BLOCK_ELEMENTS`` and gathered at the pattern. Exact products and fp32 sums; for bf16/fp16
  inputs the block is rounded to bf16/fp16 on CPU (no fp32-output GEMM there: a relative error of at most 2^-9 per
  bf16 value, as for any weight gradient under bf16 autocast) and kept in fp32 on CUDA.

``choose_implementation`` picks one per device and dtype from the measurements in
``benchmarks/results/value_grad_kernels.md``; ``PEFT_SEFT_VALUE_GRAD`` or ``set_value_grad_implementation`` override it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cached_property

import torch

IMPLEMENTATIONS = ("sampled_addmm", "dense_gather")
ENV_VAR = "PEFT_SEFT_VALUE_GRAD"
DENSE_BLOCK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per block of the dense gradient
DENSE_DENSITY = 0.075  # CPU, fp32/fp16: from here on the GEMM wins (mixed at 5 %, GEMM at 10 %)

_override: str | None = None


@dataclass(frozen=True)
class SamplePattern:
    """The K positions of one adapter as a CSR pattern; ``order`` maps CSR slots back to value slots."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    order: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_flat(cls, flat_positions: torch.Tensor, shape: tuple[int, int]) -> SamplePattern:
        sorted_positions, order = flat_positions.long().sort()
        rows, cols = sorted_positions // shape[1], sorted_positions % shape[1]
        counts = torch.bincount(rows, minlength=shape[0])
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(crow, cols, order, shape)

    @property
    def density(self) -> float:
        return self.order.numel() / max(1, self.shape[0] * self.shape[1])

    @property
    def block_rows(self) -> int:
        """Rows of the dense gradient that ``dense_gather`` forms at once."""
        return max(1, DENSE_BLOCK_ELEMENTS // max(1, self.shape[1]))

    @cached_property
    def row_blocks(self) -> list[tuple[int, int, int, int]]:
        """(first row, end row, first CSR slot, end slot) of each block of ``block_rows`` rows.

        Cached because reading the CSR offsets on the host synchronises a GPU; patterns change only per round."""
        rows, step = self.shape[0], self.block_rows
        offsets = self.crow_indices.tolist()
        return [(r, min(r + step, rows), offsets[r], offsets[min(r + step, rows)]) for r in range(0, rows, step)]

    @cached_property
    def block_positions(self) -> torch.Tensor:
        """Flat position of each CSR slot inside its row block."""
        counts = self.crow_indices.diff()
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)
        return (rows % self.block_rows) * self.shape[1] + self.col_indices


def sampled_addmm_gradient(grad_out: torch.Tensor, inputs: torch.Tensor, pattern: SamplePattern) -> torch.Tensor:
    """``torch.sparse.sampled_addmm`` in fp32; returns the K values in CSR-slot order."""
    k = pattern.order.numel()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        template = torch.sparse_csr_tensor(
            pattern.crow_indices,
            pattern.col_indices,
            torch.zeros(k, device=grad_out.device, dtype=torch.float32),
            pattern.shape,
            check_invariants=False,
        )
    # The CPU kernel wants (out, N) and a column-major (N, in); transposing before the fp32 upcast halves the
    # copied bytes for bf16/fp16 activations.
    grad_t = grad_out.T.contiguous().float()
    inputs_t = inputs.T.contiguous().float().T
    return torch.sparse.sampled_addmm(template, grad_t, inputs_t, beta=0.0).values()


def dense_gather_gradient(grad_out: torch.Tensor, inputs: torch.Tensor, pattern: SamplePattern) -> torch.Tensor:
    """The dense gradient block by block, gathered at the pattern; returns the K values in CSR-slot order, fp32."""
    fp32_output = grad_out.is_cuda and grad_out.dtype in (torch.bfloat16, torch.float16)
    local = pattern.block_positions
    result = torch.empty(pattern.order.numel(), device=grad_out.device, dtype=torch.float32)
    for first_row, end_row, first_slot, end_slot in pattern.row_blocks:
        if first_slot == end_slot:
            continue
        grad_block = grad_out[:, first_row:end_row].T
        block = torch.mm(grad_block, inputs, out_dtype=torch.float32) if fp32_output else grad_block @ inputs
        result[first_slot:end_slot] = block.reshape(-1)[local[first_slot:end_slot]]
    return result


_KERNELS = {"sampled_addmm": sampled_addmm_gradient, "dense_gather": dense_gather_gradient}


def set_value_grad_implementation(name: str | None) -> None:
    """Force one implementation for every layer (None: back to the environment variable, then the measured rule)."""
    global _override
    if name is not None:
        _check_name(name, "set_value_grad_implementation")
    _override = name


def _check_name(name: str, source: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{source}: unknown value-gradient implementation {name!r}; choose one of {IMPLEMENTATIONS}.")
    return name


def choose_implementation(device: torch.device, dtype: torch.dtype, density: float) -> str:
    """The measured rule (``benchmarks/results/value_grad_kernels.md``), unless overridden.

    CPU: the bf16 GEMM (AMX/AVX-512 bf16, fp32 accumulation) ties with the sampled kernel plus its fp32 upcast at
    0.5 % density and is 1.5-4x faster from 1 % to 10 %; in fp32, and in fp16 (no faster GEMM than fp32 there), the
    sampled kernel wins up to 2 %, the two tie at 5 % and the GEMM wins at 10 %. CUDA (provisional, until
    ``benchmarks/gpu_check.py`` has run): the tensor-core GEMM with fp32 output for bf16/fp16, the sampled kernel for
    fp32."""
    if _override is not None:
        return _override
    if os.environ.get(ENV_VAR):
        return _check_name(os.environ[ENV_VAR], ENV_VAR)
    if dtype == torch.bfloat16 or (dtype == torch.float16 and device.type == "cuda"):
        return "dense_gather"
    if device.type == "cpu" and density >= DENSE_DENSITY:
        return "dense_gather"
    return "sampled_addmm"


def sampled_gradient(
    grad_out: torch.Tensor, inputs: torch.Tensor, pattern: SamplePattern, implementation: str | None = None
) -> torch.Tensor:
    """(grad_out^T @ inputs) at the pattern's positions, in value-slot order, fp32. Shapes (N, out), (N, in).

    ``implementation`` forces one of ``IMPLEMENTATIONS``; default ``choose_implementation``."""
    k = pattern.order.numel()
    result = torch.empty(k, device=grad_out.device, dtype=torch.float32)
    if k == 0:
        return result
    if grad_out.dtype != inputs.dtype:
        dtype = torch.promote_types(grad_out.dtype, inputs.dtype)
        grad_out, inputs = grad_out.to(dtype), inputs.to(dtype)
    name = implementation or choose_implementation(grad_out.device, grad_out.dtype, pattern.density)
    result[pattern.order] = _KERNELS[_check_name(name, "sampled_gradient")](grad_out, inputs, pattern)
    return result
