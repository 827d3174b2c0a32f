"""Regressions found by running PEFT's own generic test suite against SEFT (tests/peft_suite/run.sh)."""

from __future__ import annotations

import copy
import pickle

import torch
from peft import get_peft_model
from torch import nn

from peft_seft import SEFTConfig, SEFTLayer
from peft_seft.testing import tiny_gpt2, tiny_llama


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def two_adapter_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(MLP(), SEFTConfig(target_modules=["lin0"], density=0.2, init_weights=False, total_steps=10))
    model.add_adapter("other", SEFTConfig(target_modules=["lin1"], density=0.5, init_weights=False, total_steps=10))
    return model


def test_merge_and_unload_of_another_adapter_restores_the_in_place_weight():
    model = two_adapter_mlp()
    base_weight = model.base_model.model.lin0.base_layer.weight.detach().clone()
    model(torch.randn(3, 10))  # "default" is active: lin0's base weight holds W in place now
    merged = model.merge_and_unload(adapter_names=["other"])  # lin0 holds no "other": it must come back as W0
    assert torch.equal(merged.lin0.weight, base_weight)


def test_num_trainable_is_split_the_same_for_an_adapter_added_to_adapted_layers():
    config = SEFTConfig(target_modules=["lin0", "lin1"], num_trainable=30, total_steps=10)
    model = get_peft_model(MLP(), config)
    model.add_adapter("other", config)
    for name in ("lin0", "lin1"):
        layer = getattr(model.base_model.model, name)
        assert layer.seft_values["other"].numel() == layer.seft_values["default"].numel()
    assert model.base_model.model.lin0.seft_values["other"].numel() == 25


def adapted_blocks(model: nn.Module) -> set[str]:
    return {
        name.split(".h.")[-1].split(".layers.")[-1].split(".")[0]
        for name, m in model.named_modules()
        if isinstance(m, SEFTLayer)
    }


def test_layers_to_transform_applies_to_the_default_targets():
    for make, blocks in ((tiny_llama, "layers"), (tiny_gpt2, "h")):
        model = get_peft_model(make(), SEFTConfig(layers_to_transform=[1], density=0.05, total_steps=10))
        assert adapted_blocks(model) == {"1"}
        model = get_peft_model(make(), SEFTConfig(layers_to_transform=[0], layers_pattern=blocks, total_steps=10))
        assert adapted_blocks(model) == {"0"}
        assert len(adapted_blocks(get_peft_model(make(), SEFTConfig(total_steps=10)))) == 2


def test_pickle_and_deepcopy_bind_the_evolution_to_the_copy():
    model = two_adapter_mlp()
    x = torch.randn(3, 10)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.allclose(clone(x), expected)
        evolution = clone.base_model.evolution
        assert evolution._tuner() is clone.base_model
        assert list(evolution.trained_layers(torch.optim.SGD(clone.parameters(), lr=0.1))) == ["default"]


def test_unloaded_model_keeps_no_seft_hook_and_pickles():
    model = two_adapter_mlp()
    x = torch.randn(3, 10)
    expected = model(x)
    plain = model.merge_and_unload(adapter_names=["default"])
    assert not plain._forward_pre_hooks
    assert torch.allclose(pickle.loads(pickle.dumps(plain))(x), expected, atol=1e-6)
