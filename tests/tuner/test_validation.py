"""Hostile adapter files: every tampered or corrupted SEFT entry is refused at load, naming the layer and the problem,
before anything is loaded, and the base model is left as it was."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_seft import SEFTConfig, SEFTLayer
from peft_seft.testing import nonzeros_per_layer, tiny_llama
from peft_seft.tuner.layer import EMPTY_SLOT
from peft_seft.tuner.validation import AdapterValidationError
from peft_seft.utils.sparsity import logical_weight

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"
WEIGHTS = "adapter_model.safetensors"


def evolve_by_hand_(layer: SEFTLayer, count: int = 3) -> None:
    """Put the layer in a state evolution can reach: ``count`` trainable positions re-activate zeros of W0, and as
    many frozen non-zeros are pruned."""
    w0 = logical_weight(layer.get_base_layer()).detach().reshape(-1)
    trainable = layer.seft_indices["default"].long()
    zeros = (w0 == 0).nonzero().squeeze(1)
    frozen = (w0 != 0).nonzero().squeeze(1)
    frozen = frozen[~torch.isin(frozen, trainable)]
    with torch.no_grad():
        layer.seft_indices["default"][:count] = zeros[:count].int()
        layer.seft_pruned["default"][:count] = frozen[:count].int()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    model = get_peft_model(tiny_llama(), SEFTConfig(density=0.05, init_weights=False, random_seed=0))
    for module in model.modules():
        if isinstance(module, SEFTLayer):
            evolve_by_hand_(module)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


def tampered_copy(adapter_dir: Path, target: Path, change) -> Path:
    shutil.copytree(adapter_dir, target, dirs_exist_ok=True)
    tensors = load_file(adapter_dir / WEIGHTS)
    change(tensors)
    save_file(tensors, target / WEIGHTS)
    return target


def base_state(model: torch.nn.Module) -> tuple:
    modules = [(name, type(module).__name__) for name, module in model.named_modules()]
    hooks = sum(len(m._forward_pre_hooks) + len(m._state_dict_pre_hooks) for m in model.modules())
    return modules, hooks, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_refused_and_base_unchanged(path: Path, match: str, base: torch.nn.Module | None = None) -> None:
    base = tiny_llama() if base is None else base
    before = base_state(base)
    with pytest.raises(AdapterValidationError, match=match):
        PeftModel.from_pretrained(base, path)
    after = base_state(base)
    assert after[:2] == before[:2]
    assert all(torch.equal(after[2][name], tensor) for name, tensor in before[2].items())


def key(field: str, layer: str = LAYER) -> str:
    return f"{layer}.{field}"


def set_slot(field: str, slot: int, value: int):
    def change(tensors):
        tensors[key(field)][slot] = value

    return change


def duplicate_slot(field: str):
    def change(tensors):
        tensors[key(field)][-1] = tensors[key(field)][0]

    return change


def overlap(tensors):
    tensors[key("seft_pruned")][0] = tensors[key("seft_indices")][-1]


def clear_pruned(tensors):
    tensors[key("seft_pruned")].fill_(EMPTY_SLOT)


def prune_a_zero(tensors):
    w0 = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().reshape(-1)
    zeros = (w0 == 0).nonzero().squeeze(1)
    taken = torch.cat([tensors[key("seft_indices")], tensors[key("seft_pruned")]]).long()
    tensors[key("seft_pruned")][0] = int(zeros[~torch.isin(zeros, taken)][0])


def drop(field: str):
    def change(tensors):
        del tensors[key(field)]

    return change


def set_value(value: float):
    def change(tensors):
        tensors[key("seft_values")][1] = value

    return change


def reshape(field: str):
    def change(tensors):
        tensors[key(field)] = tensors[key(field)][:-1].clone()

    return change


def retype(field: str, dtype: torch.dtype):
    def change(tensors):
        tensors[key(field)] = tensors[key(field)].to(dtype)

    return change


def extra_layer(tensors):
    for name in [name for name in tensors if name.startswith(LAYER)]:
        tensors[name.replace("layers.0.", "layers.7.")] = tensors[name].clone()


NUMEL = 64 * 64
CASES = {
    "index past the end": (set_slot("seft_indices", 4, NUMEL), "q_proj: seft_indices holds positions outside"),
    "index -1": (set_slot("seft_indices", 4, -1), "seft_indices holds positions outside"),
    "pruned -5": (set_slot("seft_pruned", 5, -5), "seft_pruned holds positions outside"),
    "pruned past the end": (set_slot("seft_pruned", 0, 2**31 - 1), "seft_pruned holds positions outside"),
    "duplicate index": (duplicate_slot("seft_indices"), "seft_indices holds duplicate positions"),
    "duplicate pruned": (duplicate_slot("seft_pruned"), "seft_pruned holds duplicate positions"),
    "P overlaps T": (overlap, "share positions"),
    "P cleared": (clear_pruned, "the non-zero count would change"),
    "P holds a zero of W0": (prune_a_zero, r"seft_pruned holds 1 position\(s\) that are zero in the base"),
    "NaN value": (set_value(float("nan")), "NaN or infinite"),
    "inf value": (set_value(float("inf")), "NaN or infinite"),
    "missing values": (drop("seft_values"), "q_proj: the adapter has no seft_values"),
    "missing indices": (drop("seft_indices"), "q_proj: the adapter has no seft_indices"),
    "missing pruned": (drop("seft_pruned"), "q_proj: the adapter has no seft_pruned"),
    "missing fingerprint": (drop("seft_fingerprint"), "q_proj: the adapter has no seft_fingerprint"),
    "missing step": (drop("seft_step"), "q_proj: the adapter has no seft_step"),
    "short values": (reshape("seft_values"), r"seft_values has shape \(\d+,\), expected \(\d+,\)"),
    "short pruned": (reshape("seft_pruned"), "seft_pruned has shape"),
    "float indices": (retype("seft_indices", torch.float32), "seft_indices has dtype torch.float32"),
    "integer values": (retype("seft_values", torch.int32), "seft_values has dtype torch.int32"),
    "negative step": (set_slot("seft_step", 0, -3), "seft_step is negative"),
    "garbage fingerprint": (reshape("seft_fingerprint"), "unexpected format"),
    "entries for a layer the model lacks": (extra_layer, r"layers\.7\.self_attn\.q_proj: the adapter has entries"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_entry_is_refused_naming_layer_and_problem(adapter_dir, tmp_path, case):
    change, match = CASES[case]
    assert_refused_and_base_unchanged(tampered_copy(adapter_dir, tmp_path, change), match)


def test_untampered_copy_loads(adapter_dir, tmp_path):
    loaded = PeftModel.from_pretrained(tiny_llama(), tampered_copy(adapter_dir, tmp_path, lambda tensors: None))
    merged, base = nonzeros_per_layer(loaded.merge_and_unload()), nonzeros_per_layer(tiny_llama())
    assert all(merged[name] <= count for name, count in base.items())  # fewer only where a value is exactly 0


def test_failed_second_adapter_leaves_the_first(adapter_dir, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    bad = tampered_copy(adapter_dir, tmp_path, set_slot("seft_indices", 0, -1))
    with pytest.raises(AdapterValidationError, match="outside"):
        model.load_adapter(bad, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert all("second" not in m.seft_values for m in model.modules() if isinstance(m, SEFTLayer))


@pytest.mark.parametrize("corrupt", ["truncated", "garbage"])
def test_corrupted_file_is_an_error(adapter_dir, tmp_path, corrupt):
    shutil.copytree(adapter_dir, tmp_path, dirs_exist_ok=True)
    data = (adapter_dir / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2] if corrupt == "truncated" else b"\x07" * 64)
    with pytest.raises(Exception, match="(?i)safetensor|header|deserializ|incomplete|invalid"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


FIELDS = ["seft_indices", "seft_pruned", "seft_values", "seft_step"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(FIELDS),
    layer=st.sampled_from(["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]),
    slot=st.integers(0, 20),
    integer=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 3 * NUMEL)),
    real=st.floats(allow_nan=True, allow_infinity=True, width=32),
)
def test_any_single_tampering_is_refused_or_harmless(adapter_dir, field, layer, slot, integer, real):
    """Property: after changing one saved number, loading either fails with a named validation error (base untouched)
    or gives an adapter that keeps the invariants: no merged layer has more non-zeros than the base, finite outputs."""
    name = f"base_model.model.model.layers.1.{layer}"

    def change(tensors):
        tensor = tensors[key(field, name)]
        tensor[slot % tensor.numel()] = real if tensor.is_floating_point() else integer

    with tempfile.TemporaryDirectory() as target:
        path = tampered_copy(adapter_dir, Path(target), change)
        base = tiny_llama()
        before = base_state(base)
        try:
            loaded = PeftModel.from_pretrained(base, path)
        except AdapterValidationError as error:
            assert f"layers.1.{layer}: " in str(error)
            assert base_state(base)[:2] == before[:2]
            return
    inputs = torch.arange(12).reshape(1, 12)
    assert torch.isfinite(loaded(input_ids=inputs).logits).all()
    merged, base = nonzeros_per_layer(loaded.merge_and_unload()), nonzeros_per_layer(tiny_llama())
    assert all(merged[name] <= count for name, count in base.items())  # fewer only where a value is exactly 0


def test_tampered_gradient_window_of_a_checkpoint_is_refused(tmp_path):
    """A checkpoint saved inside a gradient window carries the window's O(K) statistics; impossible sizes (once a
    4 TB allocation) or positions outside the weight are refused, naming the layer, and the base is left as it was."""
    config = SEFTConfig(density=0.05, update_interval=4, selection_steps=3, total_steps=20, random_seed=0)
    model = get_peft_model(tiny_llama(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the window opens for step 2 (rounds at 4): one step of statistics
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "saved")
    assert any(".seft_window." in k for k in load_file(tmp_path / "saved" / WEIGHTS))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved", is_trainable=True)
    assert all(m._windows["default"].steps == 1 for m in loaded.modules() if isinstance(m, SEFTLayer))

    def huge(tensors):
        tensors[key("seft_window.meta")] = torch.tensor([1, 1, 1, 1, 10**12, 10**12])

    def outside(tensors):
        tensors[key("seft_window.candidates")] = tensors[key("seft_window.candidates")] + 10**9

    for label, change in (("huge", huge), ("outside", outside)):
        path = tampered_copy(tmp_path / "saved", tmp_path / label, change)
        base = tiny_llama()
        before = base_state(base)
        with pytest.raises(AdapterValidationError, match="gradient window of SEFT layer .*self_attn.q_proj"):
            PeftModel.from_pretrained(base, path, is_trainable=True)
        after = base_state(base)
        assert after[:2] == before[:2]
