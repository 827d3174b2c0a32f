"""Which modules SEFT (and the pruning tools) adapt by default.

The default is every linear projection inside the repeated transformer blocks: modules whose name
contains a numbered segment (``model.layers.3.mlp.up_proj``, ``transformer.h.0.attn.c_attn``,
``encoder.layer.1.output.dense``). That rule never selects the LM head, the embeddings, a pooler or a
classification head, and it works for architectures PEFT has no mapping for.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)
_BLOCK_SEGMENT = re.compile(r"(^|\.)\d+\.")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_supported_layer(name: str, module: nn.Module) -> None:
    """Refuse a target SEFT cannot adapt: not nn.Linear/Conv1D, or (e.g. bitsandbytes' Linear4bit, an int8 or fp8
    layer) a weight that is not a plain float tensor of the layer's logical shape, which SEFT writes in place."""
    weight = getattr(module, "weight", None)
    if is_linear(module) and type(weight) in (torch.Tensor, nn.Parameter) and type(weight.data) is torch.Tensor:
        linear = isinstance(module, nn.Linear)
        expected = (module.out_features, module.in_features) if linear else (module.nx, module.nf)
        if weight.dtype in _FLOAT_DTYPES and tuple(weight.shape) == expected:
            return
    found = type(module).__name__
    if isinstance(weight, torch.Tensor):
        found += f" with a {type(weight).__name__} weight of dtype {weight.dtype} and shape {tuple(weight.shape)}"
    raise ValueError(
        f"SEFT cannot adapt {name!r} ({found}): it needs an nn.Linear or transformers Conv1D layer whose weight is a "
        "plain float tensor (float32, float16, bfloat16 or float64) of shape (out_features, in_features). Quantized "
        "layers (bitsandbytes 4/8-bit, GPTQ, AWQ, fp8, ...) are not supported: load the model without quantization (or "
        f"call model.dequantize() first), or leave the layer out with exclude_modules=[{name!r}] or target_modules."
    )


def default_target_pattern(model: nn.Module) -> str:
    """A regex (PEFT's ``target_modules`` string form) matching every linear layer inside numbered blocks."""
    block_linears = [
        name for name, module in model.named_modules() if is_linear(module) and _BLOCK_SEGMENT.search(name)
    ]
    # An already adapted layer is named "<name>.base_layer": target the adapted layer itself.
    leaf_names = sorted({name.removesuffix(".base_layer").rsplit(".", 1)[-1] for name in block_linears})
    if not leaf_names:
        raise ValueError(
            "Could not find any linear layer inside numbered transformer blocks of this model; "
            "pass `target_modules` explicitly (a list of module names, a regex, or 'all-linear')."
        )
    return rf".*\.\d+\.(?:.*\.)?(?:{'|'.join(re.escape(n) for n in leaf_names)})"


def find_target_linears(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Module]:
    """Name -> module for the linear layers matching ``pattern`` (default: :func:`default_target_pattern`)."""
    pattern = pattern or default_target_pattern(model)
    return {name: module for name, module in model.named_modules() if is_linear(module) and re.fullmatch(pattern, name)}
