"""SEFT model cards and Hub publishing, against a local stand-in for the Hub's HTTP API
(peft_seft/export/hub_standin.py) that validates metadata as the Hub does. A fresh process then loads what was
published, from the stand-in, with the lines of the cards' usage snippets and reproduces the uploader's logits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from peft import PeftModel, get_peft_model

from peft_seft import SEFTConfig
from peft_seft.export.hub import push_adapter, push_sparse_model
from peft_seft.export.hub_standin import HubStandIn
from peft_seft.pruning import prune, sparsity_report
from peft_seft.testing import chat_tokenizer, tiny_char_llama
from peft_seft.tuner.cards import model_card_text, write_model_card

SETTINGS = {"update_interval": 2, "selection_steps": 1, "initial_drop_rate": 0.3, "drop_schedule": "linear"}
DENSE = "org/tiny-llama"  # the dense model the pruned one comes from (known to the stand-in)
TOKEN = "hf_test_token"
LOADER = Path(__file__).with_name("load_from_hub.py")


def seft_model(train_steps: int = 0, name: str = "org/tiny-llama-pruned"):
    torch.manual_seed(0)
    model = tiny_char_llama()
    prune(model, "magnitude", 0.5, show_progress=False)
    model.name_or_path = model.config._name_or_path = name
    config = SEFTConfig(task_type="CAUSAL_LM", density=0.1, total_steps=8, random_seed=0, **SETTINGS)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(train_steps):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.eval()


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield seft_model(train_steps=6)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def hub(monkeypatch):
    with HubStandIn(known_models=(DENSE,)) as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)
        yield standin


def test_save_pretrained_writes_the_seft_card(trained, tmp_path):
    trained.save_pretrained(tmp_path, save_embedding_layers=False)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "org/tiny-llama-pruned"
    assert {"peft", "seft", "sparse", "base_model:adapter:org/tiny-llama-pruned"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"
    text = card.text
    assert "More Information Needed" not in text  # not PEFT's template
    assert "sparsity of the 14 target layers: 50.00% (9,216 non-zeros of 18,432 weights)" in text
    assert "trainable values: 1,842 (density 0.1)" in text
    for name, value in {**SETTINGS, "density": 0.1, "grow_pruned": True, "prune_criterion": "sensitivity"}.items():
        assert f"| {name} | {value} |" in text, name
    assert "| pattern | unstructured |" in text
    assert "(?:down_proj\\|gate_proj\\|" in text  # the regex's pipes are escaped inside the markdown table
    assert [r.step for r in trained.base_model.evolution.reports] == [2, 4, 6]
    assert "3 evolution rounds (optimizer steps 2 to 6" in text
    assert "equalled the base's non-zero count (9,216)" in text
    assert "pip install peft-seft" in text and "import peft_seft" in text


def test_card_is_kept_when_a_loaded_adapter_is_saved_again(trained, tmp_path):
    trained.save_pretrained(tmp_path, save_embedding_layers=False)
    write_model_card(trained, tmp_path, extra={"dataset": "docs"})
    first = (tmp_path / "README.md").read_text()
    base = tiny_char_llama()
    prune(base, "magnitude", 0.5, show_progress=False)
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    reloaded.save_pretrained(tmp_path, save_embedding_layers=False)  # no rounds in this session, no extra
    again = (tmp_path / "README.md").read_text()
    assert "3 evolution rounds (optimizer steps 2 to 6" in again and "- dataset: docs" in again
    assert ModelCard(again).data.tags == ModelCard(first).data.tags


def test_a_local_base_gets_no_hub_tag_and_never_reaches_a_published_card(tmp_path):
    local = tmp_path / "pruned"
    local.mkdir()
    model = seft_model(name=str(local))
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == str(local)  # as PEFT writes it locally (PEFT's own tests check this)
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)
    assert "No evolution rounds were recorded" in card.text
    published = ModelCard(model_card_text(model, base_model="me/pruned", repo_id="me/seft"))
    assert published.data.base_model == "me/pruned" and str(local) not in published.content


def test_local_base_is_refused_before_anything_is_created(hub, tmp_path):
    local = tmp_path / "pruned"
    local.mkdir()
    model = seft_model(name=str(local))
    with pytest.raises(ValueError, match="local path .* publish the pruned base first"):
        push_adapter(model, "me/tiny-seft", token=TOKEN)
    with pytest.raises(ValueError, match="local path"):
        push_sparse_model(model.get_base_model(), "me/tiny-pruned", base_model=str(local), token=TOKEN)
    assert hub.requests == [] and hub.repos == {}


def test_the_standin_rejects_what_the_hub_rejects(hub):
    """Without our checks, a local path in base_model fails at the Hub only after the repo was created."""
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo("me/raw")
    bad = "---\nbase_model: /home/me/pruned\ntags:\n- base_model:adapter:/home/me/pruned\n---\n"
    with pytest.raises(ValueError, match='"base_model" with value "/home/me/pruned" is not valid'):
        api.upload_file(path_or_fileobj=bad.encode(), path_in_repo="README.md", repo_id="me/raw")
    good = f"---\nbase_model: {DENSE}\ntags:\n- base_model:finetune:{DENSE}\n---\n"
    api.upload_file(path_or_fileobj=good.encode(), path_in_repo="README.md", repo_id="me/raw")
    assert hub.metadata_errors("---\nbase_model: someone/unknown\n---\n")  # ids of models the Hub does not have


def test_publish_pruned_base_adapter_and_merged_model_and_load_them_in_a_fresh_process(trained, hub, tmp_path):
    tokenizer = chat_tokenizer()
    base = tiny_char_llama()
    prune(base, "magnitude", 0.5, show_progress=False)
    how = {"pruning": "magnitude, sparsity 0.5"}
    push_sparse_model(base, "me/tiny-pruned", tokenizer, DENSE, "Tiny Llama, 50 % pruned", how, token=TOKEN)
    with pytest.raises(ValueError, match="local path|not a Hugging Face Hub repo id"):
        push_adapter(trained, "me/tiny-seft", base_model="./pruned", token=TOKEN)
    push_adapter(trained, "me/tiny-seft", base_model="me/tiny-pruned", token=TOKEN, commit_message="SEFT, 6 steps")

    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        merged = copy.deepcopy(trained).merge_and_unload()
    assert sparsity_report(merged).nonzeros <= sparsity_report(base).nonzeros  # a trained value may be 0
    push_sparse_model(merged, "me/tiny-seft-merged", tokenizer, DENSE, "Tiny Llama repaired", how, token=TOKEN)

    repo = hub.repos["me/tiny-seft"]
    assert repo.private is False  # private=None: the owner's default
    assert repo.commits[-1]["summary"] == "SEFT, 6 steps"
    assert set(repo.refs["main"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    config = json.loads(repo.refs["main"]["adapter_config.json"])
    assert config["base_model_name_or_path"] == "me/tiny-pruned" and config["peft_type"] == "SEFT"
    card = ModelCard(repo.refs["main"]["README.md"].decode())
    assert card.data.base_model == "me/tiny-pruned"
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-seft")' in card.text
    merged_card = ModelCard(hub.repos["me/tiny-seft-merged"].refs["main"]["README.md"].decode())
    assert merged_card.data.base_model == DENSE and merged_card.data.library_name == "transformers"
    assert "- pruning: magnitude, sparsity 0.5" in merged_card.text
    pruned_card = ModelCard(hub.repos["me/tiny-pruned"].refs["main"]["README.md"].decode())
    assert "| model.layers.0.self_attn.q_proj | 32 x 32 | 512 | 50.00% |" in pruned_card.text
    for files in (repo.refs["main"], hub.repos["me/tiny-pruned"].refs["main"]):
        assert str(tmp_path) not in b"".join(files.values()).decode(errors="ignore")

    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": TOKEN}
    env.pop("HF_HUB_OFFLINE", None)
    run = subprocess.run(
        [sys.executable, str(LOADER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = torch.load(tmp_path / "logits.pt")
    adapter_diff = (loaded["adapter"] - expected).abs().max().item()
    merged_diff = (loaded["merged"] - expected).abs().max().item()
    print(f"max |logits diff| after a fresh-process load: adapter {adapter_diff:.2e}, merged {merged_diff:.2e}")
    assert adapter_diff < 1e-5 and merged_diff < 1e-4
    assert loaded["nonzeros"] == sparsity_report(merged).nonzeros


def test_visibility_revision_and_pull_request(trained, hub):
    push_adapter(trained, "me/public", base_model=DENSE, token=TOKEN, private=False)
    with pytest.raises(ValueError, match="exists and is public; private=True does not change"):
        push_adapter(trained, "me/public", base_model=DENSE, token=TOKEN, private=True)
    assert len(hub.repos["me/public"].commits) == 1

    with HubStandIn(known_models=(DENSE,), private_by_default=True) as org:
        constants.ENDPOINT = org.url
        push_adapter(trained, "org/default-visibility", base_model=DENSE, token=TOKEN)
        assert org.repos["org/default-visibility"].private is True
    constants.ENDPOINT = hub.url

    push_adapter(trained, "me/branches", base_model=DENSE, token=TOKEN, revision="v1")
    assert set(hub.repos["me/branches"].refs["v1"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert hub.repos["me/branches"].refs["main"] == {}
    commit = push_adapter(trained, "me/branches", base_model=DENSE, token=TOKEN, create_pr=True)
    assert commit.pr_url.endswith("/me/branches/discussions/1")
    assert "adapter_model.safetensors" in hub.repos["me/branches"].refs["refs/pr/1"]


def test_card_text_names_the_given_base(trained):
    text = model_card_text(trained, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", extra={"dataset": "docs"})
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "- dataset: docs" in text
