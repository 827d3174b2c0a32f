"""Tiny models, tokenizer, data and trainer set-ups shared by test_training_integration.py and the DDP script.

Everything is built in code (no Hub access): a 2-layer LlamaForCausalLM with hidden size 64 whose block
linears are magnitude-pruned to exactly 50 %, and a character-level tokenizer with pad and eos tokens.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import peft_seft  # noqa: F401  (registers SEFT and the Trainer default callback)
from peft_seft import SEFTLayer

VOCAB = 128
PAD_ID, EOS_ID = 0, 1
SPARSITY = 0.5

SENTENCES = [
    "the quick brown fox jumps over the lazy dog. ",
    "sparse models can be repaired by sparse fine-tuning! ",
    "hello world, this is a tiny character level corpus. ",
    "pruned weights may come back when they matter again. ",
]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: <pad>=0, <eos>=1, <unk>=2, printable ASCII after (ids < VOCAB)."""
    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


def magnitude_prune_(model: nn.Module, sparsity: float = SPARSITY) -> None:
    """Zero exactly ``round(sparsity * numel)`` smallest-magnitude weights of every linear inside the blocks."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in f".{name}":
                flat = module.weight.view(-1)
                num_zero = round(sparsity * flat.numel())
                flat[torch.argsort(flat.abs(), stable=True)[:num_zero]] = 0


def tiny_pruned_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
    )
    model = LlamaForCausalLM(config)
    magnitude_prune_(model)
    return model


def text_dataset(num_samples: int = 32) -> Dataset:
    """A plain-text language-modelling dataset (SFTTrainer tokenizes it itself)."""
    texts = [(SENTENCES[i % len(SENTENCES)] * 2)[: 40 + (i % 8)] for i in range(num_samples)]
    return Dataset.from_dict({"text": texts})


def token_batch(batch_size: int = 4, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed batch of token ids drawn from the tokenized corpus (for plain PyTorch loops)."""
    tokenizer = char_tokenizer()
    stream = tokenizer("".join(SENTENCES) * 4)["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.tensor([stream[s : s + seq_len] for s in starts.tolist()])


def base_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the (pruned) weights of every block linear of a plain transformers model, keyed by name."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }


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
