"""Sparsity helpers shared by the tuner and the pruning tools: weight orientation and N:M patterns."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as an (out_features, in_features) view (``Conv1D`` stores it transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def parse_nm_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: at most N non-zeros in every group of M consecutive input weights."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise ValueError(f"An N:M pattern must be a string like '2:4' or '4:8', got {pattern!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"An N:M pattern needs 0 < N < M, got {pattern!r}.")
    return n, m


def nm_group_counts(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros per group of ``m`` consecutive input weights; ``weight`` is (out, in), ``in`` divisible by ``m``."""
    out_features, in_features = weight.shape
    if in_features % m:
        raise ValueError(f"An N:M pattern with M={m} needs an input dimension divisible by {m}, got {in_features}.")
    return (weight != 0).reshape(out_features, in_features // m, m).sum(-1)
