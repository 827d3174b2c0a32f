"""Text data for the ``seft`` command: load a dataset, split it, tokenize it and cut it into fixed-length sequences.

A dataset is the embedded Python reference corpus (``None``), a local file (``.json``, ``.jsonl``, ``.csv``,
``.txt``, ``.parquet``), a local directory, or a Hugging Face Hub dataset name, all read with
``datasets.load_dataset``. Its documents are split into disjoint calibration (for Wanda/SparseGPT), training and
held-out (evaluation only) lists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import one_line

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "pydoc_data.topics (Python reference manual, embedded)"
FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
    ".parquet": "parquet",
}
HELDOUT_SPLITS = ("validation", "valid", "test")
CALIBRATION_FRACTION, HELDOUT_FRACTION = 0.35, 0.2
STRING_DTYPES = ("string", "large_string")  # datasets reads CSV text columns as large_string


@dataclass
class TextSplits:
    """Disjoint document lists; ``source`` names the dataset for reports. For a chat dataset the documents are the
    rendered chats, and ``train_records`` holds the training split's records for SFTTrainer's own processing."""

    calibration: list[str]
    train: list[str]
    heldout: list[str]
    source: str
    train_records: list[dict[str, Any]] | None = None

    def summary(self) -> str:
        sizes = (f"{len(docs)} documents ({sum(map(len, docs)):,} characters)" for docs in self.as_tuple())
        return "calibration {}, train {}, held-out {}".format(*sizes)

    def as_tuple(self) -> tuple[list[str], list[str], list[str]]:
        return self.calibration, self.train, self.heldout


def split_documents(docs: Sequence[str], shares: Sequence[float]) -> list[list[str]]:
    """Split ``docs`` into ``len(shares)`` disjoint lists whose character counts follow ``shares``, deterministically.

    Longest document first, each goes to the list furthest below its share (ties to the earlier list); every list
    keeps the input order and gets at least one document when there are enough of them.
    """
    if len(docs) < len(shares):
        raise ValueError(f"Need at least {len(shares)} non-empty documents to split the dataset, got {len(docs)}.")
    total = sum(len(doc) for doc in docs)
    assigned = [0.0] * len(shares)
    owner = [0] * len(docs)
    order = sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i))
    for rank, index in enumerate(order):
        empty = [s for s in range(len(shares)) if assigned[s] == 0]
        if empty and len(order) - rank <= len(empty):  # the last documents go to lists that are still empty
            split = empty[0]
        else:
            split = max(range(len(shares)), key=lambda s: (shares[s] * total - assigned[s], -s))
        owner[index] = split
        assigned[split] += max(len(docs[index]), 1)
    return [[doc for doc, o in zip(docs, owner, strict=True) if o == s] for s in range(len(shares))]


def embedded_splits() -> TextSplits:
    """The Python reference manual from ``pydoc_data.topics``, split as :func:`peft_seft.embedded.split_corpus`."""
    from .embedded import python_reference_corpus, split_corpus

    docs = _unique(python_reference_corpus())  # two topics ("if", "else") share one text
    calibration, train, heldout = split_corpus(docs, CALIBRATION_FRACTION, HELDOUT_FRACTION)
    return TextSplits(calibration, train, heldout, EMBEDDED_NAME)


def _looks_like_path(name: str) -> bool:
    path = Path(name).expanduser()
    return path.exists() or path.suffix.lower() in FILE_BUILDERS or name.startswith(("/", "./", "../", "~"))


def load_raw_dataset(name: str, config_name: str | None = None) -> Any:
    """A ``datasets.DatasetDict`` from a local file, a local directory or a Hub dataset name."""
    import datasets

    path = Path(name).expanduser()
    if _looks_like_path(name):
        if not path.exists():
            raise FileNotFoundError(f"Dataset file not found: {name}")
        if path.is_dir():
            return datasets.load_dataset(str(path), config_name)
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            known = ", ".join(sorted(FILE_BUILDERS))
            raise ValueError(f"Cannot read dataset file {name}: unknown extension (use one of {known}).")
        kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
        if path.stat().st_size == 0:
            raise ValueError(f"Dataset file {name} is empty.")
        try:
            return datasets.load_dataset(builder, data_files=str(path), **kwargs)
        except Exception as error:  # noqa: BLE001 - pyarrow, pandas and datasets raise many types for a bad file
            raise ValueError(f"Cannot read dataset file {name} as {builder}: {one_line(error)}") from error
    try:
        return datasets.load_dataset(name, config_name)
    except Exception as error:  # noqa: BLE001 - the datasets library raises many kinds; all mean the same here
        raise ValueError(
            f"Could not load dataset {name!r} (not a local file or directory, and loading it as a Hugging Face Hub "
            f"dataset failed: {type(error).__name__}: {error})"
        ) from error


def chat_format(dataset: Any) -> str | None:
    """``"conversational"`` (a ``messages`` column), ``"prompt-completion"`` (``prompt`` and ``completion``
    columns), or None for plain text; TRL's SFTTrainer applies the chat template and, for prompt/completion data,
    computes the loss on the completion only."""
    columns = set(dataset.column_names)
    if "messages" in columns:
        return "conversational"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    return None


def render(record: dict[str, Any], tokenizer: Any) -> str:
    """A chat record as the text the model sees (for calibration and held-out perplexity)."""
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):  # conversational prompt/completion
        return tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    return prompt + completion


def _chat_documents(dataset: Any, kind: str, tokenizer: Any) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Rendered texts of a chat dataset (unique, in order) and the record behind each text."""
    if tokenizer is None:
        raise ValueError("A chat dataset needs the model's tokenizer to be rendered.")
    conversational = kind == "conversational" or isinstance(dataset[0]["prompt"], list)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The dataset is conversational but the tokenizer has no chat template; use a model whose tokenizer has "
            "one (an instruct model) or a plain text dataset."
        )
    columns = ["messages"] if kind == "conversational" else ["prompt", "completion"]
    records: dict[str, dict[str, Any]] = {}
    for row in dataset.select_columns(columns):
        records.setdefault(render(row, tokenizer), row)
    return list(records), records


def pick_text_column(dataset: Any, text_column: str | None) -> str:
    """``text_column`` if given (it must exist), else ``text``, else the only string column."""
    columns = list(dataset.column_names)
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"The dataset has no column {text_column!r}; its columns are {columns}.")
        return text_column
    if "text" in columns:
        return "text"
    strings = [name for name, feature in dataset.features.items() if getattr(feature, "dtype", None) in STRING_DTYPES]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"Cannot tell which column holds the text (columns: {columns}); pass --text-column.")


def _unique(docs: Sequence[str]) -> list[str]:
    """``docs`` without exact duplicates (first occurrences kept, in order), so no text is in two splits."""
    unique = list(dict.fromkeys(docs))
    if len(unique) < len(docs):
        logger.info("Dropped %d duplicate documents.", len(docs) - len(unique))
    return unique


def _texts(dataset: Any, column: str) -> list[str]:
    return _unique([text for text in dataset[column] if isinstance(text, str) and text.strip()])


def load_text_splits(
    dataset: str | None = None, text_column: str | None = None, config_name: str | None = None, tokenizer: Any = None
) -> TextSplits:
    """Calibration, train and held-out documents of ``dataset`` (``None``: the embedded Python reference manual).

    A dataset with a ``validation``/``valid``/``test`` split uses it as held-out data and splits its ``train`` split
    (or first split) into calibration and train documents; a dataset with a single split is split three ways
    (35 % / 45 % / 20 % of the characters). A chat dataset (``messages``, or ``prompt`` and ``completion``
    columns) is rendered with ``tokenizer``'s chat template for calibration and evaluation.
    """
    if dataset is None:
        return embedded_splits()
    raw = load_raw_dataset(dataset, config_name)
    names = list(raw.keys())
    heldout_name = next((name for name in HELDOUT_SPLITS if name in names), None)
    train_name = "train" if "train" in names else next(name for name in names if name != heldout_name)
    if raw[train_name].num_rows == 0:
        raise ValueError(f"Dataset {dataset} has no rows.")
    kind = None if text_column else chat_format(raw[train_name])
    records: dict[str, dict[str, Any]] = {}
    if kind:
        docs, records = _chat_documents(raw[train_name], kind, tokenizer)
    else:
        column = pick_text_column(raw[train_name], text_column)
        docs = _texts(raw[train_name], column)
    if heldout_name is not None and heldout_name != train_name:
        seen = set(docs)
        if kind:
            heldout_docs = _chat_documents(raw[heldout_name], kind, tokenizer)[0]
        else:
            heldout_docs = _texts(raw[heldout_name], pick_text_column(raw[heldout_name], column))
        heldout = [d for d in heldout_docs if d not in seen]
        calibration_share = CALIBRATION_FRACTION / (1 - HELDOUT_FRACTION)
        calibration, train = split_documents(docs, (calibration_share, 1 - calibration_share))
    else:
        shares = (CALIBRATION_FRACTION, 1 - CALIBRATION_FRACTION - HELDOUT_FRACTION, HELDOUT_FRACTION)
        calibration, train, heldout = split_documents(docs, shares)
    if not heldout:
        raise ValueError(f"The held-out split {heldout_name!r} of dataset {dataset!r} has no text.")
    return TextSplits(calibration, train, heldout, dataset, [records[d] for d in train] if kind else None)


def token_stream(
    texts: Iterable[str], tokenizer: Any, max_tokens: int | None = None, batch_size: int = 64
) -> torch.Tensor:
    """Token ids of ``texts`` concatenated with EOS between documents, no other special tokens, tokenizing only as
    many documents as needed for ``max_tokens`` (all when ``None``)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        for row in tokenizer(texts[start : start + batch_size], add_special_tokens=False)["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(row)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def chunk(stream: torch.Tensor, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping sequences of ``seq_len`` tokens (the incomplete tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {seq_len}.")
    count = stream.numel() // seq_len
    if max_sequences is not None:
        count = min(count, max_sequences)
    return stream[: count * seq_len].reshape(count, seq_len)


def lm_dataset(texts: Sequence[str], tokenizer: Any, seq_len: int, max_sequences: int | None = None) -> Any:
    """A pre-tokenized ``datasets.Dataset`` (``input_ids`` column) of full-length sequences for causal LM training."""
    from datasets import Dataset

    max_tokens = None if max_sequences is None else max_sequences * seq_len
    sequences = chunk(token_stream(texts, tokenizer, max_tokens), seq_len, max_sequences)
    if sequences.shape[0] == 0:
        raise ValueError(
            f"The training data has fewer than --seq-len={seq_len} tokens; use more text or a shorter one."
        )
    return Dataset.from_dict({"input_ids": sequences.tolist()})
