"""Publishing a SEFT run on the Hub: ``peft_seft.publish`` lives in :mod:`peft_seft.cli.publish`.

This old path keeps working: the module only re-exports; see ARCHITECTURE.md (public paths).
"""

from .cli.publish import publish, publish_run

__all__ = ["publish", "publish_run"]
