"""SEFT options for TRL's script flow: ``peft_seft.trl_args`` lives in :mod:`peft_seft.tuner.trl_args`.

This old path keeps working: the module only re-exports; see ARCHITECTURE.md (public paths).
"""

from .tuner.trl_args import SEFTArguments, get_seft_config

__all__ = ["SEFTArguments", "get_seft_config"]
