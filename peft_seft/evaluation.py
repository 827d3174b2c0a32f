"""Held-out perplexity: ``peft_seft.evaluation`` lives in :mod:`peft_seft.cli.evaluation`.

This old path keeps working: the module only re-exports; see ARCHITECTURE.md (public paths).
"""

from .cli.evaluation import perplexity

__all__ = ["perplexity"]
