"""Run calibration data through a model one repeated block at a time, pruning each block before the next.

Only the inputs of the current block are kept in memory: the first block's inputs are captured by a forward
pre-hook that stops the model's forward, and every later block's inputs are the (already pruned) outputs of the
block before it. The extra positional and keyword arguments the model passes to its blocks (attention masks,
rotary position embeddings, position ids, ...) are captured with the first block's inputs and reused for every block.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..utils.sparsity import logical_weight

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded; nothing after it needs to run."""


@dataclass
class BlockBatch:
    """One calibration batch at the input of a block."""

    hidden_states: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_states_by_keyword: bool = False


class InputStatistics:
    """Per-layer statistics of a linear layer's inputs over all calibration tokens (float32).

    ``kind="norms"`` keeps ``sum_t x_tj^2`` per input feature (Wanda), ``kind="hessian"`` keeps ``sum_t x_t x_t^T``
    (SparseGPT); :attr:`hessian` is ``2/n`` times the latter.
    """

    def __init__(self, in_features: int, kind: str, device: torch.device) -> None:
        self.kind = kind
        self.count = 0
        shape = (in_features,) if kind == "norms" else (in_features, in_features)
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)

    def update(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, self.total.shape[0]).float()
        self.count += x.shape[0]
        if self.kind == "norms":
            self.total += (x * x).sum(0)
        else:
            self.total.addmm_(x.T, x)

    @property
    def sq_norms(self) -> torch.Tensor:
        return self.total

    @property
    def hessian(self) -> torch.Tensor:
        return self.total * (2.0 / max(self.count, 1))


def find_blocks(model: nn.Module, target_names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` containing the most target layers: the model's repeated decoder/encoder blocks."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(1 for target in target_names if target.startswith(name + "."))
            if count and (best is None or count > best[2]):
                best = (name, module, count)
    if best is None:
        raise ValueError(
            "Could not find the model's repeated blocks (an nn.ModuleList containing the target layers); "
            "calibrated pruning ('wanda', 'sparsegpt') needs them, 'magnitude' does not."
        )
    return best[0], best[1]


def _without_caches(value: Any) -> Any:
    # A key/value cache captured with the first block's inputs would grow with every reuse.
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, tuple):
        return tuple(None if isinstance(item, Cache) else item for item in value)
    return {key: None if isinstance(item, Cache) else item for key, item in value.items()}


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    parameters = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in parameters else {}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, input_ids: torch.Tensor, batch_size: int
) -> list[BlockBatch]:
    """Run ``input_ids`` through ``model`` up to ``first_block`` and record what the model passes to it."""
    batches: list[BlockBatch] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            batches.append(BlockBatch(args[0], _without_caches(args[1:]), _without_caches(kwargs)))
        else:
            kwargs = dict(kwargs)
            hidden_states = kwargs.pop("hidden_states")
            batches.append(BlockBatch(hidden_states, (), _without_caches(kwargs), hidden_states_by_keyword=True))
        raise _StopForward

    device = _model_device(model)
    extra = _forward_kwargs(model)
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), **extra)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(batches) != len(input_ids.split(batch_size)):
        raise RuntimeError("The model's forward did not reach its first repeated block.")
    return batches


def run_block(block: nn.Module, batch: BlockBatch) -> torch.Tensor:
    if batch.hidden_states_by_keyword:
        output = block(*batch.args, hidden_states=batch.hidden_states, **batch.kwargs)
    else:
        output = block(batch.hidden_states, *batch.args, **batch.kwargs)
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def prune_blockwise(
    model: nn.Module,
    targets: dict[str, nn.Module],
    input_ids: torch.Tensor,
    statistics_kind: str,
    prune_layer: Callable[[str, nn.Module, InputStatistics], None],
    batch_size: int = 8,
    show_progress: bool = True,
    description: str = "pruning",
) -> None:
    """Prune ``targets`` block by block, each block calibrated on the outputs of the already-pruned blocks before it.

    For every block: forward hooks on its target layers accumulate :class:`InputStatistics`, ``prune_layer`` prunes
    each of them in place, and the block is run again with the pruned weights to produce the next block's inputs.
    """
    blocks_name, blocks = find_blocks(model, list(targets))
    outside = [name for name in targets if not name.startswith(blocks_name + ".")]
    if outside:
        raise ValueError(
            f"Calibrated pruning works block by block over {blocks_name!r}; these target layers lie outside it: "
            f"{outside[:5]}{' ...' if len(outside) > 5 else ''}. Exclude them with target_modules=..."
        )
    logger.info("Pruning %d layers in %d blocks of %r.", len(targets), len(blocks), blocks_name)
    batches = capture_block_inputs(model, blocks[0], input_ids, batch_size)

    for index, block in enumerate(tqdm(blocks, desc=description, unit="block", disable=not show_progress)):
        prefix = f"{blocks_name}.{index}."
        layers = {name: module for name, module in targets.items() if name.startswith(prefix)}
        if layers:
            _prune_block(block, layers, batches, statistics_kind, prune_layer)
        if index + 1 < len(blocks):
            for batch in batches:
                batch.hidden_states = run_block(block, batch)


def _prune_block(
    block: nn.Module,
    layers: dict[str, nn.Module],
    batches: list[BlockBatch],
    statistics_kind: str,
    prune_layer: Callable[[str, nn.Module, InputStatistics], None],
) -> None:
    """Accumulate input statistics of ``layers`` over a forward of ``block`` on every batch, then prune them."""
    stats = {
        name: InputStatistics(logical_weight(module).shape[1], statistics_kind, module.weight.device)
        for name, module in layers.items()
    }
    handles = [
        module.register_forward_hook(lambda _module, inputs, _output, s=stats[name]: s.update(inputs[0]))
        for name, module in layers.items()
    ]
    try:
        for batch in batches:
            run_block(block, batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, module in layers.items():
        prune_layer(name, module, stats[name])
