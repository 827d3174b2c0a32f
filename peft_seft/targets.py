"""Which modules SEFT (and the pruning tools) adapt by default.

The default is every linear projection inside the repeated transformer blocks: modules whose name
contains a numbered segment (``model.layers.3.mlp.up_proj``, ``transformer.h.0.attn.c_attn``,
``encoder.layer.1.output.dense``). That rule never selects the LM head, the embeddings, a pooler or a
classification head, and it works for architectures PEFT has no mapping for.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)
_BLOCK_SEGMENT = re.compile(r"(^|\.)\d+\.")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


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
