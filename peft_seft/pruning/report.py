"""Per-layer sparsity report of a model's target linear layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..utils.sparsity import logical_weight, nm_group_counts, parse_nm_pattern
from ..utils.targets import find_target_linears, is_linear


def select_targets(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Name -> module of the linear layers to prune or report on.

    ``None`` selects the default targets (every linear layer inside numbered blocks), a string is a regex that must
    match the full module name, and a list selects modules whose name equals an entry or ends with ``"." + entry``
    (PEFT's ``target_modules`` rules).
    """
    if target_modules is None or isinstance(target_modules, str):
        targets = find_target_linears(model, target_modules)
    else:
        keys = list(target_modules)
        targets = {
            name: module
            for name, module in model.named_modules()
            if is_linear(module) and any(name == key or name.endswith("." + key) for key in keys)
        }
    if not targets:
        raise ValueError(f"No linear layer of the model matches target_modules={target_modules!r}.")
    return targets


@dataclass
class LayerSparsity:
    """Sparsity of one linear layer; ``shape`` is (out_features, in_features)."""

    name: str
    shape: tuple[int, int]
    nonzeros: int
    nm_compliant: bool | None = None  # None when no N:M pattern was asked for

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.numel


@dataclass
class SparsityReport:
    """Sparsity of every target layer, with totals; ``str(report)`` is a printable table."""

    layers: list[LayerSparsity]
    pattern: str | None = None
    method: str | None = None
    target_sparsity: float | None = None

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.numel if self.numel else 0.0

    @property
    def nm_compliant(self) -> bool | None:
        if self.pattern is None:
            return None
        return all(layer.nm_compliant for layer in self.layers)

    def to_table(self) -> str:
        name_width = max([len("layer"), len("total")] + [len(layer.name) for layer in self.layers])
        header = f"{'layer':<{name_width}}  {'shape':>11}  {'nonzeros':>11}  {'sparsity':>8}"
        if self.pattern is not None:
            header += f"  {self.pattern + ' ok':>7}"
        rows = [header, "-" * len(header)]

        def row(name: str, shape: str, nonzeros: int, sparsity: float, compliant: bool | None) -> str:
            text = f"{name:<{name_width}}  {shape:>11}  {nonzeros:>11,}  {sparsity:>8.2%}"
            if self.pattern is not None:
                text += f"  {'yes' if compliant else 'NO':>7}"
            return text

        for layer in self.layers:
            rows.append(
                row(
                    layer.name, f"{layer.shape[0]}x{layer.shape[1]}", layer.nonzeros, layer.sparsity, layer.nm_compliant
                )
            )
        rows.append("-" * len(header))
        rows.append(row("total", f"{len(self.layers)} layers", self.nonzeros, self.sparsity, self.nm_compliant))
        title = []
        if self.method is not None:
            target = f"pattern {self.pattern}" if self.pattern else f"target sparsity {self.target_sparsity:.2%}"
            title.append(f"pruned with {self.method}, {target}")
        return "\n".join(title + rows)

    def __str__(self) -> str:
        return self.to_table()


def layer_sparsity(name: str, module: nn.Module, nm: tuple[int, int] | None = None) -> LayerSparsity:
    weight = logical_weight(module)
    compliant = None
    if nm is not None:
        n, m = nm
        compliant = weight.shape[1] % m == 0 and bool((nm_group_counts(weight, m) <= n).all())
    return LayerSparsity(name, tuple(weight.shape), int(torch.count_nonzero(weight)), compliant)


@torch.no_grad()
def sparsity_report(
    model: nn.Module, pattern: str | None = None, target_modules: str | Sequence[str] | None = None
) -> SparsityReport:
    """Non-zeros and sparsity of every target linear layer, and whether each satisfies the N:M ``pattern`` if given."""
    nm = parse_nm_pattern(pattern) if pattern is not None else None
    targets = select_targets(model, target_modules)
    return SparsityReport([layer_sparsity(name, module, nm) for name, module in targets.items()], pattern=pattern)
