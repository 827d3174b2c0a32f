"""``prune``: magnitude, Wanda and SparseGPT pruning of a model's linear layers, in place."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..utils.sparsity import logical_weight, parse_nm_pattern
from .blockwise import InputStatistics, prune_blockwise
from .calibration import build_calibration
from .masks import magnitude_mask, sparsegpt_prune, wanda_mask
from .report import SparsityReport, select_targets, sparsity_report

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
_STATISTICS = {"wanda": "norms", "sparsegpt": "hessian"}


def resolve_sparsity(sparsity: float | None, pattern: str | None) -> tuple[float | None, tuple[int, int] | None]:
    """Check ``sparsity`` and ``pattern``; returns ``(sparsity, (n, m) or None)``.

    Unstructured pruning needs ``0 <= sparsity < 1``. With an N:M pattern the sparsity is implied (``1 - N/M``):
    pass ``sparsity=None`` or exactly that value.
    """
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1
    ):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}.")
    if pattern is not None:
        n, m = parse_nm_pattern(pattern)
        implied = 1 - n / m
        if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
            raise ValueError(
                f"The N:M pattern {pattern!r} implies sparsity {implied:g}; pass sparsity=None or {implied:g}, "
                f"not {sparsity!r}."
            )
        return implied, (n, m)
    if sparsity is None:
        raise ValueError("Unstructured pruning needs a sparsity in [0, 1), e.g. sparsity=0.5 (or pass pattern='2:4').")
    return float(sparsity), None


def _check_nm_divides(targets: dict[str, nn.Module], pattern: str, m: int) -> None:
    bad = [
        f"{name} (in={logical_weight(module).shape[1]})"
        for name, module in targets.items()
        if logical_weight(module).shape[1] % m
    ]
    if bad:
        raise ValueError(
            f"The N:M pattern {pattern!r} needs every target layer's input dimension to be divisible by {m}; "
            f"these are not: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Exclude them with target_modules=..."
        )


def prune(
    model: nn.Module,
    method: str,
    sparsity: float | None = None,
    pattern: str | None = None,
    calibration: Any = None,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 512,
    target_modules: str | Sequence[str] | None = None,
    batch_size: int = 8,
    text_column: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    show_progress: bool = True,
) -> SparsityReport:
    """Prune the target linear layers of ``model`` in place and return a :class:`SparsityReport`.

    Args:
        method: ``"magnitude"`` (``|W|``), ``"wanda"`` (``|W_ij| * ||X_j||_2``, compared within each output row) or
            ``"sparsegpt"`` (inverse-Hessian mask selection with weight reconstruction).
        sparsity: fraction of weights to remove, in [0, 1), for unstructured pruning. With ``pattern`` it is implied
            (``1 - N/M``): leave it ``None`` or pass exactly that value.
        pattern: an N:M pattern such as ``"2:4"``: in every group of M consecutive input weights N are kept.
        calibration: texts (with ``tokenizer``), a ``datasets.Dataset`` (a text column or ``input_ids``) or a tensor
            of token ids; required by Wanda and SparseGPT, ignored by magnitude pruning.
        num_samples, seq_len: number and length of calibration sequences (see
            :func:`~peft_seft.pruning.calibration.build_calibration`).
        target_modules: which linear layers to prune; default every linear layer inside the repeated blocks
            (regex string, or list of names/name suffixes).
        batch_size: calibration sequences per forward.
        blocksize, percdamp: SparseGPT's column block size and dampening (fraction of the mean Hessian diagonal).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; choose one of {', '.join(METHODS)}.")
    sparsity, nm = resolve_sparsity(sparsity, pattern)
    targets = select_targets(model, target_modules)
    if nm is not None:
        _check_nm_divides(targets, pattern, nm[1])

    def prune_layer(name: str, module: nn.Module, stats: InputStatistics | None) -> None:
        weight = logical_weight(module)
        if method == "magnitude":
            weight.masked_fill_(~magnitude_mask(weight, sparsity, nm), 0)
        elif method == "wanda":
            weight.masked_fill_(~wanda_mask(weight, stats.sq_norms, sparsity, nm), 0)
        else:
            weight.copy_(sparsegpt_prune(weight, stats.hessian, sparsity, nm, blocksize, percdamp))

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method == "magnitude":
                for name, module in targets.items():
                    prune_layer(name, module, None)
            else:
                if calibration is None:
                    raise ValueError(
                        f"Method {method!r} needs calibration data (texts with a tokenizer, a Dataset or token ids)."
                    )
                input_ids = build_calibration(calibration, tokenizer, num_samples, seq_len, text_column)
                logger.info("Calibrating %s on %d sequences of %d tokens.", method, *input_ids.shape)
                prune_blockwise(
                    model,
                    targets,
                    input_ids,
                    _STATISTICS[method],
                    prune_layer,
                    batch_size,
                    show_progress,
                    f"{method} pruning",
                )
    finally:
        model.train(was_training)

    report = sparsity_report(model, pattern, list(targets))
    report.method, report.target_sparsity = method, sparsity
    logger.info(
        "Pruned %d layers with %s in %.1f s: sparsity %.2f%%.",
        len(targets),
        method,
        time.perf_counter() - start,
        100 * report.sparsity,
    )
    return report
