"""The wheel ships the autoregister hook, py.typed and the license; the sdist builds the package and ships no tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import peft_seft

REPO = Path(__file__).resolve().parents[1]
BUILD = "from setuptools import build_meta as b; print('BUILT', b.build_wheel('dist'), b.build_sdist('dist'))"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[zipfile.ZipFile, list[str]]:
    source = tmp_path_factory.mktemp("build") / "src"
    ignored = shutil.ignore_patterns(".git", ".venv", ".peft_suite", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, ignore=ignored)
    result = subprocess.run([sys.executable, "-c", BUILD], cwd=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    wheel_name, sdist_name = result.stdout.rsplit("BUILT ", 1)[1].split()
    with tarfile.open(source / "dist" / sdist_name) as sdist:
        sdist_files = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
    return zipfile.ZipFile(source / "dist" / wheel_name), sdist_files


def test_wheel_installs_the_autoregister_hook_at_the_top_of_site_packages(built):
    wheel, _ = built
    names = set(wheel.namelist())
    assert {"peft-seft-autoregister.pth", "_peft_seft_autoregister.py", "peft_seft/py.typed"} <= names
    assert wheel.read("peft-seft-autoregister.pth").decode().startswith("import _peft_seft_autoregister;")
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)


def test_wheel_metadata_has_version_license_and_ranges(built):
    wheel, _ = built
    metadata_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    assert metadata["Version"] == peft_seft.__version__
    assert metadata["License-Expression"] == "Apache-2.0" and metadata["License-File"] == "LICENSE"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
    requires = metadata.get_all("Requires-Dist")
    assert "peft<0.22,>=0.21.0" in requires
    assert not any(r.startswith(("trl", "datasets", "matplotlib")) and "extra ==" not in r for r in requires)
    assert not any("==" in r.split(";")[0] for r in requires)  # ranges, no pins


def test_sdist_ships_the_build_inputs_and_no_tests(built):
    _, names = built
    assert {"setup.py", "peft-seft-autoregister.pth", "LICENSE", "CHANGELOG.md", "peft_seft/py.typed"} <= set(names)
    assert not any(name.startswith(("tests/", "benchmarks/", "notebooks/", "ci/")) for name in names)
