"""Turn calibration data (texts, a ``datasets.Dataset`` or token ids) into a (num_samples, seq_len) token-id tensor."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

CALIBRATION_KINDS = (
    "a list of texts (with a tokenizer), a datasets.Dataset (text column or input_ids) or a tensor of token ids"
)


def token_stream(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Tokenize ``texts`` without special tokens and concatenate them, separated by the EOS token when there is one."""
    if tokenizer is None:
        raise ValueError("Text calibration/evaluation data needs a tokenizer; pass tokenizer=... or token ids instead.")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens; a stream shorter than that is one shorter window."""
    if stream.numel() < seq_len:
        return stream.unsqueeze(0)
    count = stream.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seq_len].reshape(count, seq_len)


def _dataset_stream(dataset: Any, tokenizer: Any, text_column: str | None) -> torch.Tensor:
    columns = list(dataset.column_names)
    if text_column is None and "input_ids" in columns:
        return torch.tensor([i for row in dataset["input_ids"] for i in row], dtype=torch.long)
    if text_column is None:
        string_columns = [
            name
            for name, feature in dataset.features.items()
            if getattr(feature, "dtype", None) in ("string", "large_string")
        ]
        if "text" in columns:
            text_column = "text"
        elif len(string_columns) == 1:
            text_column = string_columns[0]
        else:
            raise ValueError(
                f"Cannot tell which column of the calibration dataset to use (columns: {columns}); "
                "give it an 'input_ids' or 'text' column, or pass text_column=..."
            )
    if text_column not in columns:
        raise ValueError(f"The calibration dataset has no column {text_column!r} (columns: {columns}).")
    return token_stream(dataset[text_column], tokenizer)


def build_calibration(
    calibration: Any,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 512,
    text_column: str | None = None,
) -> torch.Tensor:
    """Calibration token ids of shape (n, L) with ``n <= num_samples`` and ``L <= seq_len``.

    - texts (a list of strings) and datasets are tokenized, concatenated (EOS between documents) and cut into
      consecutive windows of ``seq_len`` tokens; the first ``num_samples`` windows are used;
    - a 1-D tensor is a token stream, cut the same way;
    - a 2-D tensor is (sequences, length): its first ``num_samples`` rows, truncated to ``seq_len`` tokens.
    """
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be positive, got {num_samples} and {seq_len}.")
    import datasets  # a dependency; imported here because it is slow to import

    if isinstance(calibration, (list, tuple)) and not calibration:
        raise ValueError(f"The calibration data is empty; pass {CALIBRATION_KINDS} with at least one token.")
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype.is_floating_point or calibration.dtype.is_complex or calibration.dtype == torch.bool:
            raise ValueError(f"Calibration token ids must be an integer tensor, got dtype {calibration.dtype}.")
        if calibration.dim() == 2:
            ids = calibration[:num_samples, :seq_len]
        elif calibration.dim() == 1:
            ids = windows(calibration, seq_len, num_samples)
        else:
            raise ValueError(f"Calibration token ids must be 1-D or 2-D, got shape {tuple(calibration.shape)}.")
    elif isinstance(calibration, datasets.Dataset):
        ids = windows(_dataset_stream(calibration, tokenizer, text_column), seq_len, num_samples)
    elif isinstance(calibration, (list, tuple)) and all(isinstance(text, str) for text in calibration):
        ids = windows(token_stream(calibration, tokenizer), seq_len, num_samples)
    else:
        raise ValueError(f"Calibration data must be {CALIBRATION_KINDS}; got {type(calibration).__name__}.")

    if ids.numel() == 0:
        raise ValueError(f"The calibration data is empty; pass {CALIBRATION_KINDS} with at least one token.")
    if ids.shape[0] < num_samples:
        logger.warning("Calibration: only %d sequences of %d tokens available (asked for %d).", *ids.shape, num_samples)
    return ids.long()
