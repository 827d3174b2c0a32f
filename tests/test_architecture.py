"""Imports inside peft_seft run only downward through the layers of ARCHITECTURE.md (function-level imports count too).

A module may import its own subpackage and any subpackage on a lower level; subpackages on one level are independent of
each other. The modules at the package root (``__init__``, ``__main__``, ``testing`` and the re-export modules at old
paths) sit above every level: they may import anything, and nothing inside a level may import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peft_seft"

# Level 1 first; the one place that says the order (ARCHITECTURE.md explains it).
LAYERS = [
    ("utils",),
    ("evolution", "pruning"),
    ("tuner",),
    ("export",),
    ("cli",),
]
LEVEL = {package: level for level, packages in enumerate(LAYERS, start=1) for package in packages}
ROOT_LEVEL = len(LAYERS) + 1


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The peft_seft modules a file imports, anywhere in it (``from x import y`` counts y when y is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            submodules = [f"{target}.{alias.name}" for alias in node.names if is_module(f"{target}.{alias.name}")]
            found.update(submodules or [target])
    return {target for target in found if target == "peft_seft" or target.startswith("peft_seft.")}


def layer_of(module: str) -> tuple[str, int]:
    """(subpackage, level); the package root's modules are ("", ROOT_LEVEL)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LEVEL:
        return parts[1], LEVEL[parts[1]]
    return "", ROOT_LEVEL


def upward_imports(edges: list[tuple[str, str]]) -> list[str]:
    bad = []
    for importer, imported in edges:
        (package, level), (target, target_level) = layer_of(importer), layer_of(imported)
        if package != target and target_level >= level and level != ROOT_LEVEL:
            bad.append(
                f"{importer} ({package}, level {level}) imports {imported} ({target or 'root'}, level {target_level})"
            )
    return sorted(bad)


def package_edges() -> list[tuple[str, str]]:
    return [(module_name(path), target) for path in sorted(PACKAGE.rglob("*.py")) for target in imports(path)]


def test_every_subpackage_has_a_layer():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(LEVEL), "add the new subpackage to LAYERS here and to ARCHITECTURE.md"


def test_imports_only_run_downward():
    edges = package_edges()
    assert len(edges) > 50  # the walk found the package's imports
    bad = upward_imports(edges)
    assert not bad, "imports that run upward or sideways (see ARCHITECTURE.md):\n" + "\n".join(bad)


def test_the_check_catches_upward_and_sideways_imports():
    assert upward_imports([("peft_seft.tuner.layer", "peft_seft.cli.data")])
    assert upward_imports([("peft_seft.pruning.api", "peft_seft.evolution.rounds")])  # same level, other package
    assert upward_imports([("peft_seft.export.hub", "peft_seft.hub")])  # a re-export module at the root
    assert not upward_imports([("peft_seft.cli.steps", "peft_seft.tuner.cards"), ("peft_seft.hub", "peft_seft.cli")])
