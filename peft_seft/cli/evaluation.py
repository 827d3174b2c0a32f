"""Held-out perplexity of a causal language model."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..pruning.calibration import token_stream


def _eval_windows(stream: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Full windows of ``seq_len`` tokens in batches-ready form, plus the trailing partial window (if >= 2 tokens)."""
    full = stream.numel() // seq_len
    parts = [stream[: full * seq_len].reshape(full, seq_len)] if full else []
    tail = stream[full * seq_len :]
    if tail.numel() >= 2:
        parts.append(tail.unsqueeze(0))
    return parts


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer_or_ids: Any,
    texts: Sequence[str] | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    show_progress: bool = True,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``texts`` (or over given token ids).

    Pass either a tokenizer and ``texts`` (tokenized without special tokens and concatenated with EOS between
    documents) or token ids as ``tokenizer_or_ids`` (a 1-D stream, or 2-D rows that are concatenated) and no texts.
    The stream is cut into consecutive non-overlapping windows of ``seq_len`` tokens (the last one may be shorter);
    every token of a window except its first is predicted from the tokens before it in that window.
    """
    if isinstance(tokenizer_or_ids, torch.Tensor):
        if texts is not None:
            raise ValueError("Pass either token ids or a tokenizer with texts, not token ids and texts.")
        stream = tokenizer_or_ids.reshape(-1).long()
    else:
        if texts is None:
            raise ValueError("perplexity needs texts when given a tokenizer.")
        stream = token_stream(texts, tokenizer_or_ids)
    if stream.numel() < 2:
        raise ValueError("perplexity needs at least two tokens of evaluation text.")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")

    device = next(model.parameters()).device
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    batches = [batch for part in _eval_windows(stream, seq_len) for batch in part.split(batch_size)]
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not show_progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, **extra).logits[:, :-1].float()
            targets = batch[:, 1:]
            total_nll += float(
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            )
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
