"""Tiny models built from configs (no Hub access) and helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import peft_seft  # noqa: F401  (registers SEFT)
from peft_seft.utils.sparsity import logical_weight
from peft_seft.utils.targets import find_target_linears

VOCAB = 96


def magnitude_prune_(model: torch.nn.Module, sparsity: float = 0.5) -> torch.nn.Module:
    """Zero the smallest weights of every default target layer, per layer (good enough to make a sparse base)."""
    with torch.no_grad():
        for module in find_target_linears(model).values():
            weight = module.weight
            k = int(sparsity * weight.numel())
            if k:
                threshold = weight.abs().flatten().kthvalue(k).values
                weight[weight.abs() <= threshold] = 0
    return model


def tiny_llama(sparsity: float = 0.5, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return magnitude_prune_(LlamaForCausalLM(config).eval(), sparsity)


def tiny_gpt2(sparsity: float = 0.5, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return magnitude_prune_(GPT2LMHeadModel(config).eval(), sparsity)


def tiny_bert(sparsity: float = 0.5, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB
    )
    return magnitude_prune_(BertModel(config).eval(), sparsity)


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def nonzeros_per_layer(model: torch.nn.Module) -> dict[str, int]:
    return {name: int(torch.count_nonzero(logical_weight(m))) for name, m in find_target_linears(model).items()}


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
