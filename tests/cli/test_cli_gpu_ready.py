"""The ``seft`` command's training and publishing options, on CPU with code paths chosen as on a GPU machine: the
device and precision defaults, chat and prompt/completion datasets through SFTTrainer's own processing (packing,
completion-only loss), checkpoints and resume, epochs, help on every flag, and ``seft push`` to a local Hub
stand-in followed by ``seft eval``/``seft merge`` of the published adapter by its Hub id."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file
from test_cli import nonzeros

from peft_seft.cli import build_parser, finetune, loading, main
from peft_seft.export.hub_standin import HubStandIn
from peft_seft.testing import pruned_workspace, write_chats

QUIET = ["--no-progress", "-q", "--threads", "1"]
DATA = ["--seq-len", "48", "--eval-tokens", "256"]
TRAIN = ["--batch-size", "4", "--lr", "1e-2", "--density", "0.1", "--update-interval", "2", "--selection-steps", "1"]
TRAIN += ["--logging-steps", "1"]
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = pruned_workspace(tmp_path_factory.mktemp("cli-gpu-ready"))
    return root


def test_device_dtype_and_precision_defaults_follow_the_hardware(monkeypatch):
    assert loading.resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loading.resolve_device(None) == "cuda"
    assert loading.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert loading.resolve_dtype("auto", "cpu") == torch.float32
    assert finetune.default_precision("cuda:0") == "bf16" and finetune.default_precision("cpu") == "fp32"


def test_trainer_settings_reach_the_sft_config():
    settings = finetune.TrainSettings(precision="bf16", gradient_checkpointing=True, save_steps=3, use_cpu=True)
    config = finetune.sft_config("out", settings)
    assert config.bf16 and not config.fp16 and config.save_steps == 3 and config.save_strategy == "steps"
    assert config.gradient_checkpointing  # under either name: activation_checkpointing (>= 5.23) or the old one


def test_every_flag_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"seft {name} {action.option_strings} has no help"


@pytest.mark.parametrize(("kind", "extra"), [("conversational", ["--packing"]), ("prompt-completion", [])])
def test_train_on_chat_datasets_keeps_the_sparsity_exactly(ws, tmp_path, kind, extra):
    chats = write_chats(tmp_path, kind)
    out = tmp_path / "run"
    argv = ["train", "--model", str(ws / "pruned"), "--dataset", str(chats), "--max-steps", "4", *TRAIN, *extra]
    assert main([*argv, *DATA, "--output-dir", str(out), *QUIET]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [step for step, _ in metrics["training"]["losses"]] == [1, 2, 3, 4]
    card = ModelCard.load(out / "adapter" / "README.md")
    assert "chats from" in card.text and "SFTTrainer's chat processing" in card.text
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--output-dir", str(merged), *QUIET]) == 0
    assert nonzeros(merged) == nonzeros(ws / "pruned")


def test_prompt_completion_loss_is_on_the_completion_only(ws, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = loading.load_model(str(ws / "pruned"), device="cpu")
    data = Dataset.from_list([{"prompt": "abc? ", "completion": "xyz"}])
    args = SFTConfig(output_dir=str(tmp_path), max_length=32, report_to=[], bf16=False)
    processed = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train_dataset
    labels = processed[0]["labels"]
    assert labels[: len("abc? ")] == [-100] * len("abc? ") and -100 not in labels[len("abc? ") :]


def test_checkpoints_resume_and_epochs(ws, tmp_path):
    base = ["train", "--model", str(ws / "pruned"), "--dataset", str(ws / "corpus.jsonl"), *TRAIN, *DATA, *QUIET]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main([*base, "--max-steps", "4", "--save-steps", "2", "--output-dir", str(full)]) == 0
    assert {p.name for p in (full / "trainer").iterdir()} >= {"checkpoint-2", "checkpoint-4"}
    checkpoint = full / "trainer" / "checkpoint-2"
    assert main([*base, "--max-steps", "4", "--resume", str(checkpoint), "--output-dir", str(resumed)]) == 0
    first = load_file(full / "adapter" / "adapter_model.safetensors")
    second = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[k].float(), second[k].float(), atol=1e-6) for k in first)

    epochs = tmp_path / "epochs"
    argv = [*base, "--num-train-epochs", "1", "--bf16", "--gradient-checkpointing", "--output-dir", str(epochs)]
    assert main(argv) == 0
    metrics = json.loads((epochs / "metrics.json").read_text())
    assert metrics["training"]["steps"] >= 1 and metrics["settings"]["training"]["max_steps"] == -1


def test_push_then_eval_and_merge_by_hub_id(ws, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", str(ws / "pruned"), "--dataset", str(ws / "corpus.jsonl"), "--max-steps", "2"]
    assert main([*argv, *TRAIN, *DATA, "--output-dir", str(run), *QUIET]) == 0
    with HubStandIn(known_models=("org/tiny-llama",)) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        push = ["push", "--adapter", str(run / "adapter"), "--token", "hf_test"]
        assert main([*push, "--adapter-repo", "me/seft", *QUIET]) == 2  # a local base needs --base-repo
        assert "pass a base repo (--base-repo)" in capsys.readouterr().err and hub.repos == {}
        repos = ["--base-repo", "me/pruned", "--adapter-repo", "me/seft", "--merged-repo", "me/merged"]
        assert main([*push, *repos, "--origin-model", "org/tiny-llama", *QUIET]) == 0
        assert set(hub.repos) == {"me/pruned", "me/seft", "me/merged"}
        card = ModelCard(hub.repos["me/pruned"].refs["main"]["README.md"].decode())
        assert card.data.base_model == "org/tiny-llama" and "method=magnitude" in card.text

        # eval and merge by Hub id run in a fresh process pointed at the stand-in, as a user's would
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": PACKAGE_ROOT}
        env.pop("HF_HUB_OFFLINE", None)
        seft = [sys.executable, "-m", "peft_seft"]
        evaluate = ["eval", "--adapter", "me/seft", "--dataset", str(ws / "corpus.jsonl"), *DATA, *QUIET]
        done = subprocess.run([*seft, *evaluate], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Sparsity of the target layers: 50.00%" in done.stdout
        merged = tmp_path / "merged"
        merge = ["merge", "--adapter", "me/seft", "--output-dir", str(merged), *QUIET]
        done = subprocess.run([*seft, *merge], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert nonzeros(merged) == nonzeros(ws / "pruned")


def test_gradient_checkpointing_uses_the_name_the_installed_transformers_knows(monkeypatch):
    from types import SimpleNamespace

    def config_fields(*names):
        return lambda cls: [SimpleNamespace(name=name) for name in names]

    monkeypatch.setattr(finetune, "fields", config_fields("bf16", "gradient_checkpointing", "activation_checkpointing"))
    assert finetune._checkpointing_field() == "activation_checkpointing"  # transformers >= 5.23
    monkeypatch.setattr(finetune, "fields", config_fields("bf16", "gradient_checkpointing"))
    assert finetune._checkpointing_field() == "gradient_checkpointing"  # transformers 5.x before 5.23
