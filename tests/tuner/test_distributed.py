"""SEFT under FSDP2 and DDP (torchrun, 2 processes, gloo on CPU) against one process on the full batch.

One torchrun launch of fsdp_seft_train.py runs the single-process reference (rank 0, before the process group
exists), FSDP2 with reshard_after_forward True and False, DDP, a resume of the FSDP2 run from a mid-window
checkpoint, and FSDP1 (refused). This file compares the results and loads the adapter saved by the sharded model
on this (single) process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open

from peft_seft import SEFTConfig
from peft_seft.testing import seft_layers, tiny_pruned_llama, token_batch, torchrun

TESTS_DIR = Path(__file__).resolve().parent
VARIANTS = ("fsdp_reshard", "fsdp_keep", "ddp", "fsdp_seeded")


def launch(out_dir: Path, num_processes: int) -> dict:
    torchrun(TESTS_DIR / "fsdp_seft_train.py", str(out_dir), processes=num_processes)
    return torch.load(out_dir / "results.pt", weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path]:
    out_dir = tmp_path_factory.mktemp("fsdp")
    return launch(out_dir, 2), out_dir


def assert_same_run(got: dict, want: dict, values_atol: float = 1e-6) -> None:
    assert got["snapshot"].keys() == want["snapshot"].keys()
    for name, expected in want["snapshot"].items():
        actual = got["snapshot"][name]
        assert torch.equal(actual["indices"], expected["indices"]), name
        assert torch.equal(actual["pruned"], expected["pruned"]), name
        assert actual["nonzeros"] == expected["nonzeros"], name  # the merged layer's non-zero count, exact
        assert actual["step"] == expected["step"], name
        torch.testing.assert_close(actual["values"], expected["values"], rtol=0, atol=values_atol)
    assert got["rounds"] == want["rounds"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_match_one_process(results, variant):
    """Same positions, values within 1e-6, same merged non-zeros per layer, same rounds; the value gradients of the
    first step and the losses of the global batch agree within fp32 tolerance."""
    results, _ = results
    reference = results["reference_seeded" if variant == "fsdp_seeded" else "reference"]
    run = results[variant]
    assert [step for step, _ in reference["rounds"]] == [4, 8]
    assert all(counts["grown"] > 0 for _, counts in reference["rounds"])
    if variant.startswith("fsdp"):
        assert run["wrapper"].startswith("FSDP") and run["base_weight_type"] == "DTensor"
    else:
        assert run["wrapper"] == "DistributedDataParallel"
    assert_same_run(run, reference)
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(run["grads"][name], grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-6, atol=0)


def test_fsdp2_over_a_single_rank(tmp_path):
    """A process group of one (a script tried on one GPU): FSDP2's shards are whole weights, the run is exact."""
    results = launch(tmp_path, 1)
    assert results["fsdp_single"]["base_weight_type"] == "DTensor"
    assert_same_run(results["fsdp_single"], results["reference"], values_atol=0)


def test_guard_gives_a_diverging_rank_rank0_positions_and_values(results):
    """Rank 1's first round of one layer was made to decide otherwise: it took rank 0's positions, restored the
    values it had zeroed for its own decision, and the run still equals one process."""
    results, _ = results
    run = results["fsdp_guard"]
    assert run["guard_replacements"] == [0, 1]
    assert_same_run(run, results["reference"])


def test_resume_from_sharded_checkpoint_continues_exactly(results):
    """Saved mid-window at step 6 by the sharded model (adapter with its open window, optimizer state gathered with
    torch.distributed.checkpoint), loaded into a fresh model sharded again: the rest of the run is the same."""
    results, _ = results
    uninterrupted, resumed = results["fsdp_reshard"], results["fsdp_reshard"]["resumed"]
    assert_same_run(resumed, {**uninterrupted, "rounds": uninterrupted["rounds"][1:]}, values_atol=0)
    assert resumed["losses"] == uninterrupted["losses"][6:]


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("variant", ["fsdp_reshard", "fsdp_keep"], ids=["every-rank-saves", "rank0-saves-gathered"])
def test_sharded_save_equals_single_process_save_and_loads_on_one_process(results, variant):
    """fsdp_reshard: save_pretrained on every rank (is_main_process on rank 0); fsdp_keep: a full state dict gathered
    with torch.distributed.checkpoint, then save_pretrained(state_dict=...) on rank 0 alone (the Trainer's way)."""
    _, out_dir = results
    sharded, single = read_adapter(out_dir / variant), read_adapter(out_dir / "reference")
    assert sharded.keys() == single.keys()
    for key, value in single.items():
        if ".seft_values" in key:
            torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-6)
        elif ".seft_fingerprint" in key:  # all but the trained checksum (sum W0 * delta, float64 bits) exact
            assert torch.equal(sharded[key][:9], value[:9]), key
            got, want = sharded[key][9:].view(torch.float64), value[9:].view(torch.float64)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
        else:
            assert torch.equal(sharded[key], value), key

    batch = token_batch(4, 24, seed=7)
    logits, nonzeros = {}, {}
    for name in (variant, "reference"):
        model = PeftModel.from_pretrained(tiny_pruned_llama(), str(out_dir / name)).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=batch).logits
        merged = model.merge_and_unload()
        nonzeros[name] = {n: int(torch.count_nonzero(m.weight)) for n, m in merged.named_modules() if "proj" in n}
    torch.testing.assert_close(logits[variant], logits["reference"], rtol=1e-5, atol=1e-5)
    assert nonzeros[variant] == nonzeros["reference"]


def test_fsdp1_fails_fast(results):
    results, _ = results
    message = results["fsdp1_error"]
    assert "FSDP1" in message and "fully_shard" in message


def test_peft_on_an_already_sharded_base_fails_fast(results):
    results, _ = results
    assert "get_peft_model" in results["sharded_first_error"] and "first" in results["sharded_first_error"]


def test_deepspeed_zero3_fails_fast():
    model = tiny_pruned_llama()
    for module in seft_layers_free_targets(model):
        module.weight.ds_id = 0  # what deepspeed.zero.Init puts on partitioned parameters
    with pytest.raises(RuntimeError, match="DeepSpeed ZeRO-3.*fully_shard"):
        get_peft_model(model, SEFTConfig(density=0.05))


def seft_layers_free_targets(model) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def test_single_process_layers_are_not_sharded():
    model = get_peft_model(tiny_pruned_llama(), SEFTConfig(density=0.05))
    batch = token_batch(2, 16)
    model(input_ids=batch, labels=batch).loss.backward()
    assert all(layer._shard is None for layer in seft_layers(model).values())
