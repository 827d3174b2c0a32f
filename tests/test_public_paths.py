"""The import paths users already have keep working after the package was split into layers (see ARCHITECTURE.md):
each old path gives the very object its new home defines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

# old path -> where the object lives now
PUBLIC_PATHS = {
    "peft_seft.SEFTConfig": "peft_seft.tuner.config.SEFTConfig",
    "peft_seft.SEFTModel": "peft_seft.tuner.model.SEFTModel",
    "peft_seft.SEFTLayer": "peft_seft.tuner.layer.SEFTLayer",
    "peft_seft.SEFTLinear": "peft_seft.tuner.layer.SEFTLinear",
    "peft_seft.SEFTCallback": "peft_seft.tuner.callbacks.SEFTCallback",
    "peft_seft.SEFT_PEFT_TYPE": "peft_seft.tuner.registration.SEFT_PEFT_TYPE",
    "peft_seft.pruning.prune": "peft_seft.pruning.api.prune",
    "peft_seft.pruning.sparsity_report": "peft_seft.pruning.report.sparsity_report",
    "peft_seft.pruning.build_calibration": "peft_seft.pruning.calibration.build_calibration",
    "peft_seft.hub.push_adapter": "peft_seft.export.hub.push_adapter",
    "peft_seft.hub.push_sparse_model": "peft_seft.export.hub.push_sparse_model",
    "peft_seft.hub.require_repo_id": "peft_seft.export.hub.require_repo_id",
    "peft_seft.export.to_semi_structured": "peft_seft.export.semi_structured.to_semi_structured",
    "peft_seft.export.nm_compliance": "peft_seft.export.semi_structured.nm_compliance",
    "peft_seft.publish.publish": "peft_seft.cli.publish.publish",
    "peft_seft.hub_standin.HubStandIn": "peft_seft.export.hub_standin.HubStandIn",
    "peft_seft.trl_args.SEFTArguments": "peft_seft.tuner.trl_args.SEFTArguments",
    "peft_seft.trl_args.get_seft_config": "peft_seft.tuner.trl_args.get_seft_config",
    "peft_seft.evaluation.perplexity": "peft_seft.cli.evaluation.perplexity",
    "peft_seft.data.chunk": "peft_seft.cli.data.chunk",
    "peft_seft.data.embedded_splits": "peft_seft.cli.data.embedded_splits",
    "peft_seft.data.lm_dataset": "peft_seft.cli.data.lm_dataset",
    "peft_seft.data.token_stream": "peft_seft.cli.data.token_stream",
    "peft_seft.value_grad.set_value_grad_implementation": "peft_seft.tuner.value_grad.set_value_grad_implementation",
    "peft_seft.value_grad.IMPLEMENTATIONS": "peft_seft.tuner.value_grad.IMPLEMENTATIONS",
    "peft_seft.cli.main": "peft_seft.cli.main",  # the `seft` console script (pyproject.toml: peft_seft.cli:main)
}

# Modules at an old path that only re-export from the new one.
SHIMS = {
    "peft_seft.hub": "peft_seft.export.hub",
    "peft_seft.publish": "peft_seft.cli.publish",
    "peft_seft.hub_standin": "peft_seft.export.hub_standin",
    "peft_seft.trl_args": "peft_seft.tuner.trl_args",
    "peft_seft.evaluation": "peft_seft.cli.evaluation",
    "peft_seft.data": "peft_seft.cli.data",
    "peft_seft.value_grad": "peft_seft.tuner.value_grad",
}


def resolve(path: str):
    """``from a.b import c`` for the dotted path ``a.b.c``."""
    module_name, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), name)


@pytest.mark.parametrize("old, new", sorted(PUBLIC_PATHS.items()))
def test_old_import_path_gives_the_object_of_its_new_home(old, new):
    assert resolve(old) is resolve(new)


def defined_names(module) -> set[str]:
    """The public names a module defines itself (functions, classes, constants; not its imports or its logger)."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_") and name != "logger"}


@pytest.mark.parametrize("shim, target", sorted(SHIMS.items()))
def test_shim_re_exports_every_public_name_of_its_target(shim, target):
    old, new = importlib.import_module(shim), importlib.import_module(target)
    assert set(old.__all__) == defined_names(new)
    assert all(getattr(old, name) is getattr(new, name) for name in old.__all__)
    assert not defined_names(old)  # nothing of its own: it only re-exports
