"""The supported peft range is enforced at import and agrees with pyproject.toml; PeftType gains a real member."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest
from peft.utils import PeftType

from peft_seft import cli
from peft_seft.utils.compat import SUPPORTED_PEFT, check_peft_version

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())


@pytest.mark.parametrize("version", ["0.20.0", "0.18.1", "0.22.0", "1.0.0"])
def test_unsupported_peft_fails_naming_the_range(version):
    with pytest.raises(ImportError, match=rf"peft {version} is installed.*pip install 'peft>=0\.21\.0,<0\.22'"):
        check_peft_version(version)


@pytest.mark.parametrize("version", ["0.21.0", "0.21.2", "0.21.3.dev0"])
def test_supported_peft_passes(version):
    check_peft_version(version)


def test_pyproject_requires_the_peft_range_checked_at_import():
    assert f"peft{SUPPORTED_PEFT}" in PYPROJECT["project"]["dependencies"]


def test_seft_is_a_peft_type_member_found_by_its_plain_string():
    member = PeftType.SEFT
    assert PeftType("SEFT") is member and PeftType["SEFT"] is member and member in list(PeftType)
    assert {member: 1}["SEFT"] == 1  # peft looks its registries up with the string from adapter_config.json


def test_command_line_without_its_extra_names_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"needs trl: pip install 'peft-seft\[cli\]'"):
        cli.main(["eval", "--adapter", "nowhere"])
