"""The value gradient's implementations: ``peft_seft.value_grad`` lives in :mod:`peft_seft.tuner.value_grad`.

This old path keeps working: the module only re-exports; see ARCHITECTURE.md (public paths).
"""

from .tuner.value_grad import (
    DENSE_BLOCK_ELEMENTS,
    DENSE_DENSITY,
    ENV_VAR,
    IMPLEMENTATIONS,
    SamplePattern,
    choose_implementation,
    dense_gather_gradient,
    sampled_addmm_gradient,
    sampled_gradient,
    set_value_grad_implementation,
)

__all__ = [
    "DENSE_BLOCK_ELEMENTS",
    "DENSE_DENSITY",
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "SamplePattern",
    "choose_implementation",
    "dense_gather_gradient",
    "sampled_addmm_gradient",
    "sampled_gradient",
    "set_value_grad_implementation",
]
