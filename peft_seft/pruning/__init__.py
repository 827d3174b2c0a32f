"""One-shot pruning of a model's linear layers: magnitude, Wanda and SparseGPT, unstructured or N:M."""

from .api import METHODS, prune
from .calibration import build_calibration
from .report import LayerSparsity, SparsityReport, sparsity_report

__all__ = ["METHODS", "LayerSparsity", "SparsityReport", "build_calibration", "prune", "sparsity_report"]
