"""SEFT model cards and Hub upload.

The upload is stubbed at the HTTP boundary: ``huggingface_hub`` 2.4 sends every Hub API request through one shared
``httpx2.Client`` made by a replaceable factory (``huggingface_hub.set_client_factory``), so the tests install a
client whose ``httpx2.MockTransport`` records each request and answers with canned JSON. The canned ``preupload``
answer marks every file ``regular`` (the real Hub says ``lfs`` for .safetensors, which would route the weights
through the Xet protocol in the Rust ``hf_xet`` client, outside httpx2); regular files travel base64-encoded inside
the commit request, so the test reads back every uploaded byte.
"""

from __future__ import annotations

import base64
import json

import httpx2
import pytest
import torch
from cli_helpers import tiny_llama
from huggingface_hub import ModelCard, set_client_factory
from huggingface_hub.utils._http import default_client_factory
from peft import get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from peft_seft import SEFTConfig
from peft_seft.hub import model_card_text, upload_adapter, write_model_card
from peft_seft.pruning import prune

REPO = "someone/seft-tiny"
SETTINGS = {"update_interval": 2, "selection_steps": 1, "initial_drop_rate": 0.3, "drop_schedule": "linear"}


def seft_model(train_steps: int = 0):
    torch.manual_seed(0)
    model = tiny_llama()
    prune(model, "magnitude", 0.5, show_progress=False)
    model.name_or_path = model.config._name_or_path = "org/tiny-llama-pruned"
    config = SEFTConfig(task_type="CAUSAL_LM", density=0.1, total_steps=8, random_seed=0, **SETTINGS)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(3, 90, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(train_steps):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield seft_model(train_steps=6)
    finally:
        torch.set_num_threads(threads)


def test_card_has_peft_metadata_sparsity_and_evolution_settings(trained, tmp_path):
    trained.save_pretrained(tmp_path, save_embedding_layers=False)  # no Hub look-up of the (made-up) base
    path = write_model_card(trained, tmp_path)
    card = ModelCard.load(path)
    assert card.data.library_name == "peft"
    assert card.data.base_model == "org/tiny-llama-pruned"
    assert {"peft", "seft", "sparse"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"
    text = card.text
    assert "sparsity of the 14 target layers: 50.00% (9,216 non-zeros of 18,432 weights)" in text
    for name, value in {**SETTINGS, "density": 0.1, "grow_pruned": True, "prune_criterion": "sensitivity"}.items():
        assert f"| {name} | {value} |" in text, name
    assert "| pattern | unstructured |" in text
    assert "(?:down_proj\\|gate_proj\\|" in text  # the regex's pipes are escaped inside the markdown table
    rounds = trained.base_model.evolution.reports
    assert [r.step for r in rounds] == [2, 4, 6]
    assert f"{len(rounds)} evolution rounds (optimizer steps 2 to 6" in text
    assert "equalled the base's non-zero count (9,216)" in text


def test_card_replaces_peft_generic_card_and_names_a_given_base(tmp_path):
    model = seft_model()
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    assert "More Information Needed" in (tmp_path / "README.md").read_text()  # PEFT's template
    write_model_card(model, tmp_path, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", extra={"dataset": "docs"})
    text = (tmp_path / "README.md").read_text()
    assert "More Information Needed" not in text
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "No evolution rounds were recorded" in text
    assert "- dataset: docs" in text


class HubStub:
    """Canned answers for the Hub endpoints ``upload_adapter`` uses; records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}", "name": REPO, "id": "0"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == f"/api/models/{REPO}/preupload/main":
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if path == f"/api/models/{REPO}/commit/main":
            oid = "0123456789abcdef0123456789abcdef01234567"
            return httpx2.Response(
                200, json={"commitUrl": f"https://huggingface.co/{REPO}/commit/{oid}", "commitOid": oid}
            )
        return httpx2.Response(404, json={"error": "not stubbed"})

    def posts(self, suffix: str) -> list[httpx2.Request]:
        return [r for r in self.requests if r.method == "POST" and r.url.path.endswith(suffix)]


@pytest.fixture
def hub():
    stub = HubStub()
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(stub)))
    try:
        yield stub
    finally:
        set_client_factory(default_client_factory)


def committed_files(request: httpx2.Request) -> tuple[dict, dict[str, bytes]]:
    lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    files = {
        line["value"]["path"]: base64.b64decode(line["value"]["content"])
        for line in lines
        if line["key"] == "file" and line["value"].get("encoding") == "base64"
    }
    return header, files


def test_upload_adapter_sends_our_card_and_the_adapter_files(trained, hub, tmp_path):
    commit = upload_adapter(trained, REPO, token="hf_dummy_token", private=True, extra={"steps": 6})
    assert commit.oid == "0123456789abcdef0123456789abcdef01234567"

    # Writes are POSTs to the endpoints below; anything else is a read (PEFT's save_pretrained looks up the base's
    # config.json on the Hub with a HEAD request to decide whether to save embedding layers).
    assert {r.method for r in hub.requests} <= {"POST", "HEAD", "GET"}
    paths = [r.url.path for r in hub.requests if r.method == "POST"]
    assert paths == [
        "/api/repos/create",
        "/api/validate-yaml",
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
    ]
    create = hub.posts("/api/repos/create")
    assert len(create) == 1
    assert json.loads(create[0].content) == {
        "name": "seft-tiny",
        "organization": "someone",
        "visibility": "private",
        "type": "model",
    }
    assert len(hub.posts("/preupload/main")) == 1
    commits = hub.posts("/commit/main")
    assert len(commits) == 1
    for request in create + commits:
        assert request.headers["authorization"] == "Bearer hf_dummy_token"

    header, files = committed_files(commits[0])
    assert header["summary"] == "Upload SEFT adapter"
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    expected_card = model_card_text(trained, extra={"steps": 6})
    assert files["README.md"].decode() == expected_card
    assert json.loads(hub.posts("/api/validate-yaml")[0].content)["content"] == expected_card
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-llama-pruned"
    assert {"seft", "sparse", "peft"} <= set(card.data.tags)

    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "SEFT" and config["update_interval"] == 2
    uploaded = load_safetensors(files["adapter_model.safetensors"])
    trained.save_pretrained(tmp_path, save_embedding_layers=False)
    local = load_file(tmp_path / "adapter_model.safetensors")
    assert uploaded.keys() == local.keys()
    assert all(torch.equal(uploaded[k], local[k]) for k in local)
    assert any("seft_values" in k for k in uploaded)
