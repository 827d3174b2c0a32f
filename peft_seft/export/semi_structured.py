"""Export of a merged N:M sparse model: the pattern checked per layer, 2:4 semi-structured weights where supported.

After ``model.merge_and_unload()`` an N:M SEFT adapter leaves plain linear layers whose weights hold at most N
non-zeros in every group of M consecutive input weights. :func:`to_semi_structured` checks that for every target
layer and, where the hardware has semi-structured sparse kernels (a CUDA GPU of compute capability 8.0 or newer,
pattern 2:4, fp16/bf16 weights), replaces each ``nn.Linear`` weight by
``torch.sparse.to_sparse_semi_structured(weight)`` and checks that the layer's outputs match the dense ones on a
random input. Elsewhere (CPU, other patterns or dtypes) nothing is converted and the report says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..utils.sparsity import logical_weight, nm_group_counts, parse_nm_pattern
from ..utils.targets import find_target_linears, is_linear

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class LayerExport:
    """One layer: its N:M compliance and whether its weight was converted to a semi-structured sparse tensor."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    groups: int
    violating_groups: int
    first_violation: tuple[int, int, int] | None = None  # (row, first input column, non-zeros) of the first bad group
    converted: bool = False
    max_abs_error: float | None = None  # converted layer's output versus the dense one on a random input
    note: str = ""

    @property
    def compliant(self) -> bool:
        return self.violating_groups == 0


@dataclass
class ExportReport:
    """Per-layer N:M compliance and conversion; ``str(report)`` is a printable table."""

    pattern: str
    layers: list[LayerExport] = field(default_factory=list)
    reason: str = ""  # why nothing was converted, when nothing could be

    @property
    def valid(self) -> bool:
        """Every layer satisfies the pattern."""
        return all(layer.compliant for layer in self.layers)

    @property
    def converted(self) -> int:
        return sum(layer.converted for layer in self.layers)

    def __str__(self) -> str:
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [
            f"N:M export report, pattern {self.pattern}: {'valid' if self.valid else 'INVALID'}; "
            f"{self.converted}/{len(self.layers)} layers converted to semi-structured sparse weights"
            + (f" ({self.reason})" if self.reason else ""),
            f"{'layer':<{width}}  {'shape':>12}  {'groups':>9}  {'violating':>9}  converted  note",
        ]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            note = layer.note if layer.compliant else violation_message(layer, self.pattern)
            lines.append(
                f"{layer.name:<{width}}  {shape:>12}  {layer.groups:>9}  {layer.violating_groups:>9}  "
                f"{'yes' if layer.converted else 'no':>9}  {note}"
            )
        return "\n".join(lines)


def violation_message(layer: LayerExport, pattern: str) -> str:
    if layer.first_violation is None:
        return f"layer {layer.name}: {layer.note}"
    row, column, nonzeros = layer.first_violation
    m = parse_nm_pattern(pattern)[1]
    return (
        f"layer {layer.name} ({layer.violating_groups} bad groups) has {nonzeros} non-zeros in row {row}, "
        f"input columns {column}..{column + m - 1}"
    )


def select_linears(model: nn.Module, target_modules: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The linear layers to check: default targets (linears inside numbered blocks), a regex, or name suffixes."""
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError("The model still holds adapter layers; merge them first: model = model.merge_and_unload().")
    if target_modules is None or isinstance(target_modules, str):
        return find_target_linears(model, target_modules)
    return {
        name: module
        for name, module in model.named_modules()
        if is_linear(module) and any(name == key or name.endswith("." + key) for key in target_modules)
    }


def nm_compliance(
    model: nn.Module, pattern: str = "2:4", target_modules: str | Sequence[str] | None = None
) -> ExportReport:
    """Check every target layer against the N:M pattern (nothing is converted)."""
    n, m = parse_nm_pattern(pattern)
    report = ExportReport(pattern)
    for name, module in select_linears(model, target_modules).items():
        weight = logical_weight(module).detach()
        out_features, in_features = weight.shape
        if in_features % m:
            note = f"{in_features} inputs, not divisible by {m}"
            report.layers.append(LayerExport(name, (out_features, in_features), 0, 1, note=note))
            continue
        counts = nm_group_counts(weight, m)
        bad = (counts > n).nonzero()
        first = None
        if bad.numel():
            row, group = bad[0].tolist()
            first = (row, group * m, int(counts[row, group]))
        report.layers.append(LayerExport(name, (out_features, in_features), counts.numel(), bad.shape[0], first))
    return report


def semi_structured_unsupported(weight: torch.Tensor, pattern: str) -> str | None:
    """Why this weight cannot become a semi-structured sparse tensor here, or None when it can."""
    if parse_nm_pattern(pattern) != (2, 4):
        return f"semi-structured sparse kernels support 2:4 only, not {pattern}"
    if not weight.is_cuda:
        return "semi-structured sparse kernels need a CUDA GPU; the weights are on " + str(weight.device)
    if torch.cuda.get_device_capability(weight.device) < (8, 0):
        return "semi-structured sparse kernels need a GPU of compute capability 8.0 or newer"
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"semi-structured conversion here is for fp16/bf16 weights, not {weight.dtype}"
    return None


def to_semi_structured(
    model: nn.Module,
    pattern: str = "2:4",
    target_modules: str | Sequence[str] | None = None,
    strict: bool = True,
    rtol: float = 1e-2,
    atol: float = 1e-2,
    verbose: bool = True,
) -> ExportReport:
    """Check the N:M pattern of a merged model and, where supported, convert its 2:4 linear weights in place.

    ``strict``: raise on the first layer that breaks the pattern (naming the layer and group), or whose converted
    outputs differ from the dense ones; otherwise such layers are left dense and reported. A converted layer's
    output on a random input must satisfy ``allclose(sparse, dense, rtol, atol * max|dense|)``. Only
    ``nn.Linear`` layers are converted (``Conv1D`` stores its weight transposed and multiplies with addmm).
    Returns the report (printed when ``verbose``)."""
    report = nm_compliance(model, pattern, target_modules)
    bad = next((layer for layer in report.layers if not layer.compliant), None)
    if strict and bad is not None:
        raise ValueError(f"The model is not {pattern} sparse: {violation_message(bad, pattern)}.")
    modules = select_linears(model, target_modules)
    reasons = set()
    for layer in report.layers:
        module = modules[layer.name]
        reason = semi_structured_unsupported(module.weight, pattern)
        if reason is None and not layer.compliant:
            reason = "breaks the pattern"
        if reason is None and type(module) is not nn.Linear:
            reason = f"{type(module).__name__} is not converted"
        if reason is not None:
            layer.note = layer.note or reason
            reasons.add(reason)
            continue
        _convert_linear(module, layer, strict, rtol, atol)
    if report.converted == 0 and len(reasons) == 1:
        report.reason = reasons.pop()
    if verbose:
        print(report)
    return report


def _convert_linear(module: nn.Linear, layer: LayerExport, strict: bool, rtol: float, atol: float) -> None:
    dense = module.weight.detach()
    inputs = torch.randn(64, dense.shape[1], device=dense.device, dtype=dense.dtype)
    with torch.no_grad():
        expected = nn.functional.linear(inputs, dense, module.bias)
        try:
            sparse = torch.sparse.to_sparse_semi_structured(dense.contiguous())
        except RuntimeError as error:  # e.g. a shape the kernels do not support
            layer.note = f"not converted: {str(error).splitlines()[0]}"
            return
        module.weight = nn.Parameter(sparse, requires_grad=False)
        actual = module(inputs)
    error = float((actual.float() - expected.float()).abs().max())
    layer.max_abs_error = error
    if torch.allclose(actual, expected, rtol=rtol, atol=atol * float(expected.abs().max())):
        layer.converted = True
        return
    module.weight = nn.Parameter(dense, requires_grad=False)
    layer.note = f"left dense: converted outputs differ (max abs error {error:.3g})"
    if strict:
        raise RuntimeError(f"Layer {layer.name}: {layer.note}.")
