"""SEFT through PEFT's public API on tiny Llama, GPT-2 (Conv1D) and BERT models."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BartConfig,
    BertConfig,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
)

import peft_seft
from peft_seft import SEFTConfig, SEFTLayer
from peft_seft.evolution.rounds import structural_active_count
from peft_seft.testing import TINY_MODELS, VOCAB, nonzeros_per_layer, tiny_llama
from peft_seft.utils.sparsity import logical_weight


def outputs(model, input_ids):
    out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize_(model, scale: float = 0.05) -> None:
    """Give every SEFT value a non-zero value, as training would."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "seft_values" in name:
                param.normal_(0, scale)


def seft_layers(model) -> dict[str, SEFTLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SEFTLayer)}


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_default_targets_output_and_trainable_count(arch, input_ids):
    base = TINY_MODELS[arch]()
    expected = outputs(base, input_ids)
    model = get_peft_model(base, SEFTConfig(density=0.02))
    layers = seft_layers(model)
    assert layers and all(".lm_head" not in n and "embed" not in n and "pooler" not in n for n in layers)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(layer.seft_values["default"].numel() for layer in layers.values())
    assert torch.equal(outputs(model, input_ids), expected)  # init: exactly the base model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_disable_and_unload(arch, input_ids):
    base = TINY_MODELS[arch]()
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    nonzeros = nonzeros_per_layer(base)
    model = get_peft_model(base, SEFTConfig(density=0.05))
    randomize_(model)
    adapted = outputs(model, input_ids)
    with model.disable_adapter():
        torch.testing.assert_close(outputs(model, input_ids), outputs(TINY_MODELS[arch](), input_ids), rtol=0, atol=0)
    torch.testing.assert_close(outputs(model, input_ids), adapted, rtol=0, atol=0)

    model.merge_adapter()
    torch.testing.assert_close(outputs(model, input_ids), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    unloaded = model.unload()
    for name, param in unloaded.named_parameters():
        assert torch.equal(param, originals[name]), name  # bit-exact: originals are written back

    model = get_peft_model(TINY_MODELS[arch](), SEFTConfig(density=0.05))
    randomize_(model)
    adapted = outputs(model, input_ids)
    merged = model.merge_and_unload()
    assert type(merged) is type(base) and not seft_layers(merged)
    torch.testing.assert_close(outputs(merged, input_ids), adapted, rtol=1e-5, atol=1e-5)
    assert nonzeros_per_layer(merged) == nonzeros  # no pruned position re-activated: count unchanged


def test_save_load_round_trip_keeps_evolved_positions(tmp_path, input_ids):
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05))
    randomize_(model)
    for layer in seft_layers(model).values():  # move positions as evolution would
        with torch.no_grad():
            layer.seft_indices["default"].copy_(layer.seft_indices["default"].flip(0).roll(3))
    expected = outputs(model, input_ids)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {key.rsplit(".", 1)[-1] for key in saved} == {
        "seft_values",
        "seft_indices",
        "seft_pruned",
        "seft_fingerprint",
        "seft_step",
    }
    num_values = sum(t.numel() for k, t in saved.items() if k.endswith("seft_values"))
    header = sum(
        t.numel() * t.element_size()
        for k, t in saved.items()
        if k.rsplit(".", 1)[-1] in ("seft_fingerprint", "seft_step")
    )
    payload = os.path.getsize(tmp_path / "adapter_model.safetensors") - header
    assert payload <= 12 * num_values + 16 * 1024  # values, positions and P: 4 bytes each, plus the JSON header

    for trainable in (False, True):
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=trainable)
        torch.testing.assert_close(outputs(loaded, input_ids), expected, rtol=0, atol=0)
        for name, layer in seft_layers(loaded).items():
            assert torch.equal(layer.seft_indices["default"], seft_layers(model)[name].seft_indices["default"])
        assert loaded.get_nb_trainable_parameters()[0] == (num_values if trainable else 0)
    assert PeftConfig.from_pretrained(tmp_path).density == 0.05


def test_auto_peft_model_loads_local_base(tmp_path, input_ids):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), SEFTConfig(density=0.05))
    randomize_(model)
    expected = outputs(model, input_ids)
    model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "SEFT" and config["base_model_name_or_path"] == str(base_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    torch.testing.assert_close(outputs(loaded, input_ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "wrong_base, message",
    [
        (lambda: tiny_llama(sparsity=0.0), "non-zeros"),  # the dense model instead of the pruned one
        (lambda: tiny_llama(seed=7), "values differ"),  # another checkpoint, same sparsity
    ],
)
def test_loading_onto_another_base_fails_loudly(tmp_path, wrong_base, message):
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(wrong_base(), tmp_path)


def test_loading_onto_other_shapes_fails(tmp_path):
    get_peft_model(tiny_llama(), SEFTConfig(density=0.05)).save_pretrained(tmp_path)
    other = LlamaForCausalLM(
        tiny_llama().config.__class__(**{**tiny_llama().config.to_dict(), "intermediate_size": 80})
    )
    with pytest.raises((ValueError, RuntimeError), match="shape|size mismatch"):
        PeftModel.from_pretrained(other, tmp_path)


def test_several_adapters(input_ids):
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05))
    model.add_adapter("other", SEFTConfig(density=0.03))
    layer = next(iter(seft_layers(model).values()))
    assert not torch.equal(layer.seft_indices["default"][:10], layer.seft_indices["other"][:10])
    assert not layer.seft_values["other"].requires_grad
    randomize_(model)
    first = outputs(model, input_ids)
    model.set_adapter("other")
    assert layer.seft_values["other"].requires_grad and not layer.seft_values["default"].requires_grad
    second = outputs(model, input_ids)
    assert not torch.allclose(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(outputs(model, input_ids), first, rtol=0, atol=0)
    model.delete_adapter("other")
    assert "other" not in layer.seft_values
    torch.testing.assert_close(outputs(model, input_ids), first, rtol=0, atol=0)


def test_inject_adapter_in_model(input_ids):
    base = tiny_llama()
    expected = outputs(base, input_ids)
    model = inject_adapter_in_model(SEFTConfig(density=0.05), base)
    assert seft_layers(model)
    torch.testing.assert_close(outputs(model, input_ids), expected, rtol=0, atol=0)


def test_num_trainable_is_split_in_proportion_to_layer_size():
    model = get_peft_model(tiny_llama(sparsity=0.0), SEFTConfig(num_trainable=3000))
    layers = seft_layers(model)
    total = sum(layer.get_base_layer().weight.numel() for layer in layers.values())
    for layer in layers.values():
        expected = round(3000 * layer.get_base_layer().weight.numel() / total)
        assert layer.seft_values["default"].numel() == expected
    assert abs(model.get_nb_trainable_parameters()[0] - 3000) <= len(layers)


def test_initial_positions_are_active_weights_and_invariant_holds():
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.3))
    for layer in seft_layers(model).values():
        w0 = logical_weight(layer.get_base_layer()).reshape(-1)
        indices = layer.seft_indices["default"].long()
        assert indices.unique().numel() == indices.numel()
        assert (w0[indices] != 0).all()
        count = structural_active_count(w0 != 0, indices, layer.pruned_positions("default"))
        assert count == int((w0 != 0).sum())


def test_registration_is_idempotent():
    importlib.reload(peft_seft)
    importlib.reload(peft_seft)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType("SEFT")] is peft_seft.SEFTConfig
    assert get_peft_model(tiny_llama(), peft_seft.SEFTConfig()).peft_type == "SEFT"


def test_full_state_dict_holds_the_base_weight_not_the_in_place_one(input_ids):
    """A full state dict saved mid-training (as some frameworks do) must not bake W into the base weight, or a
    model rebuilt from it would apply the adapter twice."""
    base = tiny_llama()
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, SEFTConfig(density=0.05))
    randomize_(model)
    expected = outputs(model, input_ids)  # this forward writes W in place
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, tensor in state.items():
        if name.endswith("base_layer.weight"):
            original_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(tensor, originals[original_name]), name
    rebuilt = get_peft_model(tiny_llama(), SEFTConfig(density=0.05))
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(outputs(rebuilt, input_ids), expected, rtol=0, atol=0)


def _gradients_with(model, input_ids, between) -> torch.Tensor:
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    between()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_backward_uses_the_weight_of_its_forward(tmp_path, input_ids):
    """Whatever writes another W (or W0) into the base weights between a forward and its backward, the gradients are
    those of the forward's W, bit for bit."""
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05, init_weights=False))
    model.add_adapter("other", SEFTConfig(density=0.05, init_weights=False))

    def reference_forward():  # what DPO's implicit reference model does
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=input_ids)

    def other_adapter_forward():
        model.base_model.set_adapter("other")
        with torch.no_grad():
            model(input_ids=input_ids)
        model.base_model.set_adapter("default")

    undisturbed = _gradients_with(model, input_ids, lambda: None)
    save = lambda: model.save_pretrained(tmp_path)  # noqa: E731
    for between in (reference_forward, model.state_dict, save, other_adapter_forward):
        assert torch.equal(_gradients_with(model, input_ids, between), undisturbed)


def test_changing_the_adapter_between_forward_and_backward_is_an_error(input_ids):
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05, init_weights=False))

    def step_and_reference():
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).add_(1.0)
            with model.disable_adapter():
                model(input_ids=input_ids)

    with pytest.raises(RuntimeError, match="changed .* between a forward and its backward"):
        _gradients_with(model, input_ids, step_and_reference)


@pytest.mark.parametrize("num_layers", [2, 3])  # 3 layers: over 20 target names, which PEFT shortens to suffixes
def test_all_linear_with_layers_to_transform_adapts_exactly_those_layers(tmp_path, input_ids, num_layers):
    config = LlamaConfig(
        vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=4
    )
    torch.manual_seed(0)
    seft = SEFTConfig(target_modules="all-linear", layers_to_transform=[1], num_trainable=300, init_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), seft)
    names = set(seft_layers(model))
    assert len(names) == 7 and all(".layers.1." in name for name in names)
    assert model.get_nb_trainable_parameters()[0] == 300
    expected = outputs(model, input_ids)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(config), tmp_path)
    assert set(seft_layers(loaded)) == names
    torch.testing.assert_close(outputs(loaded, input_ids), expected, rtol=0, atol=0)


def _tiny_base(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    small = {"vocab_size": VOCAB}
    configs = {
        "bert": BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, **small),
        "bart": BartConfig(
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            **small,
        ),
        "t5": T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0, **small),
        "llama": LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, **small),
    }
    model_cls = AutoModelForCausalLM if kind == "llama" else AutoModel
    return model_cls.from_config(configs[kind]).eval()


def _any_outputs(model, input_ids) -> torch.Tensor:
    kwargs = {"decoder_input_ids": input_ids[:, :5]} if model.config.is_encoder_decoder else {}
    out = model(input_ids=input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", ["bert", "bart", "t5", "llama"])  # encoder, encoder-decoders, decoder
def test_trainable_tokens_unload_and_merge(kind, input_ids):
    originals = {name: p.detach().clone() for name, p in _tiny_base(kind).named_parameters()}
    base_out = _any_outputs(_tiny_base(kind), input_ids)

    def adapted():
        model = get_peft_model(_tiny_base(kind), SEFTConfig(trainable_token_indices=[0, 1, 3], init_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.normal_(0, 1.0)
        return model

    model = adapted()
    expected = _any_outputs(model, input_ids)
    assert not torch.allclose(expected, base_out)
    merged = model.merge_and_unload()
    assert not seft_layers(merged) and "trainable_tokens" not in str(merged)
    torch.testing.assert_close(_any_outputs(merged, input_ids), expected, rtol=1e-5, atol=1e-5)

    unloaded = adapted().unload()
    assert "trainable_tokens" not in str(unloaded)
    for name, param in unloaded.named_parameters():
        assert torch.equal(param, originals[name]), name  # bit-exact; T5's outputs still vary at float noise level
    torch.testing.assert_close(_any_outputs(unloaded, input_ids), base_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half()], ids=["bf16", "half"])
@pytest.mark.parametrize("merged", [False, True])
def test_cast_after_a_forward_equals_cast_before(input_ids, cast, merged):
    def model_with_adapter():
        torch.manual_seed(3)
        model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05, init_weights=False, random_seed=0))
        return model

    untouched = cast(model_with_adapter())
    used = model_with_adapter()
    outputs(used, input_ids)  # writes W into the fp32 base weights
    if merged:
        used.merge_adapter()
    used = cast(used)
    if merged:
        used.unmerge_adapter()
    torch.testing.assert_close(outputs(used, input_ids), outputs(untouched, input_ids), rtol=0, atol=0)
    with used.disable_adapter(), untouched.disable_adapter():
        for (name, a), b in zip(used.named_parameters(), untouched.parameters(), strict=True):
            assert torch.equal(a, b), name


def test_base_layer_state_dict_holds_w0(input_ids):
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05, init_weights=False))
    outputs(model, input_ids)
    for layer in seft_layers(model).values():
        assert torch.equal(layer.get_base_layer().state_dict()["weight"], layer.effective_weight([]))


def test_tied_target_is_refused_naming_the_tie():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(
        ValueError, match=r"SEFT cannot adapt lm_head: its weight is tied to model\.embed_tokens\.weight"
    ):
        get_peft_model(model, SEFTConfig(target_modules=["lm_head", "q_proj"]))
    assert not seft_layers(model)
