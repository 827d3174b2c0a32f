"""Pruning criteria as plain tensor functions, usable without a model.

Every function works on a weight in (out_features, in_features) orientation and returns either a boolean
*keep* mask of the same shape or the pruned weight. Counts are exact:

- unstructured magnitude / Wanda: every output row keeps ``in - round(sparsity * in)`` weights;
- unstructured SparseGPT: the layer prunes ``round(sparsity * out * in)`` weights, chosen adaptively per block;
- N:M (all methods): every group of M consecutive input weights of a row keeps exactly N.
"""

from __future__ import annotations

import math

import torch


def num_to_prune(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a ``sparsity`` fraction removes (rounded half up)."""
    return min(total, int(math.floor(sparsity * total + 0.5)))


def keep_mask_from_scores(
    scores: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep mask dropping the lowest scores: ``round(sparsity * in)`` per output row, or M-N per group of M (``nm``)."""
    out_features, in_features = scores.shape
    if nm is not None:
        n, m = nm
        if in_features % m:
            raise ValueError(f"An N:M pattern with M={m} needs an input dimension divisible by {m}, got {in_features}.")
        groups = scores.reshape(out_features, in_features // m, m)
        lowest = torch.topk(groups, m - n, dim=-1, largest=False).indices
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, lowest, False)
        return keep.reshape(out_features, in_features)
    if sparsity is None:
        raise ValueError("Unstructured pruning needs a sparsity.")
    k = num_to_prune(in_features, sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return keep


def magnitude_mask(
    weight: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep the largest ``|W_ij|`` within each output row (or each N:M group)."""
    return keep_mask_from_scores(weight.detach().abs().float(), sparsity, nm)


def wanda_mask(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda: keep the largest ``|W_ij| * ||X_j||_2`` within each output row (or each N:M group).

    ``input_sq_norms`` holds ``sum over calibration tokens of X_j ** 2`` per input feature j.
    """
    scores = weight.detach().abs().float() * input_sq_norms.float().sqrt().unsqueeze(0)
    return keep_mask_from_scores(scores, sparsity, nm)


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian (float32); more dampening if H is not positive definite."""
    h = hessian.float().clone()
    diag = torch.diagonal(h)
    # An input feature that was always zero has no curvature; give it a unit diagonal so H stays invertible.
    # Its weight then never receives compensation updates (its row of H is zero) and is selected by magnitude.
    diag[diag == 0] = 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp * diag.mean()
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            chol_inv, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return chol_inv
        damp = damp * 10
    raise ValueError("SparseGPT: the calibration Hessian is not positive definite even after heavy dampening.")


def _block_prune_counts(out_features: int, in_features: int, blocksize: int, sparsity: float) -> list[int]:
    """Weights to prune per column block, so that the layer total is exactly ``round(sparsity * out * in)``."""
    ends = list(range(blocksize, in_features, blocksize)) + [in_features]
    cumulative = [0] + [num_to_prune(out_features * end, sparsity) for end in ends]
    return [b - a for a, b in zip(cumulative[:-1], cumulative[1:], strict=True)]


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune ``weight`` (out, in) and reconstruct the kept weights.

    ``hessian`` is ``2/n * X^T X`` (in, in) over the calibration inputs of the layer. Columns are processed left to
    right in blocks of ``blocksize``: unstructured masks are chosen per block from ``w^2 / diag(Hinv)^2`` (adaptive
    mask selection), N:M masks per group of M with the same score, and the error of each pruned column is spread
    onto the columns to its right through the Cholesky factor of the dampened inverse Hessian. Returns a new tensor
    in the dtype of ``weight``.
    """
    out_features, in_features = weight.shape
    if nm is not None:
        n, m = nm
        if in_features % m:
            raise ValueError(f"An N:M pattern with M={m} needs an input dimension divisible by {m}, got {in_features}.")
        blocksize = max(m, blocksize - blocksize % m)  # an N:M group must not straddle two blocks
    elif sparsity is None:
        raise ValueError("Unstructured pruning needs a sparsity.")
    w = weight.detach().float().clone(memory_format=torch.contiguous_format)
    hinv = _inverse_hessian_cholesky(hessian, percdamp)
    counts = None if nm is not None else _block_prune_counts(out_features, in_features, blocksize, sparsity)

    for block_index, start in enumerate(range(0, in_features, blocksize)):
        end = min(start + blocksize, in_features)
        # Columns of the block as contiguous rows: the per-column loop below is latency-bound, so few, simple ops.
        w_cols = w[:, start:end].T.contiguous()
        hinv_block = hinv[start:end, start:end]
        hinv_diag = torch.diagonal(hinv_block).unsqueeze(1)
        errors = torch.zeros_like(w_cols)
        keep = torch.ones(w_cols.shape, dtype=torch.bool, device=w.device)
        if counts is not None and counts[block_index]:
            scores = (w_cols**2 / hinv_diag**2).flatten()
            keep.view(-1)[torch.topk(scores, counts[block_index], largest=False).indices] = False
        keep_f = keep.float()
        drop_scaled = (1 - keep_f) / hinv_diag  # error of column i = w_i * drop_scaled_i

        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                scores = w_cols[group] ** 2 / hinv_diag[group] ** 2
                keep_f[group] = keep_mask_from_scores(scores.T, nm=nm).T.float()
                drop_scaled[group] = (1 - keep_f[group]) / hinv_diag[group]
            torch.mul(w_cols[i], drop_scaled[i], out=errors[i])
            w_cols[i:].addr_(hinv_block[i, i:], errors[i], alpha=-1)
            w_cols[i].mul_(keep_f[i])  # exact zeros where pruned

        w[:, start:end] = w_cols.T
        w[:, end:] -= errors.T @ hinv[start:end, end:]
    return w.to(weight.dtype)
