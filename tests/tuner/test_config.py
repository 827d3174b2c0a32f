"""SEFTConfig: help on every field, every invalid value rejected with a message that says what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
from peft import PeftConfig

from peft_seft import SEFTConfig


def test_every_field_has_help():
    own = {f.name for f in dataclasses.fields(SEFTConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    for field in dataclasses.fields(SEFTConfig):
        if field.name in own:
            assert field.metadata.get("help"), field.name


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        ({"density": 0}, r"\(0, 1\]"),
        ({"density": 1.5}, r"\(0, 1\]"),
        ({"num_trainable": 0}, "positive integer"),
        ({"update_interval": 0}, "positive integer"),
        ({"selection_steps": 30, "update_interval": 20}, "between 1 and update_interval"),
        ({"initial_drop_rate": -0.1}, r"\[0, 1\]"),
        ({"drop_schedule": "step"}, "cosine"),
        ({"prune_criterion": "random"}, "sensitivity"),
        ({"total_steps": 0}, "positive integer or None"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "2-4"}, "like '2:4'"),
        ({"grow_pruned": "yes"}, "True or False"),
        ({"growth_statistic": "max"}, "abs_sum"),
        ({"growth_normalization": "output"}, "input"),
        ({"sensitivity_statistic": "consistent"}, "mean_abs"),
        ({"growth_statistic": "consistent", "selection_steps": 1}, "selection_steps >= 2"),
        ({"drop_criterion": "age"}, "gradient"),
        ({"candidate_factor": 0.5}, ">= 1"),
    ],
)
def test_invalid_values_fail_at_construction(kwargs, allowed):
    with pytest.raises(ValueError, match=allowed) as error:
        SEFTConfig(**kwargs)
    assert f"SEFTConfig.{next(iter(kwargs))}" in str(error.value) or "selection_steps" in str(error.value)


def test_round_trip_through_dict(tmp_path):
    config = SEFTConfig(density=0.02, target_modules=["q_proj", "v_proj"], pattern="2:4", total_steps=100)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SEFTConfig)
    assert loaded.target_modules == {"q_proj", "v_proj"} and loaded.pattern == "2:4" and loaded.total_steps == 100


def test_nm_pattern_keeps_the_papers_frozen_topology_unless_asked():
    assert SEFTConfig().grow_pruned is True
    assert SEFTConfig(pattern="2:4").grow_pruned is False  # the paper's N:M mode
    assert SEFTConfig(pattern="2:4", grow_pruned=True).grow_pruned is True  # our in-group re-activation
    assert SEFTConfig(grow_pruned=False).grow_pruned is False
