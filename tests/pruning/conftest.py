"""The pruning tests' tiny models: dense (unpruned), in training mode, with char_tokenizer(pad=False)'s ids."""

import pytest

from peft_seft import testing
from peft_seft.testing import CHAR_VOCAB as VOCAB

DENSE = {"sparsity": 0.0, "eval_mode": False, "vocab_size": VOCAB}


def tiny_llama():
    return testing.tiny_llama(**DENSE, intermediate_size=128, max_position_embeddings=128)


def tiny_gpt2():
    return testing.tiny_gpt2(**DENSE, n_embd=64, n_positions=128, bos_token_id=0, eos_token_id=0)


def tiny_bert():
    return testing.tiny_bert(
        **DENSE, masked_lm=True, hidden_size=64, intermediate_size=128, max_position_embeddings=128
    )


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def token_ids(num_samples: int = 8, seq_len: int = 32, seed: int = 0):
    return testing.token_ids(num_samples, seq_len, seed, vocab_size=VOCAB)


def char_tokenizer():
    """<eos>=0, <unk>=1, then printable ASCII (ids < VOCAB)."""
    return testing.char_tokenizer(pad=False)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    return TINY_MODELS[request.param]()
