"""SEFT under torch.distributed: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``).

Data parallelism (DDP, FSDP2): every rank sees its own part of the global batch. The evolution statistics are
reduced over ranks (the window's dense gradient on its first micro-batch, its per-step sums), so every rank computes
the round of one process seeing the global batch, and all ranks make the same decision.

FSDP2: the base weight of each SEFT layer is a DTensor sharded over the rows of its storage (``Shard(0)``), and the
K values of each adapter are sharded as well (FSDP2 shards every parameter it manages). Outside forward and backward
a layer holds only its local row block; inside them the module's ``weight`` is the all-gathered full weight. SEFT
writes W = (W0 with P zeroed) + scatter(T, delta) into both: the positions of T and P that fall into the local row
block are written into the local shard (so every all-gather, in forward or in the backward of
``reshard_after_forward=True``, yields W), and all of them into the all-gathered weight of the running forward (whose
all-gather ran before the values changed). :class:`WeightShard` knows which rows a rank owns.

FSDP1 (``FullyShardedDataParallel``) flattens parameters into one flat buffer per unit and DeepSpeed ZeRO-3
partitions them behind the module's back; neither is supported (:func:`check_supported_sharding` says so).
The SEFT layers learn their shard in ``tuner/training.py`` (``bind_fsdp``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

UNSUPPORTED_SHARDING = (
    "SEFT writes W = W0 + delta into the base weight in place; {what} hides the weight's layout from it. "
    "Use FSDP2 instead: `torch.distributed.fsdp.fully_shard` on each decoder block and then on the model (with "
    "accelerate: `fsdp_version: 2`), or DDP when the model fits one device. See 'Scaling out' in the README."
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def is_dtensor(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered when it is a DTensor (a collective: every rank must call it), else itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_range(tensor: torch.Tensor) -> tuple[int, int]:
    """(start, stop) of the rows of a ``Shard(0)`` DTensor this rank holds (torch.chunk layout, as FSDP2 shards)."""
    from torch.distributed.tensor import Shard

    mesh, placements = tensor.device_mesh, tensor.placements
    if mesh.ndim != 1 or tuple(placements) != (Shard(0),):
        raise NotImplementedError(
            f"SEFT supports FSDP2 sharding on a 1-D mesh over dim 0 (got placements {placements} on a {mesh.ndim}-D "
            "mesh); HSDP and tensor parallelism are not supported."
        )
    rows = tensor.shape[0]
    chunk = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    stop = min(start + chunk, rows)
    if tensor.to_local().shape[0] != stop - start:
        raise RuntimeError(f"Unexpected FSDP2 shard: {tensor.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


def all_reduce_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks, in place (float64 for exactness when summing one non-zero per position)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class WeightShard:
    """The FSDP2 shard of one SEFT layer's base weight: rows [start, stop) of its storage, flat positions
    [start * row, stop * row)."""

    def __init__(self, fsdp_param) -> None:
        self.fsdp_param = fsdp_param
        sharded = fsdp_param.sharded_param
        start, stop = local_range(sharded)
        row = math.prod(sharded.shape[1:])
        self.start, self.stop = start * row, stop * row
        self.group = sharded.device_mesh.get_group()

    @property
    def sharded_param(self) -> nn.Parameter:
        return self.fsdp_param.sharded_param

    def local_flat(self) -> torch.Tensor:
        return self.sharded_param.to_local().data.view(-1)

    def owned(self, positions: torch.Tensor) -> torch.Tensor:
        """Mask of the flat storage positions this rank's shard holds."""
        return (positions >= self.start) & (positions < self.stop)

    def gather_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The shards' values at flat storage positions, on every rank (O(len(positions)) all-reduce, in float64;
        every rank must call it with the same positions)."""
        local = self.local_flat()
        values = torch.zeros(positions.numel(), dtype=torch.float64, device=local.device)
        own = self.owned(positions)
        values[own] = local[positions[own] - self.start].double()
        return all_reduce_(values, self.group).to(local.dtype)


def check_supported_sharding(layers, injecting: bool = False) -> None:
    """Refuse FSDP1 over several ranks and DeepSpeed ZeRO-3, which shard or flatten the base weights SEFT writes into,
    and (``injecting``) a base that FSDP2 already sharded: SEFT chooses its positions on the whole weight."""
    for layer in layers:
        base = layer.get_base_layer()
        if injecting and is_dtensor(base._parameters.get("weight")):
            raise RuntimeError(
                "The base model is already sharded (its weights are DTensors): call get_peft_model (or "
                "PeftModel.from_pretrained) first and fully_shard the SEFT model afterwards, each decoder block and "
                "then the root."
            )
        # FSDP1 puts plain tensor views of its flat parameter in the module during forward and marks the originals.
        flattened = not isinstance(base._parameters.get("weight"), nn.Parameter)
        for param in [base._parameters.get("weight"), *layer.seft_values.values()]:
            if param is None:
                continue
            if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
                raise RuntimeError(UNSUPPORTED_SHARDING.format(what="DeepSpeed ZeRO-3 (partitioned parameters)"))
            flattened = flattened or getattr(param, "_fsdp_flattened", False)
        if flattened and is_distributed():  # over one rank FSDP1's flat parameter holds every weight whole
            what = "FSDP1 (FullyShardedDataParallel, flattened parameters)"
            raise RuntimeError(UNSUPPORTED_SHARDING.format(what=what))


def values_range(values: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) of the K values this rank holds when FSDP2 shards them, None when they are whole."""
    return local_range(values) if is_dtensor(values) else None


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor
