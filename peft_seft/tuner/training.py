"""Sparsity evolution during training, in any loop.

A global optimizer-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) sees every
``optimizer.step()``. For each SEFT adapter whose values that optimizer trains it counts the step, opens the
gradient window ``selection_steps`` before each round, runs the round every ``update_interval`` steps, and
resets (or seeds) the optimizer state of every slot whose position changed. Plain PyTorch loops, the
transformers Trainer and TRL's SFTTrainer therefore need no extra code. Rounds stop at ``total_steps``
(taken from the Trainer's max steps when unset, see callbacks.py).

Under torch.distributed (DDP, FSDP2) the windows' statistics are reduced over ranks (window.py, layer.py), so every
rank runs the same round on the statistics of the global batch; rank 0's positions are broadcast after each round
only as a guard.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..evolution.rounds import RoundCounts, drop_count, drop_rate
from ..utils.distributed import WeightShard, check_supported_sharding, is_distributed, local_part, values_range
from .config import SEFTConfig
from .layer import EMPTY_SLOT, SEFTLayer

logger = logging.getLogger("peft_seft")


@dataclass
class RoundReport:
    """What one evolution round did to one adapter, summed over its layers."""

    step: int
    adapter: str
    drop_rate: float
    counts: RoundCounts
    active: int
    budget: int
    skipped_layers: int

    def as_log(self) -> dict[str, float]:
        prefix = f"seft/{self.adapter}/" if self.adapter != "default" else "seft/"
        logs = {f"{prefix}{key}": value for key, value in vars(self.counts).items()}
        logs.update(
            {
                f"{prefix}drop_rate": self.drop_rate,
                f"{prefix}active": self.active,
                f"{prefix}budget": self.budget,
                f"{prefix}skipped_layers": self.skipped_layers,
            }
        )
        return logs


def window_size(config: SEFTConfig, num_trainable: int, rate: float) -> tuple[int, int]:
    """Growth and prune candidates a window tracks for a round of drop rate ``rate``: candidate_factor times the
    positions the round replaces, and as many prune candidates when the round may re-prune (sensitivity criterion,
    with re-activation: without it a round never re-prunes)."""
    num_grow = math.ceil(config.candidate_factor * drop_count(num_trainable, rate))
    return num_grow, num_grow if config.prune_criterion == "sensitivity" and config.grow_pruned else 0


class Evolution:
    """Drives the evolution of every SEFT adapter of one tuner model."""

    def __init__(self, tuner) -> None:
        self._tuner = weakref.ref(tuner)
        self.reports: list[RoundReport] = []
        self._scheduled: dict[str, tuple] = {}
        tuner_ref = self._tuner
        handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: _on_step(tuner_ref, optimizer))
        weakref.finalize(tuner, handle.remove)

    def __getstate__(self) -> dict:
        # Pickling or deep-copying a SEFT model copies its tuner: the copy gets an Evolution bound to the copied tuner
        # with its own optimizer-step hook (the weak reference and the hook handle cannot be copied).
        return {"tuner": self._tuner(), "reports": self.reports}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["tuner"])
        self.reports = state["reports"]

    def layers(self) -> list[SEFTLayer]:
        tuner = self._tuner()
        return [m for m in tuner.model.modules() if isinstance(m, SEFTLayer)] if tuner is not None else []

    def config(self, adapter_name: str):
        return self._tuner().peft_config[adapter_name]

    def step_of(self, adapter_name: str) -> int:
        for layer in self.layers():
            if adapter_name in layer.seft_step:
                return int(layer.seft_step[adapter_name].item())
        return 0

    def trained_layers(self, optimizer: torch.optim.Optimizer) -> dict[str, list[SEFTLayer]]:
        """Per adapter, the layers whose values this optimizer trains (values that require grad): only those
        evolve."""
        param_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trained: dict[str, list[SEFTLayer]] = {}
        for layer in self.layers():
            for name, values in layer.seft_values.items():
                if id(values) in param_ids and values.requires_grad:
                    trained.setdefault(name, []).append(layer)
        return dict(sorted(trained.items()))

    def on_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trained_layers = self.trained_layers(optimizer)
        if trained_layers and _initializes_state(optimizer):
            return
        for name, trained in trained_layers.items():
            config = self.config(name)
            if config.initial_drop_rate == 0:
                continue
            if config.total_steps is None:
                self.rate_at(name, 0)  # raises the error explaining total_steps at the first step, not the first round
            for layer in self.layers():
                if name in layer.seft_step:
                    layer.seft_step[name] += 1
            for layer in trained:
                layer.end_window_step(name)
            step = self.step_of(name)
            self._scheduled[name] = None
            if step % config.update_interval == 0:
                self._run_round(name, trained, step, optimizer)
            self.schedule_window(name, step)

    def before_forward(self) -> None:
        """Open the windows due at the current step, once after creation, loading or resuming."""
        if dist.is_available() and dist.is_initialized():  # FSDP2 may shard over a single rank too
            self.bind_shards()
        if not torch.is_grad_enabled():
            return
        seen = set()
        for layer in self.layers():
            for name, step_buffer in layer.seft_step.items():
                if name in seen or not layer.seft_values[name].requires_grad:
                    continue
                seen.add(name)
                key = (step_buffer.data_ptr(), step_buffer._version)
                if self._scheduled.get(name) != key:
                    self._scheduled[name] = key
                    if self.config(name).initial_drop_rate > 0:
                        self.schedule_window(name, int(step_buffer.item()))

    def bind_shards(self) -> None:
        """Under torch.distributed: refuse FSDP1 and DeepSpeed ZeRO-3, and find the FSDP2 shard of every layer's base
        weight (fully_shard may be called after get_peft_model at any time before training)."""
        tuner = self._tuner()
        if tuner is not None:
            check_supported_sharding(self.layers())
            bind_fsdp(tuner.model)

    def round_due(self, adapter_name: str, step: int) -> bool:
        """Whether a round with a non-zero drop rate happens right after optimizer step ``step``."""
        config = self.config(adapter_name)
        if config.initial_drop_rate == 0 or step % config.update_interval or step <= 0:
            return False
        return self.rate_at(adapter_name, step) > 0

    def rate_at(self, adapter_name: str, step: int) -> float:
        config = self.config(adapter_name)
        if config.total_steps is None:
            raise ValueError(
                "SEFTConfig.total_steps is not set: the drop rate decays to 0 at total_steps. Set it to the number of "
                "optimizer steps of your training loop (the Trainer and SFTTrainer set it to max_steps themselves)."
            )
        first_round = config.update_interval if config.full_reselection_first else None
        return drop_rate(step, config.total_steps, config.initial_drop_rate, config.drop_schedule, first_round)

    def schedule_window(self, adapter_name: str, step: int) -> None:
        """Open the gradient window when the next optimizer step is one of the last ``selection_steps`` before a
        round (and close stale windows otherwise). Windows are sized for the coming round: candidate_factor times
        the number of positions it replaces, in growth and (sensitivity criterion) pruning candidates."""
        config = self.config(adapter_name)
        next_step = step + 1
        next_round = -(-next_step // config.update_interval) * config.update_interval
        collecting = next_round - next_step < config.selection_steps
        if config.total_steps is not None:
            collecting = collecting and self.round_due(adapter_name, next_round)
        for layer in self.layers():
            values = layer.seft_values.get(adapter_name)
            if values is None:
                continue
            if not collecting or not values.requires_grad:
                layer.close_window(adapter_name)
            elif adapter_name not in layer._windows:
                # Before total_steps is known (a forward before the Trainer set it) size for the largest rate.
                rate = self.rate_at(adapter_name, next_round) if config.total_steps is not None else 1.0
                num_grow, num_prune = window_size(config, values.numel(), rate)
                layer.open_window(adapter_name, num_grow, num_prune, config.grow_pruned, config.growth_normalization)

    def _run_round(self, name: str, layers: list[SEFTLayer], step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.round_due(name, step):
            for layer in layers:
                layer.close_window(name)
            return
        config = self.config(name)
        rate = self.rate_at(name, step)
        total, skipped = RoundCounts(), 0
        for layer in layers:
            old_indices = layer.seft_indices[name].clone()
            # Under torch.distributed every rank holds the same reduced window statistics (window.py), so every rank
            # runs the same round, skips the same layers, and the values are the same (DDP) or their shards (FSDP2).
            distributed = is_distributed()
            old_values = local_part(layer.seft_values[name]).detach().clone() if distributed else None
            outcome = layer.evolve_adapter(name, rate, config)
            if outcome is None:
                skipped += 1
                continue
            counts, _, window = outcome
            if distributed and _broadcast_adapter_state(layer, name):  # a guard: positions cannot drift apart
                with torch.no_grad():  # this rank zeroed the slots of its own decision: zero rank 0's instead
                    local_part(layer.seft_values[name]).copy_(old_values)
            changed = layer.seft_indices[name] != old_indices
            layer._zero_values(name, changed)
            seed = None
            if config.grown_optimizer_state != "zero":
                seed = window.optimizer_seed(layer.seft_indices[name][changed].long())
                if config.grown_optimizer_state == "warmup":
                    seed = (torch.zeros_like(seed[0]), seed[1])
            reset_optimizer_state(optimizer, layer.seft_values[name], changed, seed)
            total = total + counts
        active, budget = self.active_count(name, [layer for layer in self.layers() if name in layer.seft_values])
        report = RoundReport(step, name, rate, total, active, budget, skipped)
        self.reports.append(report)
        if skipped:
            logger.warning(
                "SEFT round at step %d skipped %d layer(s) of adapter %r: no finite gradient in their window "
                "(NaN/inf gradients); their positions are unchanged.",
                step,
                skipped,
                name,
            )
        counts = ", ".join(f"{key} {value:,}" for key, value in vars(total).items())
        logger.info(
            "SEFT round at step %d (%s): drop rate %.3f, %s; active %s of %s",
            step,
            name,
            rate,
            counts,
            f"{active:,}",
            f"{budget:,}",
        )

    @staticmethod
    def active_count(name: str, layers: list[SEFTLayer]) -> tuple[int, int]:
        """Structurally active positions versus the non-zero budget N, summed over layers."""
        active = budget = 0
        for layer in layers:
            budget += int(layer.seft_fingerprint[name][2])
            zero_in_base = (layer.base_values_at(layer.seft_indices[name]) == 0).sum()
            num_pruned = (layer.seft_pruned[name] != EMPTY_SLOT).sum()
            active += int(layer.seft_fingerprint[name][2] - num_pruned + zero_in_base)
        return active, budget


def _on_step(tuner_ref: weakref.ref, optimizer: torch.optim.Optimizer) -> None:
    tuner = tuner_ref()
    if tuner is not None:
        tuner.evolution.on_optimizer_step(optimizer)


def _initializes_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this step only creates the optimizer's state: torch.distributed.checkpoint's set_optimizer_state_dict
    (used to resume FSDP2 training) calls step() with lr 0 and all-zero gradients before loading the state. It is
    not a training step: counting it would shift every later round and window by one step."""
    if any(float(group.get("lr", 1.0)) != 0 for group in optimizer.param_groups):
        return False
    nonzero = any(
        p.grad is not None and bool(local_part(p.grad).count_nonzero())
        for group in optimizer.param_groups
        for p in group["params"]
    )
    if is_distributed():  # the same answer on every rank, whatever its shard holds
        device = next(local_part(p).device for group in optimizer.param_groups for p in group["params"])
        flag = torch.tensor([float(nonzero)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        nonzero = bool(flag.item())
    return not nonzero


def _broadcast_adapter_state(layer: SEFTLayer, name: str) -> bool:
    """A guard after each round under torch.distributed: every rank computed the same round from the same reduced
    statistics; should floating-point differences ever make a rank decide otherwise, it takes rank 0's positions
    (O(K) per layer and round), says so and returns True."""
    replaced = False
    for tensor in (layer.seft_indices[name], layer.seft_pruned[name]):
        received = tensor.clone()
        dist.broadcast(received, src=0)
        if not torch.equal(received, tensor):
            logger.warning("SEFT round: rank %d took rank 0's positions of a layer (adapter %r)", dist.get_rank(), name)
            # copy_ bumps tensor._version, which the layer's in-place weight and pattern caches key on.
            with torch.no_grad():
                tensor.copy_(received)
            replaced = True
    return replaced


def bind_fsdp(model: nn.Module) -> None:
    """Tell every SEFT layer of ``model`` whether FSDP2 shards its base weight (and where its shard is)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 has no public FSDP2: nothing can be sharded by it
        return

    weight_params = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group is not None else ():
                info = fsdp_param._module_info
                weight_params[(id(info.module), info.param_name)] = fsdp_param
    for module in model.modules():
        if isinstance(module, SEFTLayer):
            fsdp_param = weight_params.get((id(module.get_base_layer()), "weight"))
            current = module._shard
            if fsdp_param is None:
                module._shard = None
            elif current is None or current.fsdp_param is not fsdp_param:
                # A forward before fully_shard left W in the weight that FSDP2 split into shards: the kept originals
                # are written back into the shard (positions are those of the storage, which sharding keeps).
                module._shard, module._shard_w0 = WeightShard(fsdp_param), None
                module._restore_base_weight()


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    changed: torch.Tensor,
    seed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Zero every per-element optimizer state of ``param`` at the changed slots, for any torch optimizer.

    ``seed`` (Adam family only): the first and second moment to give the changed slots, e.g. the mean and the mean
    square of the window's optimizer-step gradients (``grown_optimizer_state="seed"``), or zero and the mean square
    (``"warmup"``). Adam's moments are set to them times (1 - beta^t): its bias correction at the next step then
    yields exactly them, at any global step t (zeroed moments make a grown entry's first update about 0.5x an
    established entry's early in training and 3x late).
    """
    state = optimizer.state.get(param)
    if not state or not changed.any():
        return
    part = values_range(param)  # FSDP2 shards the values and their state: each rank resets the slots it holds
    if part is not None:
        if seed is not None:
            in_part = (changed.nonzero().squeeze(1) >= part[0]) & (changed.nonzero().squeeze(1) < part[1])
            seed = tuple(s[in_part] for s in seed)
        changed = changed[part[0] : part[1]]
    with torch.no_grad():
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                local_part(value)[changed] = 0
        if seed is not None and "exp_avg" in state and "exp_avg_sq" in state:
            group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
            beta1, beta2 = group["betas"]
            step = float(local_part(state["step"])) if "step" in state else 1.0
            mean, mean_square = seed
            for key, target in (("exp_avg", mean * (1 - beta1**step)), ("exp_avg_sq", mean_square * (1 - beta2**step))):
                local = local_part(state[key])
                local[changed] = target.to(local)
