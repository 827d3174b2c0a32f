"""The report's plots: a log scale where perplexities span decades, evolution rounds on categorical ticks labelled
with their real steps, per-layer sparsity with the change in non-zeros made visible, and per-layer topology moves."""

from __future__ import annotations

import logging
import re

import pytest
from matplotlib.figure import Figure

from peft_seft.cli import reporting

ROUND = {"dropped": 5, "grown": 5, "reactivated": 2, "repruned": 2, "restored": 0, "active": 10, "budget": 10}
LAYERS = [
    {"name": f"model.layers.{i}.mlp.{p}", "numel": 100, "pruned": 50, "repaired": 50}
    for i in range(2)
    for p in ("up_proj", "down_proj")
]


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    saved: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: saved.append(self))
    return saved


def test_perplexity_axis_is_logarithmic_only_across_decades(figures, tmp_path):
    reporting.plot_perplexity({"dense": 15.0, "pruned": 420.0, "repaired": 21.0}, tmp_path / "a.png")
    reporting.plot_perplexity({"dense": 15.0, "pruned": 35.0, "repaired": 19.0}, tmp_path / "b.png")
    assert [figure.axes[0].get_yscale() for figure in figures] == ["log", "linear"]


def test_rounds_sit_on_categorical_ticks_named_by_their_steps(figures, tmp_path):
    reporting.plot_rounds([{**ROUND, "step": 20}, {**ROUND, "step": 40}, {**ROUND, "step": 400}], tmp_path / "r.png")
    axes = figures[0].axes[0]
    assert list(axes.get_xticks()) == [0, 1, 2]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["20", "40", "400"]


def test_layer_sparsity_shows_the_change_in_nonzeros(figures, tmp_path):
    reporting.plot_layer_sparsity(LAYERS, ["pruned", "repaired"], tmp_path / "same.png")
    changed = [dict(layer) for layer in LAYERS]
    changed[1]["repaired"] = 51
    reporting.plot_layer_sparsity(changed, ["pruned", "repaired"], tmp_path / "changed.png")
    same, differs = (figure.axes[1] for figure in figures)
    assert any("identical non-zero count in every layer" in text.get_text() for text in same.texts)
    assert [bar.get_height() for bar in differs.patches] == [0, 1, 0, 0] and not differs.texts
    assert [label.get_text() for label in differs.get_xticklabels()] == [
        "0.up_proj",
        "0.down_proj",
        "1.up_proj",
        "1.down_proj",
    ]


def test_topology_plot_has_a_pair_of_bars_per_layer(figures, tmp_path):
    topology = [{"name": layer["name"], "reactivated": 3, "repruned": 3} for layer in LAYERS]
    reporting.plot_topology(topology, tmp_path / "t.png")
    assert len(figures[0].axes[0].patches) == 2 * len(LAYERS)


def test_rounds_are_logged_with_readable_numbers(caplog):
    from test_hub import seft_model

    logger = logging.getLogger("peft_seft")
    logger.addHandler(caplog.handler)  # the CLI may have stopped "peft_seft" from propagating
    try:
        with caplog.at_level(logging.INFO, logger="peft_seft"):
            seft_model(train_steps=2)
    finally:
        logger.removeHandler(caplog.handler)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("SEFT round at step 2"))
    assert re.fullmatch(
        r"SEFT round at step 2 \(default\): drop rate \d\.\d{3}, dropped [\d,]+, .*active [\d,]+ of [\d,]+", line
    )
    assert not re.search(r"\d\.\d{5,}", line), line
