"""Fixtures shared by the tests; the tiny models and data they use are built by peft_seft.testing."""

from __future__ import annotations

import pytest
import torch

import peft_seft  # noqa: F401  (registers SEFT)
from peft_seft.testing import token_ids


@pytest.fixture
def input_ids() -> torch.Tensor:
    return token_ids(2, 12, seed=1)
