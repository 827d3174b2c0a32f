"""The local stand-in for the Hub's HTTP API: ``peft_seft.hub_standin`` lives in :mod:`peft_seft.export.hub_standin`.

This old path keeps working: the module only re-exports; see ARCHITECTURE.md (public paths).
"""

from .export.hub_standin import RELATIONS, REPO_ID, HubStandIn, Repo, valid_repo_id

__all__ = ["RELATIONS", "REPO_ID", "HubStandIn", "Repo", "valid_repo_id"]
