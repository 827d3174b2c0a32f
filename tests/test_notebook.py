"""notebooks/quickstart.ipynb runs from top to bottom without errors (executed with nbclient in a python3 kernel):
train, prune, repair, save and reload, merge, publish to the local Hub stand-in and load from it in a fresh process.
The committed notebook holds the outputs of such a run."""

from __future__ import annotations

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="needs the dev extra (nbclient, nbformat, ipykernel)")
nbformat = pytest.importorskip("nbformat")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # One thread: the models are tiny, and on a busy CPU OpenMP threads slow every step down many times.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the cell's traceback on any error
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "same non-zeros in every layer as the pruned model: True" in outputs
    assert "held-out perplexity repaired" in outputs
    assert "max |logits difference| after reloading into a fresh model: 0.00e+00" in outputs
    assert "Published the SEFT adapter: me/tiny-llama-wanda50-seft (base_model me/tiny-llama-wanda50)" in outputs
    assert "max |logits difference| of a fresh process loading from the (stand-in) Hub: 0.00e+00" in outputs
    assert not any(
        output.get("output_type") == "error" for cell in notebook.cells for output in cell.get("outputs", [])
    )
