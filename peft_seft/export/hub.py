"""Publish SEFT results on the Hugging Face Hub so that others can load them.

An adapter loads only onto the exact pruned weights it was trained on, so publishing it alone is not enough:

- :func:`push_sparse_model` publishes a plain transformers model (the pruned base, or the merged repaired model)
  with a card that states its sparsity per layer, the model it came from and how it was made;
- :func:`push_adapter` publishes a SEFT adapter whose ``base_model`` (card and ``adapter_config.json``) is the Hub
  repo holding its pruned base, so ``AutoPeftModelForCausalLM.from_pretrained(repo_id)`` works for anyone.

Every name that reaches the Hub's metadata must be a Hub repo id: a local path is refused before anything is created
on the Hub. ``private=None`` keeps the owner's default visibility; ``private=True`` on an existing public repo is an
error rather than a silent no-op. Files are written into a temporary folder and uploaded in one commit, so nothing
(transformers' or TRL's ``push_to_hub``) can replace our card.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from ..tuner.cards import hub_repo_id, sparse_model_card_text, write_model_card

logger = logging.getLogger(__name__)


def require_repo_id(name: str | None, what: str, fix: str) -> str:
    """``name`` if it is a Hub repo id; otherwise a ``ValueError`` that says what ``name`` is and how to fix it."""
    repo_id = hub_repo_id(name)
    if repo_id is None:
        local = bool(name) and (name.startswith(("/", ".", "~")) or Path(name).expanduser().exists())
        shown = "not set" if not name else f"the local path {name!r}" if local else repr(name)
        raise ValueError(f"The {what} is {shown}, not a Hugging Face Hub repo id ('owner/name'); {fix}")
    return repo_id


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _prepare_repo(api: Any, repo_id: str, private: bool | None, revision: str | None, create_pr: bool) -> None:
    """Create the repo (and the branch ``revision``) if needed; refuse ``private=True`` on an existing public repo."""
    from huggingface_hub.errors import RepositoryNotFoundError

    if create_pr and revision not in (None, "main"):
        raise ValueError("A pull request is always opened against main: pass either create_pr or a revision.")
    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        info = None
    if info is not None and private and not info.private:
        raise ValueError(
            f"The Hub repo {repo_id} exists and is public; private=True does not change an existing repo's "
            "visibility. Make it private in its settings on the Hub (or with huggingface_hub's "
            f"update_repo_settings({repo_id!r}, private=True)) first, or publish to another repo."
        )
    if info is None:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)


def _upload(
    api: Any,
    repo_id: str,
    folder: Path,
    private: bool | None,
    revision: str | None,
    create_pr: bool,
    commit_message: str,
) -> Any:
    _prepare_repo(api, repo_id, private, revision, create_pr)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
    )
    logger.info("Published %s: %s", repo_id, commit.pr_url or commit.commit_url)
    return commit


def push_adapter(
    peft_model: Any,
    repo_id: str,
    base_model: str | None = None,
    adapter_name: str = "default",
    extra: dict[str, Any] | None = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> Any:
    """Publish a SEFT adapter with its card to the Hub model repo ``repo_id``; returns the ``CommitInfo``.

    ``base_model`` is the Hub repo holding the exact pruned weights the adapter was trained on (publish them with
    :func:`push_sparse_model` first); default: the adapter config's ``base_model_name_or_path`` if that is a repo id.
    ``adapter_config.json`` and the card name that repo, so ``AutoPeftModelForCausalLM.from_pretrained(repo_id)``
    (after ``import peft_seft``) loads base and adapter.
    """
    config = peft_model.peft_config[adapter_name]
    repo_id = require_repo_id(repo_id, "adapter repo", "pass the Hub repo to publish to, e.g. 'me/my-seft-adapter'.")
    base_id = require_repo_id(
        base_model or config.base_model_name_or_path,
        "adapter's base model",
        "publish the pruned base first (push_sparse_model, or `seft push --base-repo`) and pass its repo id as "
        "base_model; the adapter loads only onto those exact pruned weights.",
    )
    api = _api(token)
    with tempfile.TemporaryDirectory(prefix="seft-push-") as folder:
        saved_base = config.base_model_name_or_path
        config.base_model_name_or_path = base_id  # adapter_config.json names the Hub repo, never a local path
        try:
            peft_model.save_pretrained(folder, selected_adapters=[adapter_name], save_embedding_layers=False)
        finally:
            config.base_model_name_or_path = saved_base
        path = Path(folder) / adapter_name if adapter_name != "default" else Path(folder)
        (path / "README.md").unlink(missing_ok=True)
        write_model_card(peft_model, path, adapter_name, base_id, extra, repo_id)
        return _upload(api, repo_id, path, private, revision, create_pr, commit_message or "Upload SEFT adapter")


def push_sparse_model(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    base_model: str | None = None,
    title: str | None = None,
    how_made: dict[str, Any] | None = None,
    pattern: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> Any:
    """Publish a sparse transformers model (a pruned base or a merged SEFT model) with a card stating the sparsity of
    every target layer, ``pattern`` (e.g. ``"2:4"``), the model it came from (``base_model``: a Hub repo id, or None
    when it has none) and ``how_made``. Returns the ``CommitInfo``."""
    repo_id = require_repo_id(repo_id, "model repo", "pass the Hub repo to publish to, e.g. 'me/my-sparse-model'.")
    if base_model is not None:
        base_model = require_repo_id(
            base_model, "model's base_model", "pass the Hub repo id of the model it came from, or None."
        )
    api = _api(token)
    with tempfile.TemporaryDirectory(prefix="seft-push-") as folder:
        saved_name = model.config._name_or_path
        model.config._name_or_path = repo_id
        try:
            model.save_pretrained(folder)
        finally:
            model.config._name_or_path = saved_name
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        text = sparse_model_card_text(
            model, repo_id, title or f"Sparse {model.config.model_type} model", how_made or {}, base_model, pattern
        )
        (Path(folder) / "README.md").write_text(text, encoding="utf-8")
        return _upload(
            api, repo_id, Path(folder), private, revision, create_pr, commit_message or "Upload sparse model"
        )
