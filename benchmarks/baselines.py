"""Baselines for the method comparison: SQFT-style masked LoRA ("SparsePEFT").

Masked LoRA trains a LoRA delta ``B @ A`` (rank r, scaled by ``alpha / r``) and multiplies it by the non-zero mask
of the frozen base weight, in the forward pass and in the merge, so weights that are zero in the (pruned) base stay
exactly zero after merging: ``W = W0 + mask(W0) * (alpha / r) * B @ A``. The mask is fixed when the layer is wrapped.

The masked delta is dense-shaped, so every forward builds an (out x in) tensor per layer and the backward computes
the dense gradient of that tensor (``dY^T X``); that is the inherent cost of this baseline, not an inefficiency of
this implementation. Only ``nn.Linear`` layers are supported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MaskedLoRALinear(nn.Module):
    """``y = x @ (W0 + mask * scaling * B @ A)^T + b`` with ``mask = (W0 != 0)``, fixed at construction."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MaskedLoRALinear wraps nn.Linear, got {type(base).__name__}.")
        self.base = base.requires_grad_(False)
        self.register_buffer("mask", base.weight.detach() != 0, persistent=False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT's LoRA; B = 0, so the delta starts at 0
        self.scaling = alpha / r

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight + self.delta_weight().to(self.base.weight.dtype)
        return F.linear(x, weight, self.base.bias)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the masked delta added in place (zeros of the base stay exactly zero)."""
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_masked_lora(model: nn.Module, target_modules: Sequence[str], r: int, alpha: float) -> list[str]:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name ends with one of ``target_modules``; returns the
    wrapped names. Only ``lora_A`` and ``lora_B`` of the wrappers are trainable afterwards."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, target_modules)]
    if not names:
        raise ValueError(f"No nn.Linear matches target_modules={list(target_modules)}.")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MaskedLoRALinear(getattr(parent, child), r, alpha))
    return names


def merge_masked_lora(model: nn.Module) -> nn.Module:
    """Replace every ``MaskedLoRALinear`` by its merged base ``nn.Linear`` (in place); returns ``model``."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedLoRALinear)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    return model


def masked_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors (``lora_A``/``lora_B`` of each wrapper); the mask is re-derived from the base."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
