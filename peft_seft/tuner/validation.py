"""Check a SEFT adapter's state dict against the model it is loaded onto, before anything is loaded.

Every adapted layer must have all five entries with the right shapes and dtypes; positions must lie inside the
weight, be unique, and the pruned set P must be disjoint from the trainable positions T and consist of non-zeros of
the base; the structural invariant |P| == |{t in T : W0[t] == 0}| must hold; values must be finite; the base must
match the saved fingerprint (fingerprint.py), and must not already hold this adapter merged. Entries for layers the
model does not adapt are an error too (an adapter for a larger model).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .fingerprint import (
    ALREADY_MERGED,
    fingerprint_mismatch,
    is_fingerprint,
    trained_checksum_mismatch,
    weight_fingerprint,
)
from .layer import EMPTY_SLOT, SEFTLayer

FIELDS = ("seft_values", "seft_indices", "seft_pruned", "seft_fingerprint", "seft_step")
_SEFT_ENTRY = re.compile(rf"\.(?:{'|'.join(FIELDS)})(?:\.|$)")


class AdapterValidationError(ValueError):
    """A SEFT adapter file that does not fit the model, or that is inconsistent in itself."""


def validate_adapter_state(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise :class:`AdapterValidationError` naming every offending layer; ``state_dict`` has the model's key names."""
    problems, used = [], set()
    for name, layer in model.named_modules():
        if not isinstance(layer, SEFTLayer) or adapter_name not in layer.seft_values:
            continue
        keys = {field: f"{name}.{field}.{adapter_name}" for field in FIELDS}
        used.update(keys.values())
        problem = layer_problem(layer, adapter_name, {field: state_dict.get(key) for field, key in keys.items()})
        if problem:
            problems.append(f"{name}: {problem}")
    extra = sorted({_SEFT_ENTRY.split(key)[0] for key in state_dict if _SEFT_ENTRY.search(key) and key not in used})
    problems += [f"{name}: the adapter has entries for this layer, which the model does not adapt" for name in extra]
    if problems:
        shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise AdapterValidationError(
            f"This SEFT adapter does not fit the model it is being loaded onto ({len(problems)} layer(s)):\n  {shown}\n"
            "Load it onto the (pruned) base model it was trained on; its name is in adapter_config.json "
            "(base_model_name_or_path). Nothing was loaded."
        )


def layer_problem(layer: SEFTLayer, adapter_name: str, entries: dict[str, torch.Tensor | None]) -> str | None:
    """What is wrong with one layer's saved entries, or None."""
    missing = [field for field, tensor in entries.items() if tensor is None]
    if missing:
        return f"the adapter has no {', '.join(missing)} for this layer"
    capacity = layer.seft_values[adapter_name].numel()
    problem = _format_problem(entries, capacity)
    if problem:
        return problem
    values, indices, pruned = entries["seft_values"], entries["seft_indices"].long(), entries["seft_pruned"].long()
    problem = _position_problem(indices, pruned, layer.out_features * layer.in_features)
    if problem:
        return problem
    if not torch.isfinite(values).all():
        return f"seft_values holds {int((~torch.isfinite(values)).sum())} NaN or infinite value(s)"
    return _base_problem(layer, values, indices, pruned[pruned != EMPTY_SLOT], entries["seft_fingerprint"])


def _format_problem(entries: dict[str, torch.Tensor], capacity: int) -> str | None:
    expected = {"seft_values": (capacity,), "seft_indices": (capacity,), "seft_pruned": (capacity,), "seft_step": (1,)}
    for field, shape in expected.items():
        if tuple(entries[field].shape) != shape:
            return (
                f"{field} has shape {tuple(entries[field].shape)}, expected {shape} (the adapter was made with "
                "another density or num_trainable, or for another model)"
            )
    if not entries["seft_values"].is_floating_point():
        return f"seft_values has dtype {entries['seft_values'].dtype}, expected a floating point dtype"
    for field in ("seft_indices", "seft_pruned", "seft_step"):
        if entries[field].is_floating_point() or entries[field].is_complex() or entries[field].dtype == torch.bool:
            return f"{field} has dtype {entries[field].dtype}, expected an integer dtype"
    if not is_fingerprint(entries["seft_fingerprint"]):
        fingerprint = entries["seft_fingerprint"]
        return f"seft_fingerprint has an unexpected format ({fingerprint.dtype}, shape {tuple(fingerprint.shape)})"
    if int(entries["seft_step"]) < 0:
        return f"seft_step is negative ({int(entries['seft_step'])})"
    return None


def _position_problem(indices: torch.Tensor, pruned: torch.Tensor, numel: int) -> str | None:
    if ((indices < 0) | (indices >= numel)).any():
        return f"seft_indices holds positions outside the weight's {numel} elements"
    if indices.unique().numel() != indices.numel():
        return "seft_indices holds duplicate positions"
    used = pruned[pruned != EMPTY_SLOT]
    if ((used < 0) | (used >= numel)).any():
        return f"seft_pruned holds positions outside the weight's {numel} elements (empty slots are {EMPTY_SLOT})"
    if used.unique().numel() != used.numel():
        return "seft_pruned holds duplicate positions"
    if torch.isin(used, indices).any():
        return "seft_pruned and seft_indices share positions (a pruned position cannot be trainable)"
    return None


def _base_problem(
    layer: SEFTLayer, values: torch.Tensor, indices: torch.Tensor, pruned: torch.Tensor, fingerprint: torch.Tensor
) -> str | None:
    """Checks against the base weight: merged already, fingerprint, P within its non-zeros, the count invariant."""
    device = layer.get_base_layer().weight.device
    indices, pruned = indices.to(device), pruned.to(device)
    base_at_indices = layer.base_values_at(indices)
    base_at_pruned = layer.base_values_at(pruned)
    dtype = layer.get_base_layer().weight.dtype
    trained = trained_checksum_mismatch(fingerprint, base_at_indices, values.to(device), dtype)
    # The base as it is without any adapter applied (the layer may hold W in place right now).
    mismatch = fingerprint_mismatch(fingerprint, weight_fingerprint(layer.effective_weight([])))
    # Merged structurally: P zeroed and every trainable position non-zero (caught even when delta is too small for
    # the checksum of W0 * delta to tell).
    looks_merged = pruned.numel() > 0 and bool((base_at_pruned == 0).all() and (base_at_indices != 0).all())
    if trained == ALREADY_MERGED or (mismatch and looks_merged):
        return ALREADY_MERGED
    if mismatch or trained:
        return mismatch or trained
    if (base_at_pruned == 0).any():
        return f"seft_pruned holds {int((base_at_pruned == 0).sum())} position(s) that are zero in the base"
    reactivated = int((base_at_indices == 0).sum())
    if reactivated != pruned.numel():
        return (
            f"{reactivated} trainable position(s) are zero in the base but {pruned.numel()} position(s) are pruned: "
            "the non-zero count would change"
        )
    return None
