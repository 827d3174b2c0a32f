import math

import pytest
import torch
from transformers import LlamaForCausalLM

from peft_seft.cli.evaluation import perplexity
from peft_seft.pruning.calibration import token_stream
from peft_seft.testing import char_tokenizer, tiny_llama

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    dense = {"eval_mode": False, "vocab_size": VOCAB, "max_position_embeddings": 64}
    return tiny_llama(0.0, hidden_size=32, intermediate_size=64, **dense)


def hand_computed_perplexity(model, stream, seq_len):
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), seq_len):
            window = stream[start : start + seq_len]
            if len(window) < 2:
                continue
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            nll -= sum(float(log_probs[i, window[i + 1]]) for i in range(len(window) - 1))
            count += len(window) - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("length", [70, 65, 64, 20])
def test_perplexity_is_exp_of_mean_token_nll(model, length):
    stream = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    expected = hand_computed_perplexity(model, stream, seq_len=32)
    got = perplexity(model, stream, seq_len=32, batch_size=2, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_uniform_predictions_give_the_vocabulary_size(model):
    uniform = LlamaForCausalLM(model.config)
    torch.nn.init.zeros_(uniform.lm_head.weight)
    ids = torch.randint(0, VOCAB, (3, 16))
    assert perplexity(uniform, ids, seq_len=16, show_progress=False) == pytest.approx(VOCAB, rel=1e-5)


def test_texts_are_tokenized_and_joined_with_eos(model):
    vocab = {"<eos>": 0, "<unk>": 1} | {chr(c): c - 30 for c in range(32, 127)}
    tokenizer = char_tokenizer(pad=False)
    texts = ["x = 1 + 2", "print(x)"]
    stream = token_stream(texts, tokenizer)
    assert stream.tolist() == [vocab[c] for c in texts[0]] + [0] + [vocab[c] for c in texts[1]]
    assert perplexity(model, tokenizer, texts, seq_len=8, show_progress=False) == pytest.approx(
        hand_computed_perplexity(model, stream, seq_len=8), rel=1e-5
    )


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="not token ids and texts"):
        perplexity(model, torch.arange(10), ["text"])
    with pytest.raises(ValueError, match="needs texts"):
        perplexity(model, object())
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(model, torch.tensor([3]))
