"""Tiny models, tokenizers and data built in code (no Hub access), for peft-seft's tests, its DDP script and the
benchmarks' small runs, as ``transformers.testing_utils`` is for transformers. No pytest here.

- models: 2-layer Llama, GPT-2 and BERT models (hidden size 32-64), seeded, their block linears magnitude-pruned
  (``tiny_llama``, ``tiny_gpt2``, ``tiny_bert``; ``tiny_pruned_llama`` for training with the character tokenizer,
  ``tiny_char_llama``/``save_tiny_llama`` for checkpoints the ``seft`` command loads);
- a character-level tokenizer with pad and eos tokens (``char_tokenizer``; ``chat_tokenizer`` adds a chat template);
- data: random token ids, a tiny plain-text corpus for SFTTrainer, synthetic documents written as dataset files;
- SEFT helpers for training tests: the SEFT layers of a PeftModel, snapshots of an adapter, a CPU ``SFTConfig``.

Needs torch and transformers only; ``datasets`` and ``trl`` are imported by the functions that use them.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from .tuner.layer import SEFTLayer
from .utils.sparsity import logical_weight
from .utils.targets import find_target_linears

VOCAB = 96  # of the tiny_llama/tiny_gpt2/tiny_bert defaults
CHAR_VOCAB = 128  # of the models trained with char_tokenizer (its ids are < 98)
PAD_ID, EOS_ID = 0, 1
SPARSITY = 0.5

SENTENCES = [
    "the quick brown fox jumps over the lazy dog. ",
    "sparse models can be repaired by sparse fine-tuning! ",
    "hello world, this is a tiny character level corpus. ",
    "pruned weights may come back when they matter again. ",
]

SUBJECTS = ["the parser", "a sparse model", "the evaluator", "every layer", "the tokenizer", "a pruned weight"]
VERBS = ["reads", "returns", "keeps", "updates", "repairs", "raises"]
OBJECTS = ["a token", "the mask", "an error", "the value", "two lists", "the gradient"]

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}a: {% endif %}"
)


# ---- tokenizers -----------------------------------------------------------------------------------------------


def char_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: <pad>=0, <eos>=1, <unk>=2, printable ASCII after (ids < 98); without ``pad``:
    <eos>=0, <unk>=1, then printable ASCII."""
    specials = ["<pad>", "<eos>", "<unk>"] if pad else ["<eos>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    padding = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", **padding)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """:func:`char_tokenizer` with a one-line chat template (``u: ...<eos>a: ...<eos>``)."""
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---- models ---------------------------------------------------------------------------------------------------


def magnitude_prune_(model: nn.Module, sparsity: float = SPARSITY) -> nn.Module:
    """Zero the smallest weights of every default target layer, per layer (good enough to make a sparse base)."""
    with torch.no_grad():
        for module in find_target_linears(model).values():
            weight = module.weight
            k = int(sparsity * weight.numel())
            if k:
                threshold = weight.abs().flatten().kthvalue(k).values
                weight[weight.abs() <= threshold] = 0
    return model


def _seeded(model_class, config, seed: int, sparsity: float, eval_mode: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = model_class(config)
    if eval_mode:
        model.eval()
    return magnitude_prune_(model, sparsity)


def tiny_llama(sparsity: float = SPARSITY, seed: int = 0, *, eval_mode: bool = True, **config) -> LlamaForCausalLM:
    """A 2-layer LlamaForCausalLM (hidden 64, vocabulary VOCAB; ``config`` overrides any LlamaConfig field)."""
    defaults = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return _seeded(LlamaForCausalLM, LlamaConfig(**{**defaults, **config}), seed, sparsity, eval_mode)


def tiny_gpt2(sparsity: float = SPARSITY, seed: int = 0, *, eval_mode: bool = True, **config) -> GPT2LMHeadModel:
    """A 2-layer GPT2LMHeadModel (Conv1D layers; hidden 48, vocabulary VOCAB)."""
    defaults = dict(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return _seeded(GPT2LMHeadModel, GPT2Config(**{**defaults, **config}), seed, sparsity, eval_mode)


def tiny_bert(
    sparsity: float = SPARSITY, seed: int = 0, *, eval_mode: bool = True, masked_lm: bool = False, **config
) -> BertModel | BertForMaskedLM:
    """A 2-layer BertModel (BertForMaskedLM with ``masked_lm``; hidden 48, vocabulary VOCAB)."""
    defaults = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)
    model_class = BertForMaskedLM if masked_lm else BertModel
    return _seeded(model_class, BertConfig(**{**defaults, **config}), seed, sparsity, eval_mode)


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def tiny_pruned_llama(seed: int = 0) -> LlamaForCausalLM:
    """The Llama of the training tests: hidden 64, CHAR_VOCAB with char_tokenizer's pad and eos ids, 50 % pruned."""
    return tiny_llama(
        SPARSITY,
        seed,
        eval_mode=False,
        intermediate_size=128,
        vocab_size=CHAR_VOCAB,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
    )


def tiny_char_llama(seed: int = 0) -> LlamaForCausalLM:
    """A dense Llama (hidden 32, tied embeddings) for char_tokenizer's 98 ids: the checkpoint the CLI tests load."""
    return tiny_llama(
        0.0,
        seed,
        hidden_size=32,
        intermediate_size=64,
        vocab_size=98,  # char_tokenizer's ids
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
        tie_word_embeddings=True,
    )


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny dense Llama and its tokenizer saved in ``directory``."""
    tiny_char_llama(seed).save_pretrained(directory)
    chat_tokenizer().save_pretrained(directory)
    return directory


def nonzeros_per_layer(model: nn.Module) -> dict[str, int]:
    return {name: int(torch.count_nonzero(logical_weight(m))) for name, m in find_target_linears(model).items()}


def base_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the (pruned) weights of every block linear of a plain transformers model, keyed by name."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }


# ---- data -----------------------------------------------------------------------------------------------------


def token_ids(num_samples: int = 8, seq_len: int = 32, seed: int = 0, vocab_size: int = VOCAB) -> torch.Tensor:
    """Uniformly random token ids, (num_samples, seq_len)."""
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=torch.Generator().manual_seed(seed))


def text_dataset(num_samples: int = 32):
    """A plain-text language-modelling ``datasets.Dataset`` (SFTTrainer tokenizes it itself)."""
    from datasets import Dataset

    texts = [(SENTENCES[i % len(SENTENCES)] * 2)[: 40 + (i % 8)] for i in range(num_samples)]
    return Dataset.from_dict({"text": texts})


def token_batch(batch_size: int = 4, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids drawn from the tokenized corpus (for plain PyTorch loops)."""
    tokenizer = char_tokenizer()
    stream = tokenizer("".join(SENTENCES) * 4)["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.tensor([stream[s : s + seq_len] for s in starts.tolist()])


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
    from .cli import main

    save_tiny_llama(root / "tiny")
    write_corpus(root, "jsonl")
    argv = ["prune", "--model", str(root / "tiny"), "--method", "magnitude", "--output-dir", str(root / "pruned")]
    assert main([*argv, "--no-progress", "-q", "--threads", "1"]) == 0
    return root


# ---- SEFT training helpers ------------------------------------------------------------------------------------


def seft_layers(model: nn.Module) -> dict[str, SEFTLayer]:
    """SEFT layers of a PeftModel keyed by the name of the base model's module (``model.layers.0...``)."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, SEFTLayer)
    }


def adapter_snapshot(model: nn.Module, adapter_name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of every layer's positions T, pruned positions P, values and step counter."""
    return {
        name: {
            "indices": layer.seft_indices[adapter_name].detach().cpu().clone(),
            "pruned": layer.seft_pruned[adapter_name].detach().cpu().clone(),
            "values": layer.seft_values[adapter_name].detach().cpu().clone(),
            "step": layer.seft_step[adapter_name].detach().cpu().clone(),
        }
        for name, layer in seft_layers(model).items()
    }


def sft_args(output_dir: str, **overrides):
    """CPU-friendly SFTConfig: tiny batches, logging every step, no reporting, deterministic data order."""
    from trl import SFTConfig

    kwargs = {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "max_steps": 30,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "seed": 0,
        "data_seed": 0,
        "max_length": 64,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def torchrun(script: Path, *args: str, processes: int = 2, timeout: float = 300) -> None:
    """Run ``script`` under ``torch.distributed.run`` on CPU (gloo) with ``processes`` ranks, from its folder; fails
    with the end of its output when it does."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    process = subprocess.run(
        [*command, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=script.parent
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-6000:]
