"""The base-weight fingerprint: blind to a change of dtype, not to a moved non-zero, a permutation, a transposition,
another checkpoint or a base that already holds the adapter merged; adapters for other layer sets are refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_seft import SEFTConfig, SEFTLayer
from peft_seft.testing import nonzeros_per_layer, tiny_llama
from peft_seft.tuner.fingerprint import (
    ALREADY_MERGED,
    fingerprint_mismatch,
    trained_checksum,
    trained_checksum_mismatch,
    weight_fingerprint,
    with_trained_checksum,
)
from peft_seft.tuner.validation import AdapterValidationError
from tests.tuner.test_validation import evolve_by_hand_

Q_PROJ = "model.layers.0.self_attn.q_proj"


def sparse_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 0.05
    weight[torch.rand(rows, cols, generator=generator) < 0.5] = 0
    return weight


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(2, 24), cols=st.integers(2, 24), seed=st.integers(0, 2**16), data=st.data())
def test_fingerprint_survives_dtype_and_sees_any_rearrangement(rows, cols, seed, data):
    weight = sparse_weight(rows, cols, seed)
    saved = weight_fingerprint(weight)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert fingerprint_mismatch(saved, weight_fingerprint(weight.to(dtype))) is None
    permutation = torch.tensor(data.draw(st.permutations(range(rows * cols))))
    rearranged = weight.reshape(-1)[permutation].reshape(rows, cols)
    changed_values = (rearranged != weight).sum()
    if changed_values >= 2:  # something moved (a permutation changes at least two entries)
        assert fingerprint_mismatch(saved, weight_fingerprint(rearranged)) is not None


def model_with_adapter(reactivate: bool):
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05, init_weights=False, random_seed=0))
    if reactivate:
        for module in model.modules():
            if isinstance(module, SEFTLayer):
                evolve_by_hand_(module)
    return model


def edit_q_proj(edit):
    base = tiny_llama()
    with torch.no_grad():
        weight = base.get_submodule(Q_PROJ).weight
        weight.copy_(edit(weight.clone()))
    return base


def move_nonzeros(weight: torch.Tensor, count: int = 20) -> torch.Tensor:
    flat = weight.reshape(-1)
    nonzero, zero = (flat != 0).nonzero().squeeze(1)[-count:], (flat == 0).nonzero().squeeze(1)[-count:]
    flat[zero], flat[nonzero] = flat[nonzero].clone(), 0
    return weight


def swap_values(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.reshape(-1)
    nonzero = (flat != 0).nonzero().squeeze(1)[:40]
    flat[nonzero] = flat[nonzero.flip(0)].clone()  # same non-zero pattern, values moved
    return weight


WRONG_BASES = {
    "rows permuted": (
        lambda: edit_q_proj(lambda w: w[torch.randperm(64, generator=torch.Generator().manual_seed(0))]),
        "other positions",
    ),
    "transposed": (lambda: edit_q_proj(lambda w: w.T), "other positions"),
    "20 non-zeros moved": (lambda: edit_q_proj(move_nonzeros), "other positions"),
    "values swapped, same pattern": (lambda: edit_q_proj(swap_values), "values sit at other positions"),
    "dense": (lambda: tiny_llama(sparsity=0.0), "non-zeros but the adapter was trained"),
    "another checkpoint": (lambda: tiny_llama(seed=7), "differ"),
}


@pytest.mark.parametrize("case", list(WRONG_BASES))
def test_wrong_and_near_wrong_bases_are_refused(tmp_path, case):
    model_with_adapter(reactivate=True).save_pretrained(tmp_path)
    make_base, match = WRONG_BASES[case]
    with pytest.raises(AdapterValidationError, match=match):
        PeftModel.from_pretrained(make_base(), tmp_path)


@pytest.mark.parametrize("reactivate", [True, False])
def test_base_holding_the_adapter_merged_is_refused(tmp_path, reactivate):
    model = model_with_adapter(reactivate)
    model.save_pretrained(tmp_path)
    merged = model.merge_and_unload()
    with pytest.raises(AdapterValidationError, match="already holds this adapter merged"):
        PeftModel.from_pretrained(merged, tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_right_base_in_another_dtype_loads(tmp_path, dtype):
    model = model_with_adapter(reactivate=True)
    model.save_pretrained(tmp_path)
    inputs = torch.arange(12).reshape(1, 12)
    loaded = PeftModel.from_pretrained(tiny_llama().to(dtype), tmp_path)
    torch.testing.assert_close(
        loaded(input_ids=inputs).logits.float(), model(input_ids=inputs).logits, atol=0.1, rtol=0
    )
    assert nonzeros_per_layer(loaded.merge_and_unload()) == nonzeros_per_layer(tiny_llama())


def test_adapter_saved_from_bf16_base_loads_on_fp32(tmp_path):
    model = get_peft_model(tiny_llama().to(torch.bfloat16), SEFTConfig(density=0.05, init_weights=False))
    model.save_pretrained(tmp_path)
    PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_older_five_number_fingerprint_still_loads(tmp_path):
    model = model_with_adapter(reactivate=True)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name in [name for name in tensors if name.endswith("seft_fingerprint")]:
        tensors[name] = tensors[name][:5].clone()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    inputs = torch.arange(12).reshape(1, 12)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=inputs).logits, model(input_ids=inputs).logits, rtol=0, atol=0)


def tiny_llama_layers(num_layers: int):
    model = tiny_llama()
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    return model


@pytest.mark.parametrize(
    "saved_layers, loaded_layers, match",
    [(2, 1, "which the model does not adapt"), (1, 2, "the adapter has no seft_values")],
)
def test_adapter_for_other_layers_is_refused(tmp_path, saved_layers, loaded_layers, match):
    get_peft_model(tiny_llama_layers(saved_layers), SEFTConfig(density=0.05)).save_pretrained(tmp_path)
    with pytest.raises(AdapterValidationError, match=match):
        PeftModel.from_pretrained(tiny_llama_layers(loaded_layers), tmp_path)


def test_trained_checksum_is_checked_only_once_recorded():
    weight = sparse_weight(8, 8, seed=1)
    positions = (weight.reshape(-1) != 0).nonzero().squeeze(1)[:5]
    base_at, values = weight.reshape(-1)[positions], torch.full((5,), 0.5)
    unrecorded = weight_fingerprint(weight)  # as built at injection: field 9 unknown
    assert trained_checksum_mismatch(unrecorded, base_at + values, values, torch.float32) is None
    recorded = with_trained_checksum(unrecorded, trained_checksum(base_at, values))
    assert trained_checksum_mismatch(recorded, base_at, values, torch.bfloat16) is None
    assert trained_checksum_mismatch(recorded, base_at + values, values, torch.float32) == ALREADY_MERGED
    assert "differ" in trained_checksum_mismatch(recorded, base_at * 1.5, values, torch.float32)


def test_moves_that_keep_the_sum_of_positions_are_seen():
    """Two non-zeros moved by +1 and -1 keep the count, the sums of values and the sum of positions."""
    weight = torch.zeros(4, 8)
    weight[0, 2] = weight[3, 5] = 0.5
    moved = torch.zeros(4, 8)
    moved[0, 3] = moved[3, 4] = 0.5
    assert fingerprint_mismatch(weight_fingerprint(weight), weight_fingerprint(moved)) is not None
