"""SEFT inside real training loops: TRL's SFTTrainer, gradient accumulation and checkpointing, resuming from
checkpoints, DDP (torchrun, gloo on CPU) and a plain PyTorch loop.

Models are tiny (2-layer Llama, hidden 64, block linears magnitude-pruned to 50 %) and built in code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from trl import SFTTrainer

from peft_seft import SEFTCallback, SEFTConfig, SEFTLayer
from peft_seft.testing import (
    adapter_snapshot,
    base_linear_weights,
    char_tokenizer,
    seft_layers,
    sft_args,
    text_dataset,
    tiny_pruned_llama,
    token_batch,
    torchrun,
)

TESTS_DIR = Path(__file__).resolve().parent
ROUND_KEYS = ("dropped", "grown", "reactivated", "repruned", "restored", "active", "budget")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models are tiny: one thread is several times faster than two, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seft_config(**overrides) -> SEFTConfig:
    kwargs = {"density": 0.05, "update_interval": 5, "selection_steps": 2, "random_seed": 0}
    kwargs.update(overrides)
    return SEFTConfig(**kwargs)


def make_trainer(output_dir, config: SEFTConfig, callbacks=None, **arg_overrides) -> SFTTrainer:
    return SFTTrainer(
        model=tiny_pruned_llama(),
        args=sft_args(str(output_dir), **arg_overrides),
        train_dataset=text_dataset(),
        processing_class=char_tokenizer(),
        peft_config=config,
        callbacks=callbacks,
    )


def tuner_of(trainer):
    return trainer.model.base_model


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def expected_round_steps(max_steps: int, update_interval: int) -> list[int]:
    # The drop rate reaches 0 at total_steps (= max_steps), so no round happens there.
    return list(range(update_interval, max_steps, update_interval))


@pytest.fixture
def window_recorder(monkeypatch):
    """Records (layer, adapter, optimizer step, window steps) for every round a layer takes part in."""
    records = []
    original = SEFTLayer.evolve_adapter

    def recording(self, adapter_name, *args, **kwargs):
        window = self._windows.get(adapter_name)
        step = int(self.seft_step[adapter_name].item())
        records.append((id(self), step, None if window is None else window.steps))
        return original(self, adapter_name, *args, **kwargs)

    monkeypatch.setattr(SEFTLayer, "evolve_adapter", recording)
    return records


def check_merged_sparsity(base_weights, layers, merged_model) -> tuple[int, int]:
    """Per layer: the merged weight is W = (W0 with P zeroed) + scatter(T, delta) exactly, has at most N non-zeros,
    and exactly N structurally active positions. Returns the numbers of re-activated positions in T (zero in W0)
    and of pruned positions, summed over layers."""
    merged_modules = dict(merged_model.named_modules())
    reactivated = pruned_total = 0
    for name, w0 in base_weights.items():
        layer, merged = layers[name], merged_modules[name].weight.detach()
        assert not isinstance(merged_modules[name], SEFTLayer)
        indices = layer.seft_indices["default"].long()
        pruned_slots = layer.seft_pruned["default"]
        pruned = pruned_slots[pruned_slots >= 0].long()
        values = layer.seft_values["default"].detach()
        budget = int(torch.count_nonzero(w0))
        assert budget == w0.numel() // 2

        expected = w0.clone().view(-1)
        expected[pruned] = 0
        expected[indices] = expected[indices] + values
        assert torch.equal(merged.reshape(-1), expected), name

        active = w0.reshape(-1) != 0
        active[pruned] = False
        active[indices] = True
        assert int(active.sum()) == budget, name
        assert int(torch.count_nonzero(merged)) <= budget, name
        assert not (merged.reshape(-1)[~active] != 0).any(), f"{name}: non-zero outside the active set"
        # T and P never overlap; P holds only positions that are non-zero in W0.
        assert not torch.isin(pruned, indices).any()
        assert (w0.reshape(-1)[pruned] != 0).all()
        reactivated += int((w0.reshape(-1)[indices] == 0).sum())
        pruned_total += pruned.numel()
    return reactivated, pruned_total


# ---- 1. SFTTrainer with nothing but peft_config -------------------------------------------------------------


def test_sft_trainer_evolves_mask_with_defaults(tmp_path):
    """SFTConfig's own defaults (bf16 autocast and gradient checkpointing, on CPU) and no SEFT-specific code:
    total_steps defaults to max_steps, rounds move positions and re-activate pruned weights, loss goes down,
    and the merged model keeps exactly the base's sparsity."""
    max_steps = 30
    config = seft_config()
    assert config.total_steps is None
    model = tiny_pruned_llama()
    base_weights = base_linear_weights(model)
    trainer = SFTTrainer(
        model=model,
        args=sft_args(
            str(tmp_path), max_steps=max_steps, bf16=True, gradient_checkpointing=True, lr_scheduler_type="linear"
        ),
        train_dataset=text_dataset(),
        processing_class=char_tokenizer(),
        peft_config=config,
    )
    layers = seft_layers(trainer.model)
    assert set(layers) == set(base_weights) and len(layers) == 14
    # The adapted model starts exactly as the base: no pruned positions, zero values.
    before = adapter_snapshot(trainer.model)
    for name, state in before.items():
        assert (state["pruned"] == -1).all() and not state["values"].any()
        assert (base_weights[name].reshape(-1)[state["indices"].long()] != 0).all()

    trainer.train()

    tuner = tuner_of(trainer)
    assert tuner.peft_config["default"].total_steps == max_steps
    reports = tuner.evolution.reports
    assert [r.step for r in reports] == expected_round_steps(max_steps, 5)
    for report in reports:
        assert report.active == report.budget == sum(int(torch.count_nonzero(w)) for w in base_weights.values())
        assert report.skipped_layers == 0
        assert report.counts.dropped == report.counts.grown > 0
    # The drop rate decays: fewer positions change in later rounds.
    assert reports[0].counts.dropped > reports[-1].counts.dropped
    assert sum(r.counts.reactivated for r in reports) > 0
    assert sum(r.counts.repruned for r in reports) > 0

    after = adapter_snapshot(trainer.model)
    moved = sum(int((before[n]["indices"] != after[n]["indices"]).sum()) for n in before)
    assert moved > 0
    assert all(int(state["step"]) == max_steps for state in after.values())

    history = losses(trainer)
    assert len(history) == max_steps
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.1

    # No SEFTCallback was passed: the default callback only sets total_steps and logs nothing.
    assert not any(key.startswith("seft/") for entry in trainer.state.log_history for key in entry)

    reactivated, pruned = check_merged_sparsity(base_weights, layers, trainer.model.merge_and_unload())
    assert reactivated > 0 and pruned > 0


def test_sft_trainer_logs_rounds_with_callback(tmp_path):
    max_steps = 12
    trainer = make_trainer(tmp_path, seft_config(), callbacks=[SEFTCallback()], max_steps=max_steps)
    trainer.train()
    reports = tuner_of(trainer).evolution.reports
    assert [r.step for r in reports] == [5, 10]
    logged = [entry for entry in trainer.state.log_history if "seft/dropped" in entry]
    assert [entry["step"] for entry in logged] == [5, 10]
    for entry, report in zip(logged, reports, strict=True):
        for key in ROUND_KEYS:
            assert f"seft/{key}" in entry, key
        assert entry["seft/active"] == entry["seft/budget"] == report.budget
        for key in ("dropped", "grown", "reactivated", "repruned", "restored"):
            assert entry[f"seft/{key}"] == getattr(report.counts, key)
        assert entry["seft/dropped"] > 0
    assert sum(entry["seft/reactivated"] for entry in logged) > 0


# ---- 2. Gradient accumulation and gradient checkpointing -----------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"gradient_accumulation_steps": 2}, {"gradient_checkpointing": True}],
    ids=["grad-accumulation", "grad-checkpointing"],
)
def test_rounds_follow_optimizer_steps(tmp_path, window_recorder, overrides):
    max_steps, interval, selection = 15, 5, 2
    config = seft_config(update_interval=interval, selection_steps=selection)
    trainer = make_trainer(tmp_path, config, max_steps=max_steps, per_device_train_batch_size=2, **overrides)
    before = adapter_snapshot(trainer.model)
    trainer.train()

    assert trainer.state.global_step == max_steps
    reports = tuner_of(trainer).evolution.reports
    assert [r.step for r in reports] == expected_round_steps(max_steps, interval)
    assert all(r.step % interval == 0 for r in reports)
    for report in reports:
        assert report.active == report.budget and report.skipped_layers == 0 and report.counts.grown > 0
    after = adapter_snapshot(trainer.model)
    assert all(int(state["step"]) == max_steps for state in after.values())
    assert sum(int((before[n]["indices"] != after[n]["indices"]).sum()) for n in before) > 0

    # Every layer took part in every round, and its window saw exactly the last `selection` optimizer steps, each
    # the sum of its micro-batches (gradient checkpointing must not count the recomputation twice).
    num_layers = len(seft_layers(trainer.model))
    assert len(window_recorder) == num_layers * len(reports)
    assert {(step, steps) for _, step, steps in window_recorder} == {(report.step, selection) for report in reports}
    history = losses(trainer)
    assert history[-1] < history[0]


# ---- 3. Resuming from checkpoints ---------------------------------------------------------------------------

RESUME_MAX_STEPS, RESUME_INTERVAL, RESUME_SELECTION, RESUME_SAVE_STEPS = 20, 5, 3, 3


def resume_trainer(output_dir) -> SFTTrainer:
    # Rounds at 5, 10, 15; windows over steps 3-5, 8-10, 13-15. Checkpoints every 3 steps: 6 lies outside a
    # window, 3 and 9 inside one (one and two window steps collected).
    config = seft_config(update_interval=RESUME_INTERVAL, selection_steps=RESUME_SELECTION)
    return make_trainer(
        output_dir,
        config,
        max_steps=RESUME_MAX_STEPS,
        save_strategy="steps",
        save_steps=RESUME_SAVE_STEPS,
        per_device_train_batch_size=2,
    )


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    trainer = resume_trainer(output_dir)
    trainer.train()
    reports = list(tuner_of(trainer).evolution.reports)
    assert [r.step for r in reports] == [5, 10, 15]
    return output_dir, adapter_snapshot(trainer.model), reports, losses(trainer)


def num_trainable(snapshot) -> int:
    return sum(state["values"].numel() for state in snapshot.values())


def test_checkpoint_outside_window_is_small(uninterrupted_run):
    output_dir, final, _, _ = uninterrupted_run
    path = output_dir / "checkpoint-6" / "adapter_model.safetensors"
    saved = saved_tensors(path)
    keys = list(saved)
    tensor_bytes = sum(value.numel() * value.element_size() for value in saved.values())
    assert all(".seft_" in key and ".seft_window." not in key for key in keys), keys
    # values (fp32) + indices (int32) + pruned slots (int32): 12 bytes per trainable value, plus a 10-number
    # fingerprint and the step counter per layer.
    assert tensor_bytes <= 12 * num_trainable(final) + 88 * len(final)
    assert path.stat().st_size <= tensor_bytes + 200 * len(keys)


@pytest.mark.parametrize("checkpoint_step", [6, 9, 3])
def test_resume_continues_exactly(tmp_path, uninterrupted_run, checkpoint_step):
    output_dir, final, reports, history = uninterrupted_run
    checkpoint = output_dir / f"checkpoint-{checkpoint_step}"
    saved = saved_tensors(checkpoint / "adapter_model.safetensors")
    assert {int(v) for k, v in saved.items() if k.endswith(".seft_step")} == {checkpoint_step}
    # Inside a window (steps 3-5, 8-10) its statistics are saved with the adapter: one or two steps' worth.
    window_meta = [v for k, v in saved.items() if k.endswith(".seft_window.meta")]
    if checkpoint_step in (3, 9):
        assert len(window_meta) == len(final)
        assert {int(meta[0]) for meta in window_meta} == {1 if checkpoint_step == 3 else 2}
    else:
        assert not any(".seft_window." in key for key in saved)

    trainer = resume_trainer(tmp_path)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed = adapter_snapshot(trainer.model)

    assert trainer.state.global_step == RESUME_MAX_STEPS
    resumed_reports = tuner_of(trainer).evolution.reports
    assert [r.step for r in resumed_reports] == [r.step for r in reports if r.step > checkpoint_step]
    for got, want in zip(resumed_reports, [r for r in reports if r.step > checkpoint_step], strict=True):
        assert got.counts == want.counts and got.active == want.active == want.budget
    assert set(resumed) == set(final)
    for name, want in final.items():
        got = resumed[name]
        assert int(got["step"]) == int(want["step"]) == RESUME_MAX_STEPS
        assert torch.equal(got["indices"], want["indices"]), name
        assert torch.equal(got["pruned"], want["pruned"]), name
        torch.testing.assert_close(got["values"], want["values"], rtol=0, atol=1e-6)
    # The log history holds the checkpoint's entries, then the resumed steps.
    torch.testing.assert_close(torch.tensor(losses(trainer)), torch.tensor(history), rtol=0, atol=1e-5)


@pytest.mark.parametrize("is_trainable", [True, False])
def test_mid_window_checkpoint_restores_window_only_for_training(uninterrupted_run, is_trainable):
    output_dir, final, _, _ = uninterrupted_run
    model = PeftModel.from_pretrained(tiny_pruned_llama(), output_dir / "checkpoint-9", is_trainable=is_trainable)
    layers = seft_layers(model)
    assert set(layers) == set(final)
    for layer in layers.values():
        assert int(layer.seft_step["default"]) == 9
        if is_trainable:
            window = layer._windows["default"]
            assert window.steps == 2 and window.finite and window.selected
            assert torch.equal(window.trainable, layer.seft_indices["default"].long())
            assert 0 < int(window.is_grow.sum()) <= window.num_grow
            assert not torch.isin(window.candidates[window.is_grow], window.trainable).any()
        else:
            assert not layer._windows
    # Saved again outside training (no window open any more after an inference load): no window entries.
    if not is_trainable:
        assert not any(".seft_window." in key for key in get_peft_model_state_dict(model))


def saved_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# ---- 4. DDP (torchrun, gloo on CPU) ---------------------------------------------------------------------------


def run_ddp(out_dir: Path, *flags: str) -> list[dict]:
    torchrun(TESTS_DIR / "ddp_seft_train.py", str(out_dir), *flags)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def assert_ranks_identical(rank0: dict, rank1: dict) -> None:
    for name, want in rank0["snapshot"].items():
        got = rank1["snapshot"][name]
        for key in ("indices", "pruned", "values", "step"):
            assert torch.equal(got[key], want[key]), (name, key)
        assert torch.equal(rank0["effective_weights"][name], rank1["effective_weights"][name]), name
        assert torch.equal(rank0["in_place_weights"][name], rank1["in_place_weights"][name]), name
        for key, value in rank0["optimizer_state"][name].items():
            assert torch.equal(value, rank1["optimizer_state"][name][key]), (name, key)
    assert rank0["reports"] == rank1["reports"]


@pytest.mark.parametrize("flags", [(), ("--seed-optimizer-state", "--nonfinite")], ids=["default", "seeded-nonfinite"])
def test_ddp_ranks_stay_identical(tmp_path, flags):
    rank0, rank1 = run_ddp(tmp_path, *flags)
    assert [r["rank"] for r in (rank0, rank1)] == [0, 1]
    assert rank0["world_size"] == 2 and rank0["wrapper"] == "DistributedDataParallel"
    assert rank0["global_step"] == rank1["global_step"] == 12
    assert [r["step"] for r in rank0["reports"]] == [5, 10]
    assert all(r["active"] == r["budget"] and r["counts"]["grown"] > 0 for r in rank0["reports"])
    assert_ranks_identical(rank0, rank1)
    for result in (rank0, rank1):
        assert all(int(state["step"]) == 12 for state in result["snapshot"].values())
        moved = sum(int((result["initial"][n]["indices"] != s["indices"]).sum()) for n, s in result["snapshot"].items())
        assert moved > 0
    # Every rank reduced its window statistics over the ranks (the global batch) and computed the same round itself:
    # the guard's broadcast of rank 0's positions never had anything to change, on any rank.
    assert not any(rank0["local_decision_differs"])
    assert not any(rank1["local_decision_differs"])

    if "--nonfinite" in flags:
        # Each rank saw an inf gradient in a different layer: the reduced windows are non-finite for both layers on
        # both ranks, so both layers are skipped everywhere in the first round. Nothing hangs, reports agree.
        bad_layers = ("model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj")
        assert [r["skipped_layers"] for r in rank0["reports"]] == [2, 0]
        for result in (rank0, rank1):
            first_round = result["after_first_round"]
            for name in bad_layers:
                assert torch.equal(first_round[name]["indices"], result["initial"][name]["indices"])
            others = [n for n in first_round if n not in bad_layers]
            assert any(not torch.equal(first_round[n]["indices"], result["initial"][n]["indices"]) for n in others)


# ---- 5. A plain PyTorch loop ---------------------------------------------------------------------------------


def plain_model(**config_overrides):
    model = get_peft_model(tiny_pruned_llama(), seft_config(**config_overrides))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


@pytest.mark.parametrize(("interval", "selection"), [(5, 2), (4, 4)])
def test_plain_loop_rounds_at_expected_steps(window_recorder, interval, selection):
    total = 3 * interval
    model, optimizer = plain_model(update_interval=interval, selection_steps=selection, total_steps=total)
    layers = list(seft_layers(model).values())
    reports = model.base_model.evolution.reports
    batch = token_batch()
    round_steps = expected_round_steps(total, interval)
    window_steps, history = [], []
    for step in range(1, total + 1):
        loss = model(input_ids=batch, labels=batch).loss
        open_windows = {bool(layer._windows) for layer in layers}
        assert len(open_windows) == 1
        if open_windows.pop():
            window_steps.append(step)
        loss.backward()
        before = [layer.seft_indices["default"].clone() for layer in layers]
        optimizer.step()
        if step in round_steps:
            assert reports[-1].step == step and reports[-1].active == reports[-1].budget
            num_changed = 0
            for layer, old in zip(layers, before, strict=True):
                changed = layer.seft_indices["default"] != old
                values = layer.seft_values["default"]
                state = optimizer.state[values]
                # New positions start at zero, with fresh Adam moments (grown_optimizer_state="zero", the default).
                assert not values[changed].any()
                assert not state["exp_avg"][changed].any() and not state["exp_avg_sq"][changed].any()
                assert state["exp_avg_sq"][~changed].any()
                num_changed += int(changed.sum())
            assert num_changed == reports[-1].counts.dropped > 0
        else:
            assert not reports or reports[-1].step < step
        optimizer.zero_grad()
        history.append(loss.item())

    assert [r.step for r in reports] == round_steps
    # Windows cover exactly the `selection` steps before each round, including step 1 when selection == interval.
    assert window_steps == [s for r in round_steps for s in range(r - selection + 1, r + 1)]
    assert {(step, steps) for _, step, steps in window_recorder} == {(r, selection) for r in round_steps}
    assert all(int(layer.seft_step["default"]) == total for layer in layers)
    assert history[-1] < history[0]


def test_plain_loop_without_total_steps_fails_at_first_step():
    model, optimizer = plain_model()
    assert model.peft_config["default"].total_steps is None
    batch = token_batch()
    model(input_ids=batch, labels=batch).loss.backward()
    with pytest.raises(ValueError, match=r"SEFTConfig\.total_steps is not set.*optimizer steps"):
        optimizer.step()
    assert all(int(layer.seft_step["default"]) == 0 for layer in seft_layers(model).values())


def test_plain_loop_static_delta_needs_no_total_steps():
    model, optimizer = plain_model(initial_drop_rate=0.0)
    before = adapter_snapshot(model)
    batch = token_batch()
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = adapter_snapshot(model)
    assert all(torch.equal(before[n]["indices"], after[n]["indices"]) for n in before)
    assert any(after[n]["values"].any() for n in after)


def dpo_run(output_dir, precompute_ref_log_probs: bool) -> tuple[dict, list[float]]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_dict(
        {
            "prompt": ["the quick ", "sparse models ", "hello ", "pruned "] * 2,
            "chosen": ["brown fox", "can be repaired", "world", "weights"] * 2,
            "rejected": ["lazy cat", "are broken", "there", "values"] * 2,
        }
    )
    keys = ("use_cpu", "bf16", "max_steps", "per_device_train_batch_size", "learning_rate", "lr_scheduler_type")
    common = {key: value for key, value in sft_args(str(output_dir)).to_dict().items() if key in keys}
    args = DPOConfig(
        output_dir=str(output_dir),
        **{**common, "max_steps": 6},
        gradient_checkpointing=False,
        precompute_ref_log_probs=precompute_ref_log_probs,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=tiny_pruned_llama(),
        ref_model=None,
        args=args,
        train_dataset=data,
        processing_class=char_tokenizer(),
        peft_config=seft_config(initial_drop_rate=0.0),
    )
    trainer.train()
    return adapter_snapshot(trainer.model), [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_dpo_implicit_reference_matches_precomputed_reference(tmp_path):
    """DPOTrainer(ref_model=None) runs the reference forward under disable_adapter between the policy's forward and
    backward; training must match a run whose reference log-probs were computed before training."""
    implicit, implicit_losses = dpo_run(tmp_path / "implicit", precompute_ref_log_probs=False)
    precomputed, precomputed_losses = dpo_run(tmp_path / "precomputed", precompute_ref_log_probs=True)
    assert len(implicit_losses) == 6
    torch.testing.assert_close(implicit_losses, precomputed_losses, rtol=0, atol=1e-6)
    for name, state in implicit.items():
        assert state["values"].abs().max() > 1e-3  # trained
        torch.testing.assert_close(state["values"], precomputed[name]["values"], rtol=0, atol=1e-5)


def test_bf16_full_eval_after_training(tmp_path):
    """Trainer(bf16_full_eval=True).evaluate() after train() casts the model to bf16 after forwards wrote W in place:
    evaluation runs (it raised a dtype error) with a sane loss."""
    trainer = make_trainer(tmp_path, seft_config(), max_steps=6, bf16_full_eval=True, per_device_eval_batch_size=4)
    trainer.eval_dataset = trainer.train_dataset.select(range(8))
    trainer.train()
    metrics = trainer.evaluate()
    assert trainer.model.dtype == torch.bfloat16 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert metrics["eval_loss"] < 5.0
