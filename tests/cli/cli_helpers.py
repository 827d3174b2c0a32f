"""Tiny local checkpoints and datasets for the CLI, data and hub tests (built in code, no Hub access).

A 2-layer LlamaForCausalLM (hidden 32) saved with a character-level ``PreTrainedTokenizerFast`` next to it, and a
synthetic corpus of short sentences written as .jsonl, .json, .csv or .txt files.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
VOCAB = len(SPECIAL) + 95  # printable ASCII

SUBJECTS = ["the parser", "a sparse model", "the evaluator", "every layer", "the tokenizer", "a pruned weight"]
VERBS = ["reads", "returns", "keeps", "updates", "repairs", "raises"]
OBJECTS = ["a token", "the mask", "an error", "the value", "two lists", "the gradient"]


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}a: {% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: <pad>=0, <eos>=1, <unk>=2, then printable ASCII."""
    vocab = dict(SPECIAL)
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny dense Llama and its tokenizer saved in ``directory``."""
    tiny_llama(seed).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


def documents(count: int = 60, seed: int = 0) -> list[str]:
    """Short synthetic documents of 3-6 sentences (learnable by a tiny character-level model)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(3, 6))
        ]
        docs.append(" ".join(sentences).capitalize())
    return docs


def write_chats(directory: Path, kind: str, count: int = 40) -> Path:
    """``documents()`` as a conversational (``messages``) or prompt/completion ``chats-<kind>.jsonl`` file."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"chats-{kind}.jsonl"
    rows = []
    for doc in documents(count):
        question, answer = doc.split(". ", 1) if ". " in doc else (doc, doc)
        if kind == "conversational":
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": question + "? ", "completion": answer})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_corpus(directory: Path, fmt: str, column: str = "text", count: int = 60) -> Path:
    """``documents()`` written as ``corpus.<fmt>`` (jsonl, json, csv or txt) with the text in ``column``."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = documents(count)
    path = directory / f"corpus.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({column: doc, "id": i}) + "\n" for i, doc in enumerate(docs)))
    elif fmt == "json":
        path.write_text(json.dumps([{column: doc, "id": i} for i, doc in enumerate(docs)]))
    elif fmt == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", column])
            writer.writerows([i, doc] for i, doc in enumerate(docs))
    elif fmt == "txt":
        path.write_text("\n\n".join(docs) + "\n")
    else:
        raise ValueError(fmt)
    return path


def pruned_workspace(root: Path) -> Path:
    """``root`` with a tiny Llama (``tiny/``), its 50 % magnitude-pruned copy written by ``seft prune``
    (``pruned/``) and ``corpus.jsonl``."""
    from peft_seft.cli import main

    save_tiny_llama(root / "tiny")
    write_corpus(root, "jsonl")
    argv = ["prune", "--model", str(root / "tiny"), "--method", "magnitude", "--output-dir", str(root / "pruned")]
    assert main([*argv, "--no-progress", "-q", "--threads", "1"]) == 0
    return root
