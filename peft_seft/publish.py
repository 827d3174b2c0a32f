"""``seft push``: publish a SEFT run on the Hugging Face Hub so that others can load it.

The pruned base goes to ``--base-repo`` (a plain sparse transformers repo), the adapter to ``--adapter-repo`` with
``base_model`` naming that repo, and the merged model to ``--merged-repo``. Every repo id is checked before anything
is loaded or created.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import loading
from .hub import push_adapter, push_sparse_model, require_repo_id
from .merging import MergeCheck
from .pruning import sparsity_report

logger = logging.getLogger("peft_seft.cli")


def _provenance(base_dir: str) -> tuple[str | None, dict[str, Any]]:
    """The dense model a ``seft prune``/``seft repair`` base came from (if a Hub id) and how it was pruned, from the
    ``metrics.json`` written next to it."""
    for path in (Path(base_dir) / "metrics.json", Path(base_dir).parent / "metrics.json"):
        if path.is_file():
            metrics = json.loads(path.read_text())
            model = (
                loading.hub_base_id(None) if metrics.get("model") == loading.EMBEDDED_MODEL else metrics.get("model")
            )
            pruning = metrics.get("settings", {}).get("pruning", {})
            how = {"pruning": ", ".join(f"{k}={v}" for k, v in pruning.items())} if pruning else {}
            return loading.hub_repo_id(model), how
    return None, {}


def _options(args) -> dict[str, Any]:
    return {
        "token": args.token,
        "private": args.private,
        "revision": args.revision,
        "create_pr": args.create_pr,
        "commit_message": args.commit_message,
    }


def publish_run(args) -> int:
    if not (args.base_repo or args.adapter_repo or args.merged_repo):
        raise ValueError("Nothing to publish: pass --base-repo, --adapter-repo and/or --merged-repo.")
    fix = "pass owner/name."
    for flag in ("base_repo", "adapter_repo", "merged_repo", "origin_model"):
        if getattr(args, flag):
            require_repo_id(getattr(args, flag), f"--{flag.replace('_', '-')}", fix)
    config = loading.adapter_config(args.adapter)
    base = args.model or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"The adapter {args.adapter} names no base model in its config; pass --model.")
    base_repo = args.base_repo or loading.hub_repo_id(base)
    if args.adapter_repo and base_repo is None:
        raise ValueError(
            f"The adapter's base is the local path {base!r}; pass --base-repo owner/name to publish it too (the "
            "adapter loads only onto those exact pruned weights)."
        )
    origin, how = _provenance(base) if Path(base).is_dir() else (None, {})
    origin = args.origin_model or origin
    model, tokenizer = loading.load_model(base, args.dtype, args.device)
    pattern = config.get("pattern")
    base_report = sparsity_report(model, pattern)
    options = _options(args)
    if args.base_repo:
        title = f"{base_report.sparsity:.0%} sparse {model.config.model_type} (pruned base for SEFT)"
        push_sparse_model(model, args.base_repo, tokenizer, origin, title, how, pattern, **options)
        print(f"Published the pruned base: {args.base_repo}")
    peft_model = loading.load_adapter(model, args.adapter)
    if args.adapter_repo:
        push_adapter(peft_model, args.adapter_repo, base_repo, **options)
        print(f"Published the SEFT adapter: {args.adapter_repo} (base_model {base_repo})")
    if args.merged_repo:
        merged = peft_model.merge_and_unload()
        check = MergeCheck(base_report, sparsity_report(merged, pattern, [layer.name for layer in base_report.layers]))
        if check.failed:
            raise ValueError(f"Not publishing the merged model: {check.summary()}")
        how = {**how, "repair": f"SEFT adapter {args.adapter_repo or args.adapter} merged into the pruned base"}
        if base_repo:
            how["pruned base"] = base_repo
        title = f"{check.merged.sparsity:.0%} sparse {merged.config.model_type}, repaired with SEFT"
        push_sparse_model(merged, args.merged_repo, tokenizer, origin, title, how, pattern, **options)
        print(f"Published the merged model: {args.merged_repo}. {check.summary()}")
    return 0
