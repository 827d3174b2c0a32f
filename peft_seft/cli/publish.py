"""``seft push``: publish a SEFT run on the Hugging Face Hub so that others can load it.

The pruned base goes to ``--base-repo`` (a plain sparse transformers repo), the adapter to ``--adapter-repo`` with
``base_model`` naming that repo, and the merged model to ``--merged-repo``. Every repo id is checked before anything
is created on the Hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..export.hub import push_adapter, push_sparse_model, require_repo_id
from ..export.merging import MergeCheck
from ..pruning import sparsity_report
from . import loading


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


def publish(
    pruned: Any,
    wrap: Callable[[Any], Any],
    tokenizer: Any = None,
    base_repo: str | None = None,
    adapter_repo: str | None = None,
    merged_repo: str | None = None,
    origin: str | None = None,
    how_made: dict[str, Any] | None = None,
    pattern: str | None = None,
    **options: Any,
) -> list[str]:
    """Publish the pruned model ``pruned`` to ``base_repo``, then the SEFT adapter (``wrap(pruned)`` gives the
    ``PeftModel``) to ``adapter_repo`` with ``base_model`` naming the base's repo, and the merged model to
    ``merged_repo``; ``options`` go to the push functions (token, private, revision, create_pr, commit_message).
    Every repo id is checked before anything is created. Returns one line per published repo."""
    if not (base_repo or adapter_repo or merged_repo):
        raise ValueError("Nothing to publish: name a base, adapter and/or merged repo.")
    for what, name in (("base repo", base_repo), ("adapter repo", adapter_repo), ("merged repo", merged_repo)):
        if name:
            require_repo_id(name, what, "pass owner/name.")
    if origin:
        require_repo_id(origin, "origin model", "pass the Hub id of the dense model the base was pruned from.")
    base_id = base_repo or loading.hub_repo_id(pruned.name_or_path)
    if adapter_repo and base_id is None:
        raise ValueError(
            f"The adapter's base is the local path {pruned.name_or_path!r}; pass a base repo (--base-repo) to "
            "publish it too (the adapter loads only onto those exact pruned weights)."
        )
    how_made = dict(how_made or {})
    base_report = sparsity_report(pruned, pattern)
    done = []
    if base_repo:
        title = f"{base_report.sparsity:.0%} sparse {pruned.config.model_type} (pruned base for SEFT)"
        push_sparse_model(pruned, base_repo, tokenizer, origin, title, how_made, pattern, **options)
        done.append(f"Published the pruned base: {base_repo}")
    peft_model = wrap(pruned)
    if adapter_repo:
        push_adapter(peft_model, adapter_repo, base_id, **options)
        done.append(f"Published the SEFT adapter: {adapter_repo} (base_model {base_id})")
    if merged_repo:
        merged = peft_model.merge_and_unload()
        check = MergeCheck(base_report, sparsity_report(merged, pattern, [layer.name for layer in base_report.layers]))
        if check.failed:
            raise ValueError(f"Not publishing the merged model: {check.summary()}")
        how_made["repair"] = "a SEFT adapter" + (f" ({adapter_repo})" if adapter_repo else "") + " merged into the base"
        if base_id:
            how_made["pruned base"] = base_id
        title = f"{check.merged.sparsity:.0%} sparse {merged.config.model_type}, repaired with SEFT"
        push_sparse_model(merged, merged_repo, tokenizer, origin, title, how_made, pattern, **options)
        done.append(f"Published the merged model: {merged_repo}. {check.summary()}")
    return done


def publish_run(args) -> int:
    """``seft push``: the adapter directory (or Hub id) ``--adapter`` and its base (``--model``, default: the
    adapter config's base)."""
    config = loading.adapter_config(args.adapter)
    base = args.model or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"The adapter {args.adapter} names no base model in its config; pass --model.")
    origin, how = _provenance(base) if Path(base).is_dir() else (None, {})
    model, tokenizer = loading.load_model(base, args.dtype, args.device)
    options = {
        "token": args.token,
        "private": args.private,
        "revision": args.revision,
        "create_pr": args.create_pr,
        "commit_message": args.commit_message,
    }
    for line in publish(
        model,
        lambda pruned: loading.load_adapter(pruned, args.adapter),
        tokenizer,
        args.base_repo,
        args.adapter_repo,
        args.merged_repo,
        args.origin_model or origin,
        how,
        config.get("pattern"),
        **options,
    ):
        print(line)
    return 0
