"""The SQFT-style masked LoRA baseline of benchmarks/baselines.py: merging keeps the base mask, forward == merged."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from baselines import (  # noqa: E402
    MaskedLoRALinear,
    apply_masked_lora,
    masked_lora_state_dict,
    merge_masked_lora,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Linear(16, 24)
        self.down_proj = nn.Linear(24, 16, bias=False)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down_proj(torch.relu(self.up_proj(x))))


def pruned_block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    block = Block()
    with torch.no_grad():
        for linear in (block.up_proj, block.down_proj):
            linear.weight.masked_fill_(torch.rand_like(linear.weight) < 0.6, 0)
    return block


def test_merge_keeps_mask_and_forward_equals_merged_forward():
    model = pruned_block()
    zeros = {name: getattr(model, name).weight == 0 for name in ("up_proj", "down_proj")}
    wrapped = apply_masked_lora(model, ["up_proj", "down_proj"], r=3, alpha=6)
    assert wrapped == ["up_proj", "down_proj"]
    assert sorted(masked_lora_state_dict(model)) == sorted(
        f"{n}.{p}" for n in ("up_proj", "down_proj") for p in ("lora_A", "lora_B")
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(masked_lora_state_dict(model))
    with torch.no_grad():  # a non-zero delta (B starts at zero)
        for module in model.modules():
            if isinstance(module, MaskedLoRALinear):
                module.lora_B.normal_()
    x = torch.randn(7, 16)
    expected = model(x)

    merged = merge_masked_lora(copy.deepcopy(model))
    assert not any(isinstance(m, MaskedLoRALinear) for m in merged.modules())
    for name, zero in zeros.items():
        weight = getattr(merged, name).weight
        assert torch.equal(weight == 0, zero), f"{name}: merging changed the zero pattern"
        assert (weight - getattr(model, name).base.weight).abs().sum() > 0, f"{name}: merge added nothing"
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)


def test_gradients_reach_only_the_adapter_and_respect_the_mask():
    model = pruned_block(1)
    apply_masked_lora(model, ["up_proj"], r=2, alpha=2)
    layer = model.up_proj
    model(torch.randn(4, 16)).square().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None and model.head.weight.grad is None
    # The delta's gradient at masked-out positions is zero, so training can never make them non-zero.
    delta = layer.delta_weight()
    assert torch.all(delta[~layer.mask] == 0)
