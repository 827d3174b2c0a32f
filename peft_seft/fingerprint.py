"""A cheap fingerprint of a base weight, saved with the adapter so it cannot be loaded onto another base.

Five int64 numbers per layer: out and in features, the non-zero count, and two float64 checksums (sum of
|W| and of W^2, stored bit-for-bit) that survive a change of dtype (fp32 <-> bf16 moves them by far less
than the tolerance) but not another checkpoint or another pruning.
"""

from __future__ import annotations

import torch

CHECKSUM_RTOL = 1e-3


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, nnz, sum|W| bits, sum W^2 bits) of an (out, in) weight, as int64."""
    w = weight.detach().double()
    checksums = torch.stack([w.abs().sum(), (w * w).sum()]).cpu()
    header = torch.tensor([weight.shape[0], weight.shape[1], int(torch.count_nonzero(weight))], dtype=torch.int64)
    return torch.cat([header, checksums.view(torch.int64)])


def fingerprint_mismatch(saved: torch.Tensor, current: torch.Tensor) -> str | None:
    """A sentence saying how two fingerprints differ, or None when they match."""
    saved, current = saved.cpu(), current.cpu()
    if saved.shape != current.shape:
        return "the saved fingerprint has an unexpected format"
    if saved[:2].tolist() != current[:2].tolist():
        return (
            f"weight shape (out, in) {tuple(current[:2].tolist())} differs from the saved {tuple(saved[:2].tolist())}"
        )
    if saved[2] != current[2]:
        return f"the base has {int(current[2])} non-zeros but the adapter was trained on one with {int(saved[2])}"
    saved_sums, current_sums = saved[3:].view(torch.float64), current[3:].view(torch.float64)
    if not torch.allclose(saved_sums, current_sums, rtol=CHECKSUM_RTOL, atol=0.0):
        return f"the base weight values differ (checksums {current_sums.tolist()} vs saved {saved_sums.tolist()})"
    return None
