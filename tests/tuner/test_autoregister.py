"""A saved SEFT adapter loads in a fresh process that never imports peft_seft (the hook installed with the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaForCausalLM

from peft_seft import SEFTConfig
from peft_seft.testing import tiny_llama

REPO = Path(__file__).resolve().parents[2]
PTH = "peft-seft-autoregister.pth"

# One fresh process loads three ways; transformers' load_adapter first, as it imports peft on its own.
LOADERS = """
from transformers import LlamaForCausalLM
from peft import AutoPeftModelForCausalLM, PeftModel

loaded = {"load_adapter": LlamaForCausalLM.from_pretrained(base_dir)}
loaded["load_adapter"].load_adapter(adapter_dir)
loaded["PeftModel"] = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir)
loaded["AutoPeftModel"] = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
for name, model in loaded.items():
    assert any(type(m).__name__ == "SEFTLinear" for m in model.modules()), name
    torch.save(model(input_ids=torch.arange(12).reshape(1, 12)).logits, f"{adapter_dir}/{name}.pt")
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, Path, torch.Tensor]:
    root = tmp_path_factory.mktemp("autoregister")
    base_dir, adapter_dir, site_dir = root / "base", root / "adapter", root / "site"
    tiny_llama().save_pretrained(base_dir)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), SEFTConfig(density=0.05))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "seft_values" in name:
                param.normal_(0, 0.05)
    input_ids = torch.arange(12).reshape(1, 12)
    expected = model(input_ids=input_ids).logits
    model.save_pretrained(adapter_dir)
    site_dir.mkdir()
    shutil.copy(REPO / PTH, site_dir / PTH)
    return base_dir, adapter_dir, site_dir, expected


def run_fresh(code: str, site_dir: Path, path: tuple[Path, ...] = (REPO,), **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter that processes our .pth file exactly as site-packages does at start-up."""
    prelude = f"import site, sys\nsite.addsitedir({str(site_dir)!r})\n"
    pythonpath = os.pathsep.join([*map(str, path), os.environ.get("PYTHONPATH", "")])
    environ = {**os.environ, "PYTHONPATH": pythonpath, **env}
    # cwd: `python -c` puts it first on sys.path, and the repository root holds the real peft_seft.
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, env=environ, cwd=site_dir
    )


def test_fresh_process_loads_adapter_without_importing_peft_seft(saved):
    base_dir, adapter_dir, site_dir, expected = saved
    prelude = f"""
assert "peft_seft" not in sys.modules and "torch" not in sys.modules  # the .pth itself imports neither
import torch
base_dir, adapter_dir = {str(base_dir)!r}, {str(adapter_dir)!r}
"""
    result = run_fresh(prelude + LOADERS, site_dir)
    assert result.returncode == 0, result.stderr
    for name in ("load_adapter", "PeftModel", "AutoPeftModel"):
        torch.testing.assert_close(torch.load(adapter_dir / f"{name}.pt"), expected, rtol=0, atol=0, msg=name)


def test_registers_when_transformers_imports_peft_halfway_through_its_own_import(saved):
    _, _, site_dir, _ = saved
    code = "from transformers import Trainer\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as m\nm['SEFT']"
    result = run_fresh(code, site_dir)
    assert result.returncode == 0 and "could not register" not in result.stderr, result.stderr


def test_off_switch_leaves_peft_alone(saved):
    _, adapter_dir, site_dir, _ = saved
    code = textwrap.dedent(f"""
        from peft import PeftConfig
        assert "peft_seft" not in sys.modules
        PeftConfig.from_pretrained({str(adapter_dir)!r})
    """)
    result = run_fresh(code, site_dir, PEFT_SEFT_NO_AUTOREGISTER="1")
    assert result.returncode != 0 and "KeyError: 'SEFT'" in result.stderr


def test_a_failing_registration_warns_and_keeps_peft_importable(saved, tmp_path):
    _, _, site_dir, _ = saved
    broken = tmp_path / "peft_seft"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('peft-seft supports peft>=0.21.0,<0.22')")
    result = run_fresh("import peft", site_dir, path=(tmp_path, REPO))
    assert result.returncode == 0, result.stderr
    assert "could not register the PEFT method SEFT" in result.stderr and ">=0.21.0,<0.22" in result.stderr
