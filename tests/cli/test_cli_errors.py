"""Hostile and mistaken input to the ``seft`` command: every user error is one line on stderr and a non-zero exit
status, no input is ever overwritten, a non-empty output directory needs --overwrite, and a failed run leaves the
output directory as it was (no half-written folder, no temporary sibling)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_seft import SEFTConfig
from peft_seft.cli import main
from peft_seft.testing import pruned_workspace

QUIET = ["--no-progress", "-q", "--threads", "1"]
DATA = ["--seq-len", "32", "--eval-tokens", "256"]
TRAIN = ["--max-steps", "2", "--batch-size", "2", "--density", "0.1", "--update-interval", "1"]
TRAIN += ["--selection-steps", "1"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = pruned_workspace(tmp_path_factory.mktemp("cli-errors"))
    model = AutoModelForCausalLM.from_pretrained(root / "pruned")
    model.name_or_path = model.config._name_or_path = str(root / "pruned")
    get_peft_model(model, SEFTConfig(task_type="CAUSAL_LM", density=0.1, random_seed=0)).save_pretrained(
        root / "adapter"
    )
    shutil.copytree(root / "adapter", root / "truncated")
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "adapter", root / "no-base")
    config = json.loads((root / "no-base" / "adapter_config.json").read_text())
    (root / "no-base" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    shutil.copytree(root / "tiny", root / "garbage-model")
    (root / "garbage-model" / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    (root / "empty.jsonl").write_text("")
    (root / "empty.txt").write_text("")
    (root / "garbage.jsonl").write_text('{"text": "unterminated\n\x00\x01 {not json\n')
    (root / "garbage.csv").write_text('id,text\n1,"never closed\n2,3,4\n')
    (root / "blank.jsonl").write_text("".join(json.dumps({"text": "  "}) + "\n" for _ in range(10)))
    return root


def run(capsys, argv: list[str]) -> tuple[int, str]:
    status = main([*argv, *QUIET])
    return status, capsys.readouterr().err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


CASES = {
    "garbage model.safetensors": (["eval", "--model", "{ws}/garbage-model"], "Could not load the model"),
    "empty .jsonl": (["eval", "--dataset", "{ws}/empty.jsonl"], "is empty"),
    "empty .txt": (["eval", "--dataset", "{ws}/empty.txt"], "is empty"),
    "garbage .jsonl": (["eval", "--dataset", "{ws}/garbage.jsonl"], "Cannot read dataset file"),
    "garbage .csv": (["eval", "--dataset", "{ws}/garbage.csv"], "Cannot read dataset file"),
    "--device foo": (["eval", "--device", "foo"], "--device foo is not a torch device"),
    "wanda on an empty dataset": (
        ["prune", "--method", "wanda", "--dataset", "{ws}/blank.jsonl", "--output-dir", "{tmp}/out"],
        "non-empty documents",
    ),
    "eval with a truncated adapter": (["eval", "--adapter", "{ws}/truncated"], "Could not load the adapter"),
    "merge with a truncated adapter": (
        ["merge", "--adapter", "{ws}/truncated", "--output-dir", "{tmp}/out"],
        "Could not load the adapter",
    ),
    "adapter config without a base": (
        ["merge", "--adapter", "{ws}/no-base", "--output-dir", "{tmp}/out"],
        "names no base model in its config; pass --model",
    ),
    "prune into its own model": (
        ["prune", "--method", "magnitude", "--model", "{ws}/pruned", "--output-dir", "{ws}/pruned", "--overwrite"],
        "would overwrite the input",
    ),
    "merge into the base": (
        ["merge", "--adapter", "{ws}/adapter", "--output-dir", "{ws}/pruned", "--overwrite"],
        "would overwrite the input",
    ),
    "merge into a folder holding the adapter": (
        ["merge", "--adapter", "{ws}/adapter", "--output-dir", "{ws}", "--overwrite"],
        "would overwrite the input",
    ),
    "non-empty output": (["eval", "--output-dir", "{ws}/no-base"], "exists and is not empty; pass --overwrite"),
    "output under a file": (
        ["prune", "--method", "magnitude", "--output-dir", "{ws}/empty.txt/out"],
        "is not a directory",
    ),
}
if not torch.cuda.is_available():
    CASES["--device cuda without a GPU"] = (["eval", "--device", "cuda"], "no CUDA GPU is available")


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_line_and_change_nothing(ws, tmp_path, capsys, case):
    argv, message = CASES[case]
    argv = [a.format(ws=ws, tmp=tmp_path) for a in argv]
    if "--model" not in argv and argv[0] in ("eval", "prune"):
        argv += ["--model", str(ws / "tiny")]
    if "--dataset" not in argv and argv[0] == "eval":
        argv += ["--dataset", str(ws / "corpus.jsonl")]
    if argv[0] != "merge":
        argv += DATA
    before = {name: snapshot(ws / name) for name in ("tiny", "pruned", "adapter")}
    status, err = run(capsys, argv)
    assert status != 0
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert err.startswith(f"seft {argv[0]}: error: ")
    assert {name: snapshot(ws / name) for name in before} == before
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) and no_leftovers(ws)


def test_overwrite_replaces_the_whole_directory(ws, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    (out / "model.safetensors.index.json").write_text("{}")
    argv = ["merge", "--adapter", str(ws / "adapter"), "--output-dir", str(out)]
    assert run(capsys, argv)[0] == 2
    assert run(capsys, [*argv, "--overwrite"])[0] == 0
    assert "model.safetensors.index.json" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert no_leftovers(tmp_path)


def test_a_failed_run_leaves_the_output_as_it_was(ws, tmp_path, capsys, monkeypatch):
    import peft_seft.cli.commands as commands

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    out = tmp_path / "repair"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    monkeypatch.setattr(commands, "merge_and_save", broken)
    argv = ["repair", "--model", str(ws / "tiny"), "--dataset", str(ws / "corpus.jsonl"), "--method", "magnitude"]
    status, err = run(capsys, [*argv, *DATA, *TRAIN, "--output-dir", str(out), "--overwrite"])
    assert status == 1 and "RuntimeError: disk on fire (run with -v for the traceback)" in err
    assert snapshot(out) == {"keep.txt": b"previous run"}
    assert no_leftovers(tmp_path)


def test_tilde_is_expanded(ws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = ["prune", "--model", str(ws / "tiny"), "--method", "magnitude", "--output-dir", "~/pruned-here"]
    assert run(capsys, argv)[0] == 0
    assert (tmp_path / "pruned-here" / "model.safetensors").is_file()
    assert not Path("~").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_fails_before_the_work(ws, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        argv = ["prune", "--model", str(ws / "tiny"), "--method", "magnitude", "--output-dir", str(locked / "out")]
        status, err = run(capsys, argv)
    finally:
        locked.chmod(0o700)
    assert status == 2 and "is not writable" in err
