"""Quantized or otherwise unsupported target layers are refused at get_peft_model, naming the layer and the fix."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_seft import SEFTConfig, SEFTLayer
from peft_seft.testing import tiny_llama

TARGET = "model.layers.1.mlp.down_proj"


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' Params4bit: two 4-bit values packed per uint8, shape (numel / 2, 1)."""


class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit (an nn.Linear subclass holding a packed quantized weight)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        packed = torch.zeros(linear.weight.numel() // 2, 1, dtype=torch.uint8)
        self.weight = Params4bit(packed, requires_grad=False)


def with_layer(make_layer) -> nn.Module:
    model = tiny_llama()
    parent, name = model.get_submodule(TARGET.rsplit(".", 1)[0]), TARGET.rsplit(".", 1)[1]
    setattr(parent, name, make_layer(getattr(parent, name)))
    return model


def int8_linear(linear: nn.Linear) -> nn.Linear:
    linear.weight = nn.Parameter(linear.weight.detach().to(torch.int8), requires_grad=False)
    return linear


@pytest.mark.parametrize(
    "make_layer, found",
    [
        (Linear4bit, "Linear4bit with a Params4bit weight of dtype torch.uint8"),
        (int8_linear, "Linear with a Parameter weight of dtype torch.int8"),
    ],
)
def test_quantized_layer_is_refused_before_anything_changes(make_layer, found):
    model = with_layer(make_layer)
    with pytest.raises(ValueError) as error:
        get_peft_model(model, SEFTConfig(density=0.05))
    message = str(error.value)
    assert f"'{TARGET}' ({found}" in message
    assert "dequantize()" in message and f"exclude_modules=['{TARGET}']" in message
    assert not any(isinstance(m, SEFTLayer) for m in model.modules())


def test_excluding_the_quantized_layer_adapts_the_rest():
    model = get_peft_model(with_layer(Linear4bit), SEFTConfig(density=0.05, exclude_modules=[TARGET]))
    adapted = {name for name, m in model.named_modules() if isinstance(m, SEFTLayer)}
    assert adapted and not any(name.endswith(TARGET) for name in adapted)


def test_a_target_that_is_not_a_linear_layer_is_refused():
    with pytest.raises(ValueError, match=r"'model.embed_tokens' \(Embedding .*nn.Linear or transformers Conv1D"):
        get_peft_model(tiny_llama(), SEFTConfig(target_modules=["embed_tokens"]))
