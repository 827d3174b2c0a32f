# ---------------------------------------------------------------------------------------------------------------------
# peft-seft additions (appended by tests/peft_suite/run.sh from the peft-seft repository; not part of PEFT).
#
# Runs PEFT's own generic tests (test_custom_models.py, test_decoder_models.py) against the SEFT method:
#   - registers SEFT (import peft_seft),
#   - builds tiny decoder models (and byte-level tokenizers) from configs, locally, instead of the Hub models,
#   - adds SEFT cases to the parametrization lists in place, before collection,
#   - skips, narrowly and with a reason, the few tests that cannot apply to SEFT by design.
# Select the SEFT tests with `-k SEFT`.
# ---------------------------------------------------------------------------------------------------------------------
import os as _seft_os
import pathlib as _seft_pathlib

import pytest as _seft_pytest
import torch

import peft_seft as _peft_seft  # noqa: F401  (registers the PEFT type "SEFT")
from peft_seft import SEFTConfig as _SEFTConfig

_SEFT_SUITE_ROOT = _seft_pathlib.Path(__file__).resolve().parent.parent
_SEFT_TINY_MODEL_DIR = _SEFT_SUITE_ROOT / "tiny_models"

# Name of the local folder -> (transformers model_type, config kwargs). The folder names keep the architecture names of
# the Hub models they stand in for, because PEFT's tests branch on them (e.g. "GPT2LMHeadModel" in model_id).
_SEFT_TINY_MODELS = {
    "tiny-random-OPTForCausalLM": (
        "opt",
        dict(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
        ),
    ),
    "tiny-random-GPT2LMHeadModel": ("gpt2", dict(n_embd=16, n_layer=2, n_head=4, n_positions=64)),
    "tiny-random-GPTJForCausalLM": ("gptj", dict(n_embd=16, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)),
    "tiny-random-LlamaForCausalLM": (
        "llama",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),
    "tiny-dummy-qwen2": (
        "qwen2",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),
    "tiny-random-Gemma3ForCausalLM": (
        "gemma3_text",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            sliding_window=8,
            max_position_embeddings=64,
        ),
    ),
    "tiny-random-MistralForCausalLM": (
        "mistral",
        dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
    ),
}
_SEFT_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def _seft_tiny_tokenizer():
    """A byte-level tokenizer without merges: every byte is a token (260 tokens), built in code, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SEFT_SPECIAL_TOKENS)}
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _seft_build_tiny_models():
    """Save every tiny model (random weights, fixed seed) with its tokenizer; skip the ones already built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    paths = {}
    for name, (model_type, kwargs) in _SEFT_TINY_MODELS.items():
        path = _SEFT_TINY_MODEL_DIR / name
        if not (path / "config.json").exists() or not (path / "tokenizer.json").exists():
            torch.manual_seed(0)
            config = AutoConfig.for_model(
                model_type, vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=3, **kwargs
            )
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
            _seft_tiny_tokenizer().save_pretrained(path)
        # A path relative to the working directory: the test ids contain the model id, and an absolute path could
        # contain "seft" (e.g. a checkout named peft-seft) and so match `-k SEFT` for every PEFT method.
        paths[name] = _seft_os.path.relpath(path)
    return paths


def _seft_extend_suite():
    from . import test_custom_models, test_decoder_models

    # ---- tiny local models instead of the Hub models --------------------------------------------------------------
    paths = _seft_build_tiny_models()

    def local(model_ids):
        return [paths[model_id.rsplit("/", 1)[-1]] for model_id in model_ids]

    test_decoder_models.PEFT_DECODER_MODELS_TO_TEST[:] = local(test_decoder_models.PEFT_DECODER_MODELS_TO_TEST)
    test_decoder_models.SMALL_GRID_MODELS[:] = local(
        [m.replace("tiny-random-gpt2", "tiny-random-GPT2LMHeadModel") for m in test_decoder_models.SMALL_GRID_MODELS]
    )

    # ---- custom models --------------------------------------------------------------------------------------------
    # Plain PyTorch training loops (as in these tests) must set total_steps when evolution is on (the default).
    def seft(**kwargs):
        return {"total_steps": 100, **kwargs}

    evolution = dict(update_interval=2, selection_steps=1, initial_drop_rate=0.5, total_steps=10)
    seft_cases = [
        ("Vanilla MLP 1 SEFT", "MLP", _SEFTConfig, seft(target_modules=["lin0"], density=0.1)),
        ("Vanilla MLP 2 SEFT", "MLP", _SEFTConfig, seft(target_modules="lin1", density=0.5)),
        ("Vanilla MLP 3 SEFT", "MLP", _SEFTConfig, seft(target_modules=["lin0", "lin1"], density=0.2)),
        ("Vanilla MLP 4 SEFT full density", "MLP", _SEFTConfig, seft(target_modules=["lin0", "lin1"], density=1.0)),
        (
            "Vanilla MLP 5 SEFT num_trainable",
            "MLP",
            _SEFTConfig,
            seft(target_modules=["lin0", "lin1"], num_trainable=30),
        ),
        (
            "Vanilla MLP 6 SEFT init_weights=False",
            "MLP",
            _SEFTConfig,
            seft(target_modules=["lin0", "lin1"], density=0.1, init_weights=False),
        ),
        (
            "Vanilla MLP 7 SEFT modules_to_save",
            "MLP",
            _SEFTConfig,
            seft(target_modules=["lin0"], density=0.1, modules_to_save=["lin1"]),
        ),
        (
            "Vanilla MLP 8 SEFT exclude_modules",
            "MLP",
            _SEFTConfig,
            seft(target_modules=["lin0", "lin1"], exclude_modules=["lin1"], density=0.1),
        ),
        (
            "Vanilla MLP 9 SEFT static",
            "MLP",
            _SEFTConfig,
            {"target_modules": ["lin0", "lin1"], "initial_drop_rate": 0.0},
        ),
        (
            "Vanilla MLP 10 SEFT evolving, sensitivity",
            "MLP",
            _SEFTConfig,
            dict(target_modules=["lin0", "lin1"], density=0.1, full_reselection_first=True, **evolution),
        ),
        (
            "Vanilla MLP 11 SEFT evolving, magnitude, no regrowth, seeded moments",
            "MLP",
            _SEFTConfig,
            dict(
                target_modules=["lin0", "lin1"],
                density=0.1,
                drop_schedule="linear",
                grow_pruned=False,
                prune_criterion="magnitude",
                grown_optimizer_state="seed",
                **evolution,
            ),
        ),
        ("Conv1D 1 SEFT", "EmbConv1D", _SEFTConfig, seft(target_modules=["conv1d"], density=0.5)),
        ("Conv1D 2 SEFT", "EmbConv1D", _SEFTConfig, seft(target_modules=["conv1d", "lin0"], density=0.2)),
        (
            "Conv1D 3 SEFT evolving",
            "EmbConv1D",
            _SEFTConfig,
            dict(target_modules=["conv1d", "lin0"], density=0.2, **evolution),
        ),
    ]
    test_custom_models.TEST_CASES.extend(seft_cases)
    test_custom_models.ALL_PEFT_CONFIG_CLASSES.append(_SEFTConfig)
    test_custom_models.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES.extend(
        [
            (
                "SEFT Same",
                "seft",
                _SEFTConfig,
                seft(target_modules=["lin0"], density=0.1, init_weights=False),
                seft(target_modules=["lin0"], density=0.1, init_weights=False),
            ),
            (
                "SEFT Different",
                "seft",
                _SEFTConfig,
                seft(target_modules=["lin0"], density=0.1, init_weights=False),
                seft(target_modules=["lin1"], density=0.5, init_weights=False),
            ),
        ]
    )

    # ---- decoder models -------------------------------------------------------------------------------------------
    test_decoder_models.ALL_CONFIGS.extend(
        [
            (_SEFTConfig, {"task_type": "CAUSAL_LM", "target_modules": None, "density": 0.1, "total_steps": 100}),
            (
                _SEFTConfig,
                {
                    "task_type": "CAUSAL_LM",
                    "target_modules": None,
                    "num_trainable": 300,
                    "update_interval": 2,
                    "selection_steps": 1,
                    "initial_drop_rate": 0.5,
                    "total_steps": 10,
                },
            ),
        ]
    )


_seft_extend_suite()

# Tests that cannot pass for SEFT by design, skipped narrowly: (test function, predicate on its parameters, reason).
_SEFT_HALF = (torch.float16, torch.bfloat16)
_SEFT_FP32_REASON = (
    "SEFT keeps its trainable values in float32 whatever the base dtype (the delta is added in fp32 before being "
    "written into the base weight), so it never follows autocast_adapter_dtype=False down to fp16/bf16"
)
_SEFT_IN_PLACE_REASON = (
    "SEFT writes the effective weight W = W0 + delta into the base layer's weight in place while the adapter is "
    "active (restored bit-exactly on disable/unmerge/unload/delete); the test compares base weights of a trained, "
    "still active model with untouched ones"
)
_SEFT_FINGERPRINT_REASON = (
    "the test loads the adapter onto a second, differently (unseeded) initialised DeepMLP; SEFT refuses an adapter "
    "whose saved base-weight fingerprint does not match the base (its positions belong to one pruned base)"
)
_SEFT_NOT_IDENTITY_REASON = (
    "this case sets init_weights=False on purpose, so a fresh adapter is not an identity; the test's precondition "
    "is that it is (init_weights=False is covered by the other tests through set_init_weights_false)"
)
_SEFT_SKIPS = [
    (
        "test_adapter_dtype_autocast",
        lambda p: not p["autocast_adapter_dtype"] and p["dtype"] in _SEFT_HALF,
        _SEFT_FP32_REASON,
    ),
    ("test_add_adapter_no_autocast_adapter_dtype", lambda p: p["dtype"] in _SEFT_HALF, _SEFT_FP32_REASON),
    ("test_only_params_are_updated", lambda p: True, _SEFT_IN_PLACE_REASON),
    ("test_parameters_after_loading_model", lambda p: True, _SEFT_IN_PLACE_REASON),
    ("test_loading_model_requires_grad_set_correctly", lambda p: True, _SEFT_FINGERPRINT_REASON),
    ("test_loading_model_with_modules_to_save_requires_grad_set_correctly", lambda p: True, _SEFT_FINGERPRINT_REASON),
    ("test_disable_adapters", lambda p: p["config_kwargs"].get("init_weights") is False, _SEFT_NOT_IDENTITY_REASON),
    (
        "test_disable_adapters_with_merging",
        lambda p: p["config_kwargs"].get("init_weights") is False,
        _SEFT_NOT_IDENTITY_REASON,
    ),
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("config_cls") is not _SEFTConfig:
            continue
        for function_name, applies, reason in _SEFT_SKIPS:
            if item.originalname == function_name and applies(params):
                item.add_marker(_seft_pytest.mark.skip(reason=f"SEFT: {reason}"))
