"""examples/sft_seft.py (TRL's SFT script with SEFT) end to end in a fresh process on a tiny pruned Llama and tiny
chat datasets: conversational with packing, prompt/completion with completion-only loss and ``--push_to_hub``
to the local Hub stand-in. The merged model keeps the base's non-zeros in every layer exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_seft import SEFTConfig
from peft_seft.export.hub_standin import HubStandIn
from peft_seft.pruning import prune, sparsity_report
from peft_seft.testing import save_tiny_llama, write_chats
from peft_seft.tuner.trl_args import SEFTArguments, get_seft_config


def nonzeros_per_layer(model) -> dict[str, int]:
    return {layer.name: layer.nonzeros for layer in sparsity_report(model).layers}


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "sft_seft.py"
ARGS = ["--max_steps", "4", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_length", "64"]
ARGS += ["--bf16", "False", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no"]
ARGS += ["--dataloader_pin_memory", "False", "--seft_density", "0.1", "--seft_update_interval", "2"]
ARGS += ["--seft_selection_steps", "1", "--seft_random_seed", "0"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trl-script")
    save_tiny_llama(root / "tiny")
    model = AutoModelForCausalLM.from_pretrained(root / "tiny")
    prune(model, "magnitude", 0.5, show_progress=False)
    model.save_pretrained(root / "pruned")
    (root / "pruned" / "tokenizer.json").write_bytes((root / "tiny" / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (root / "tiny" / name).is_file():
            (root / "pruned" / name).write_bytes((root / "tiny" / name).read_bytes())
    return root / "pruned"


def test_seft_arguments_parse_with_trl_parser():
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, SEFTArguments))
    argv = [
        "--output_dir",
        "o",
        "--bf16",
        "False",
        "--seft_density",
        "0.05",
        "--seft_target_modules",
        "q_proj",
        "v_proj",
    ]
    *_, seft_args = parser.parse_args_and_config(args=[*argv, "--seft_pattern", "2:4"])
    config = get_seft_config(seft_args)
    assert config.density == 0.05 and set(config.target_modules) == {"q_proj", "v_proj"}
    # N:M keeps its topology unless re-activation is asked for, as SEFTConfig does
    assert config.pattern == "2:4" and config.grow_pruned is False and config.task_type == "CAUSAL_LM"
    window_options = ["--seft_growth_statistic", "consistent", "--seft_growth_normalization", "input_output"]
    window_options += ["--seft_drop_criterion", "gradient", "--seft_candidate_factor", "2"]
    window_options += ["--seft_grow_pruned", "true"]
    *_, seft_args = parser.parse_args_and_config(args=[*argv, "--seft_pattern", "2:4", *window_options])
    config = get_seft_config(seft_args)
    assert (config.growth_statistic, config.growth_normalization) == ("consistent", "input_output")
    assert (config.drop_criterion, config.candidate_factor, config.grow_pruned) == ("gradient", 2.0, True)
    with pytest.raises(SystemExit):  # a value SEFTConfig would refuse is refused by the parser, with the choices
        parser.parse_args_and_config(args=[*argv, "--seft_growth_normalization", "output"])


def test_seft_argument_defaults_are_seft_config_defaults():
    assert get_seft_config(SEFTArguments()).to_dict() == SEFTConfig(task_type="CAUSAL_LM").to_dict()


@pytest.mark.parametrize("kind", ["conversational", "prompt-completion"])
def test_sft_script_end_to_end(pruned, tmp_path, kind):
    data = tmp_path / "data"
    write_chats(data, kind).rename(data / "train.jsonl")
    out = tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), "--model_name_or_path", str(pruned), "--dataset_name", str(data)]
    argv += [*ARGS, "--output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    with HubStandIn(known_models=("org/tiny-llama",)) as hub:
        if kind == "conversational":
            argv += ["--packing"]
        else:  # completion-only loss is SFTTrainer's default for prompt/completion data; publish as well
            argv += ["--completion_only_loss", "True", "--push_to_hub", "--hub_model_id", "me/trl-seft"]
            argv += ["--seft_base_repo", "me/trl-pruned", "--seft_merged_repo", "me/trl-merged", "--hub_token", "x"]
            env["HF_ENDPOINT"] = hub.url
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        if kind == "prompt-completion":
            assert set(hub.repos) == {"me/trl-pruned", "me/trl-seft", "me/trl-merged"}
            config = json.loads(hub.repos["me/trl-seft"].refs["main"]["adapter_config.json"])
            assert config["base_model_name_or_path"] == "me/trl-pruned"
    card = ModelCard.load(out / "README.md")
    assert {"seft", "sparse"} <= set(card.data.tags) and "1 evolution round (optimizer steps 2 to 2" in card.text
    base = AutoModelForCausalLM.from_pretrained(pruned)
    before = nonzeros_per_layer(base)
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    assert nonzeros_per_layer(merged) == before
