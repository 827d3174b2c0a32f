"""The GPU check's smoke mode on CPU, so the command cannot rot before a GPU runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
CORRECTNESS = ("layer", "evolution", "merge")


def test_smoke_run_reports_every_section(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--smoke"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    markdown = (tmp_path / "gpu_check.md").read_text()
    sections = report["sections"]
    assert list(sections) == ["layer", "evolution", "merge", "semi_structured", "kernels", "step_cost"]
    for name, entry in sections.items():
        assert f"## {name}" in markdown and entry["rows"], name
    for name in CORRECTNESS:
        assert sections[name]["status"] == "passed", (name, sections[name])
        assert all(row["passed"] for row in sections[name]["rows"]), name
    assert sections["semi_structured"]["status"] == "pattern checked, not converted"  # conversion needs CUDA
    assert {row["dtype"] for row in sections["layer"]["rows"]} == {"fp32", "bf16", "fp16"}
    assert {row["kernel"] for row in sections["layer"]["rows"]} == {"sampled_addmm", "dense_gather"}
    assert sections["kernels"]["status"] == sections["step_cost"]["status"] == "measured"
    variants = [row["variant"] for row in sections["step_cost"]["rows"]]
    assert variants == [
        "frozen fwd+bwd",
        "SEFT static",
        "SEFT static, sampled_addmm",
        "SEFT static, dense_gather",
        "LoRA",
        "masked LoRA",
        "SEFT evolving (mean of 20)",
    ]
