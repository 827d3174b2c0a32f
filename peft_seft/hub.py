"""Hub publishing: ``peft_seft.hub`` lives in :mod:`peft_seft.export.hub`.

This old path keeps working: the module only re-exports; see ARCHITECTURE.md (public paths).
"""

from .export.hub import push_adapter, push_sparse_model, require_repo_id

__all__ = ["push_adapter", "push_sparse_model", "require_repo_id"]
