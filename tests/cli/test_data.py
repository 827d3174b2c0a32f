"""Loading, splitting, tokenizing and chunking datasets for the ``seft`` command (peft_seft/cli/data.py)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from peft_seft.cli import data
from peft_seft.testing import chat_tokenizer, documents, write_corpus


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "txt"])
def test_local_files_split_into_disjoint_calibration_train_heldout(tmp_path, fmt):
    path = write_corpus(tmp_path, fmt, column="text" if fmt != "csv" else "body")
    splits = data.load_text_splits(str(path))  # the csv's only string column is found without --text-column
    docs = documents()
    found = [doc.strip() for doc in splits.calibration + splits.train + splits.heldout]  # .txt keeps newlines
    assert sorted(found) == sorted(docs)
    assert all(splits.as_tuple())
    chars = [sum(map(len, part)) for part in splits.as_tuple()]
    shares = [c / sum(chars) for c in chars]
    assert shares == pytest.approx([0.35, 0.45, 0.2], abs=0.03)
    assert splits.source == str(path)


def test_a_validation_split_is_the_heldout_data(tmp_path):
    docs = documents(40)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30:]))
    splits = data.load_text_splits(str(tmp_path))
    assert splits.heldout == docs[30:]
    assert sorted(splits.calibration + splits.train) == sorted(docs[:30])
    assert splits.calibration and splits.train


def test_embedded_corpus_splits():
    splits = data.load_text_splits(None)
    assert "pydoc_data" in splits.source
    parts = splits.as_tuple()
    assert all(len(part) > 5 for part in parts)
    assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2]) and not set(parts[0]) & set(parts[2])


def test_text_column_choice_and_errors(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"title": f"t{i}", "body": d}) + "\n" for i, d in enumerate(documents(10))))
    with pytest.raises(ValueError, match="pass --text-column"):
        data.load_text_splits(str(path))
    with pytest.raises(ValueError, match="has no column 'text'"):
        data.load_text_splits(str(path), text_column="text")
    assert data.load_text_splits(str(path), text_column="body").heldout


def test_missing_file_unknown_extension_and_unknown_hub_name(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="Dataset file not found"):
        data.load_text_splits(str(tmp_path / "nope.csv"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unknown extension"):
        data.load_text_splits(str(tmp_path / "data.xml"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="Could not load dataset 'owner/name'.*ConnectionError"):
        data.load_text_splits("owner/name")


def test_too_few_documents(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("one paragraph\n\nanother one\n")
    with pytest.raises(ValueError, match="at least 3 non-empty documents"):
        data.load_text_splits(str(path))


def test_split_documents_keeps_order_and_fills_every_part():
    docs = ["a" * n for n in (50, 1, 2, 3, 40, 5)]
    parts = data.split_documents(docs, (0.5, 0.3, 0.2))
    assert sorted(sum(parts, [])) == sorted(docs) and all(parts)
    for part in parts:
        assert part == [d for d in docs if d in part]


def test_token_stream_chunk_and_lm_dataset():
    tokenizer = chat_tokenizer()
    stream = data.token_stream(["ab", "cde"], tokenizer)
    assert stream.tolist() == [*tokenizer("ab")["input_ids"], tokenizer.eos_token_id, *tokenizer("cde")["input_ids"]]
    assert data.token_stream(["ab", "cde"], tokenizer, max_tokens=4).numel() == 4
    chunks = data.chunk(torch.arange(10), 4)
    assert chunks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert data.chunk(torch.arange(10), 4, max_sequences=1).shape == (1, 4)

    dataset = data.lm_dataset(documents(20), tokenizer, seq_len=16, max_sequences=5)
    assert dataset.column_names == ["input_ids"] and len(dataset) == 5
    assert all(len(row) == 16 for row in dataset["input_ids"])
    with pytest.raises(ValueError, match="fewer than --seq-len=4096 tokens"):
        data.lm_dataset(["tiny"], tokenizer, seq_len=4096)
