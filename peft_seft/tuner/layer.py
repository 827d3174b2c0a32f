"""The SEFT tuner layer for ``nn.Linear`` and transformers' ``Conv1D``.

Per adapter the layer holds (all in the logical (out, in) orientation, flat index = row * in + col):

- ``seft_values``: the K trainable values delta (fp32 parameter);
- ``seft_indices``: their K positions T (int32 buffer, saved);
- ``seft_pruned``: the positions P that SEFT pruned, a fixed capacity of K slots padded with -1 (saved);
- ``seft_fingerprint``: shape, non-zero count and checksums of the base it was made for (saved);
- ``seft_step``: the optimizer step the adapter's evolution has reached (saved, so training resumes).

The effective weight ``W = (W0 with P zeroed) + scatter(T, delta)`` is written into the base weight in
place before each forward; only the O(K) original values at the touched positions are kept, and they are
written back bit-exactly whenever the adapter is disabled, unmerged, unloaded or deleted (or a state dict is taken).
A backward whose forward's W was overwritten in between writes it again first (``_weight_of_forward``).

Under FSDP2 (``fully_shard``) the base weight is sharded over the rows of its storage: W is written into the rank's
local shard (the positions it holds) and into the all-gathered weight of the running forward; W0 at the touched
positions is gathered once per change of positions and kept on every rank (see utils/distributed.py).
"""

from __future__ import annotations

import functools
import warnings

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..evolution.nm_rounds import evolve_nm
from ..evolution.rounds import Candidates, RoundCounts, RoundResult, evolve
from ..evolution.window import GradientWindow
from ..utils.distributed import all_reduce_, full_tensor, is_distributed, values_range
from ..utils.sparsity import logical_weight, nm_group_counts, parse_nm_pattern
from .config import SEFTConfig
from .fingerprint import weight_fingerprint
from .sparse_ops import SamplePattern, sampled_gradient, seft_linear

EMPTY_SLOT = -1


class SEFTLayer(BaseTunerLayer):
    adapter_layer_names = ("seft_values",)
    other_param_names = ("seft_indices", "seft_pruned", "seft_fingerprint", "seft_step")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        if not isinstance(base_layer, nn.Linear | Conv1D):
            raise TypeError(
                f"SEFT supports torch.nn.Linear and transformers' Conv1D layers, got {type(base_layer).__name__}. "
                "Exclude this module with `exclude_modules` or choose other `target_modules`."
            )
        self.base_layer = base_layer
        self.seft_values = nn.ParameterDict({})
        self.seft_indices = BufferDict({}, persistent=True)
        self.seft_pruned = BufferDict({}, persistent=True)
        self.seft_fingerprint = BufferDict({}, persistent=True)
        self.seft_step = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features, self.in_features = logical_weight(base_layer).shape
        self.kwargs = kwargs
        # In-place bookkeeping: which state is written into the base weight, and the originals to restore.
        self._applied_key: tuple | None = None
        self._applied_versions: tuple | None = None  # the values' versions written into the base weight
        self._touched_positions: torch.Tensor | None = None
        self._original_values: torch.Tensor | None = None
        self._pattern_cache: dict[str, tuple[tuple, SamplePattern]] = {}
        self._windows: dict[str, GradientWindow] = {}
        self._window_patterns: dict[str, SamplePattern] = {}  # the sampled-gradient pattern of each window's candidates
        self._nm_patterns: dict[str, tuple[int, int]] = {}  # adapter -> (N, M) when its config has a pattern
        self._shard = None  # a utils.distributed.WeightShard when FSDP2 shards the base weight (training.bind_fsdp)
        self._shard_w0: tuple | None = None  # (storage positions, W0 there) last gathered from the shards; kept
        # On the base layer itself, so that `base_layer.state_dict()` (and every state dict containing it) holds W0.
        self._state_dict_hook = base_layer.register_state_dict_pre_hook(
            functools.partial(_show_base_weight_in_state_dict, self)
        )

    # ---- adapter state -------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: SEFTConfig, num_trainable: int, layer_name: str = "") -> None:
        self._restore_base_weight()
        weight = logical_weight(self.get_base_layer()).detach()
        if config.pattern is not None:
            check_nm_pattern(weight, config.pattern, layer_name)
            self._nm_patterns[adapter_name] = parse_nm_pattern(config.pattern)
        else:
            self._nm_patterns.pop(adapter_name, None)
        nonzero = weight.reshape(-1).nonzero().squeeze(1)
        k = min(int(num_trainable), nonzero.numel())
        generator = None
        if config.random_seed is not None:
            generator = torch.Generator().manual_seed(config.random_seed)
        chosen = nonzero[torch.randperm(nonzero.numel(), generator=generator)[:k].to(nonzero.device)]
        device = weight.device
        if config.init_weights:
            values = torch.zeros(k, device=device)
        else:
            scale = weight.abs().sum() / max(nonzero.numel(), 1)
            values = torch.randn(k, generator=generator).to(device) * scale.float()
        self.seft_values[adapter_name] = nn.Parameter(values)
        self.seft_indices[adapter_name] = chosen.to(torch.int32)
        self.seft_pruned[adapter_name] = torch.full((k,), EMPTY_SLOT, dtype=torch.int32, device=device)
        self.seft_fingerprint[adapter_name] = weight_fingerprint(weight).to(device)
        self.seft_step[adapter_name] = torch.zeros(1, dtype=torch.int64, device=device)
        self.set_adapter(self.active_adapters)

    def pruned_positions(self, adapter_name: str) -> torch.Tensor:
        pruned = self.seft_pruned[adapter_name]
        return pruned[pruned != EMPTY_SLOT]

    def sample_pattern(self, adapter_name: str) -> SamplePattern:
        indices = self.seft_indices[adapter_name]
        key = (indices.data_ptr(), indices._version, indices.device)
        cached = self._pattern_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            cached = (key, SamplePattern.from_flat(indices, (self.out_features, self.in_features)))
            self._pattern_cache[adapter_name] = cached
        return cached[1]

    # ---- the effective weight, written in place --------------------------------------------------------

    def _storage_positions(self, logical_flat: torch.Tensor) -> torch.Tensor:
        logical_flat = logical_flat.long()
        if isinstance(self.get_base_layer(), Conv1D):
            rows, cols = logical_flat // self.in_features, logical_flat % self.in_features
            return cols * self.out_features + rows
        return logical_flat

    def _weight_storage(self) -> torch.Tensor:
        return self.get_base_layer().weight.data.view(-1)

    def _restore_base_weight(self) -> None:
        """Write the original values back at every touched position (bit-exact: originals are kept)."""
        if self._touched_positions is not None and self._shard is not None:
            self._write_sharded(self._original_values)
        elif self._touched_positions is not None:
            storage = self._weight_storage()
            storage[self._touched_positions.to(storage.device)] = self._original_values.to(storage)
        self._touched_positions = self._original_values = None
        self._applied_key = self._applied_versions = None

    def _adapter_key(self, adapter_names: list[str]) -> tuple:
        return tuple(
            (name, *(self._tensor_key(t) for t in (self.seft_indices[name], self.seft_pruned[name])))
            for name in adapter_names
        )

    def _values_versions(self, adapter_names: list[str]) -> tuple:
        return tuple(self.seft_values[name]._version for name in adapter_names)

    def _weight_state(self) -> tuple:
        """What the base weight holds now: which adapters' W (None: W0), and the weight tensor's identity."""
        weight = self.get_base_layer().weight
        return (self._applied_key, self._applied_versions, weight.data_ptr(), weight._version, weight.dtype)

    def _apply_adapters(self, adapter_names: list[str]) -> None:
        """Make the base weight hold W for these adapters (one rewrite of O(K) values per call)."""
        key = self._adapter_key(adapter_names)
        if self._shard is not None:
            self._apply_adapters_sharded(adapter_names, key)
            return
        storage = self._weight_storage()
        if key != self._applied_key:
            self._restore_base_weight()
            touched = torch.cat(
                [self.seft_indices[name].long() for name in adapter_names]
                + [self.pruned_positions(name).long() for name in adapter_names]
            )
            self._touched_positions = self._storage_positions(touched).unique()
            self._original_values = storage[self._touched_positions].clone()
            self._applied_key = key
        storage[self._touched_positions] = self._original_values.to(storage)
        self._write_adapters(storage, adapter_names)
        self._applied_versions = self._values_versions(adapter_names)

    # ---- under FSDP2: the local shard of the base weight and the all-gathered weight of a running forward ----------

    def _visible_storage(self) -> torch.Tensor | None:
        """The full (all-gathered) base weight the module holds inside a forward or backward under FSDP2, flat; None
        when it holds only its shard."""
        weight = self.get_base_layer().weight
        if weight is self._shard.sharded_param or weight.untyped_storage().size() == 0:
            return None
        return weight.data.view(-1)

    def _write_sharded(self, touched_values: torch.Tensor) -> None:
        """Write values at every touched position: into the local shard where it holds them, and into the
        all-gathered weight when a forward or backward holds one."""
        shard, positions = self._shard, self._touched_positions
        local = shard.local_flat()
        own = shard.owned(positions)
        local[positions[own] - shard.start] = touched_values[own].to(local.dtype)
        visible = self._visible_storage()
        if visible is not None:
            visible[positions] = touched_values.to(visible.dtype)

    def _apply_adapters_sharded(self, adapter_names: list[str], key: tuple) -> None:
        if key != self._applied_key:  # every rank at the same time: positions change together on all ranks
            self._restore_base_weight()
            touched = torch.cat(
                [self.seft_indices[name].long() for name in adapter_names]
                + [self.pruned_positions(name).long() for name in adapter_names]
            )
            self._touched_positions = self._storage_positions(touched).unique()
            self._original_values = self._shard.gather_at(self._touched_positions)  # W0 held by every rank
            self._shard_w0 = (self._touched_positions, self._original_values)
            self._applied_key = key
        self._write_sharded(self._touched_weight(adapter_names))
        self._applied_versions = self._values_versions(adapter_names)

    def _touched_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """W at the touched positions, computed as _write_adapters computes it (same rounding)."""
        touched = self._touched_positions
        weight = self._original_values.clone()
        for name in adapter_names:
            weight[torch.searchsorted(touched, self._storage_positions(self.pruned_positions(name)))] = 0
        for name in adapter_names:
            slots = torch.searchsorted(touched, self._storage_positions(self.seft_indices[name]))
            values = self._full_values(name).detach().float()
            weight[slots] = (weight[slots].float() + values).to(weight.dtype)
        return weight

    def _full_values(self, adapter_name: str) -> torch.Tensor:
        """The adapter's K values (all-gathered outside a forward when FSDP2 shards them: every rank must call)."""
        return full_tensor(self.seft_values[adapter_name])

    def _zero_values(self, adapter_name: str, slots: torch.Tensor) -> None:
        """Zero the values at a (K,) mask of slots, in the local shard when FSDP2 shards them."""
        values = self.seft_values[adapter_name]
        part = values_range(values)
        with torch.no_grad():
            if part is None:
                values[slots] = 0
            else:
                values.to_local()[slots[part[0] : part[1]]] = 0

    def _hold_weight_of(self, adapter_names: list[str]) -> None:
        """Make the base weight hold W for these adapters, or W0 for none."""
        if adapter_names:
            self._apply_adapters(adapter_names)
        else:
            self._restore_base_weight()

    def _write_adapters(self, storage: torch.Tensor, adapter_names: list[str]) -> None:
        """Turn a flat copy of W0 (storage order) into W: zero P, then add delta at T (summed in fp32)."""
        for name in adapter_names:
            storage[self._storage_positions(self.pruned_positions(name))] = 0
        for name in adapter_names:
            positions = self._storage_positions(self.seft_indices[name])
            values = self._full_values(name).detach().float()
            storage[positions] = (storage[positions].float() + values).to(storage.dtype)

    @staticmethod
    def _tensor_key(tensor: torch.Tensor) -> tuple:
        return (tensor.data_ptr(), tensor._version, tensor.device)

    def effective_weight(self, adapter_names: list[str] | None = None) -> torch.Tensor:
        """W (out, in) for the given (default: active) adapters, computed on a copy; W0 for an empty list."""
        names = self._active_seft_adapters() if adapter_names is None else adapter_names
        if self._shard is not None:  # the all-gathered weight (a collective outside forward and backward)
            visible = self._visible_storage()
            storage = (visible if visible is not None else full_tensor(self._shard.sharded_param).reshape(-1)).clone()
        else:
            storage = self._weight_storage().clone()
        if self._touched_positions is not None:
            storage[self._touched_positions] = self._original_values.to(storage)
        self._write_adapters(storage, names)
        weight = storage.view(self.get_base_layer().weight.shape)
        return weight.T if isinstance(self.get_base_layer(), Conv1D) else weight

    def _active_seft_adapters(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.seft_values]

    # ---- evolution -------------------------------------------------------------------------------------

    def base_values_at(self, logical_positions: torch.Tensor) -> torch.Tensor:
        """W0 at the given positions, whatever the base weight holds in place right now."""
        storage_positions = self._storage_positions(logical_positions)
        if self._shard is not None:
            known, visible = self._shard_w0, self._visible_storage()
            if known is not None and bool(torch.isin(storage_positions, known[0]).all()):
                # W0 last gathered there (e.g. at T: saving needs no collective, so rank 0 may save alone)
                return known[1][torch.searchsorted(known[0], storage_positions)].clone()
            if visible is not None:
                values = visible[storage_positions].clone()
            else:  # a collective: every rank must call
                values = self._shard.gather_at(storage_positions)
        else:
            values = self._weight_storage()[storage_positions].clone()
        if self._touched_positions is not None and storage_positions.numel():
            slot = torch.searchsorted(self._touched_positions, storage_positions).clamp_max(
                self._touched_positions.numel() - 1
            )
            known = self._touched_positions[slot] == storage_positions
            values[known] = self._original_values[slot[known]].to(values)
        return values

    def open_window(
        self, adapter_name: str, num_grow: int, num_prune: int, grow_pruned: bool, growth_normalization: str = "none"
    ) -> None:
        """Start gathering gradient statistics for the next round of this adapter (see window.py)."""
        self._windows[adapter_name] = GradientWindow(
            self.seft_indices[adapter_name],
            num_grow,
            num_prune,
            grow_pruned,
            self.in_features,
            self.out_features,
            growth_normalization,
        )
        self._window_patterns.pop(adapter_name, None)

    def close_window(self, adapter_name: str) -> GradientWindow | None:
        window = self._windows.pop(adapter_name, None)
        self._window_patterns.pop(adapter_name, None)
        return window

    def restore_window(self, adapter_name: str, window: GradientWindow | None) -> None:
        """Replace this adapter's window by one loaded from a checkpoint saved mid-window (None: close it)."""
        self.close_window(adapter_name)
        if window is not None:
            self._windows[adapter_name] = window

    def _gradient_pattern(self, adapter_name: str) -> SamplePattern:
        """Where backward samples the gradient: T, followed by the window's candidates once they are chosen (one
        sampled product then serves the values and the window)."""
        window = self._windows.get(adapter_name)
        if window is None or not window.selected:
            return self.sample_pattern(adapter_name)
        if adapter_name not in self._window_patterns:
            positions = torch.cat([window.trainable, window.candidates])
            self._window_patterns[adapter_name] = SamplePattern.from_flat(
                positions, (self.out_features, self.in_features)
            )
        return self._window_patterns[adapter_name]

    def _collect_gradient(
        self, adapter_names: tuple[str, ...], grad_out: torch.Tensor, inputs: torch.Tensor, sampled: list
    ) -> None:
        """Called in backward with this micro-batch's output gradient and inputs (N, out), (N, in), and the sampled
        gradient of each adapter of the forward (at T, then at the window's candidates once chosen). The dense
        weight gradient is formed only on a window's first micro-batch, to choose its candidates, and is freed when
        this returns."""
        dense = column_sq = row_sq = None  # each computed once per micro-batch, for every adapter that needs it
        for name, gradient in zip(adapter_names, sampled, strict=True):
            window = self._windows.get(name)
            if window is None or gradient is None:
                continue
            k = window.trainable.numel()
            if column_sq is None:  # for the Wanda criterion and growth normalization
                column_sq = inputs.float().pow(2).sum(0)
            if row_sq is None and window.growth_normalization == "input_output":
                row_sq = grad_out.float().pow(2).sum(0)
            squares = column_sq, row_sq if window.growth_normalization == "input_output" else None
            if not window.selected and is_distributed():
                # Candidates of the global micro-batch: the mean of the ranks' gradients (each of a mean loss), as
                # DDP and FSDP average; the window's own sums stay local until the step ends (end_window_step).
                world = torch.distributed.get_world_size()
                if dense is None:
                    dense = all_reduce_(grad_out.T.float() @ inputs.float()) / world
                global_columns, global_rows = (None if s is None else all_reduce_(s.clone()) for s in squares)
                if global_rows is not None:
                    global_rows /= world**2  # output gradients of the global mean loss
                weight = logical_weight(self.get_base_layer()).detach()
                window.select(dense, weight, self.pruned_positions(name), global_columns, global_rows)
                pattern = SamplePattern.from_flat(window.candidates, (self.out_features, self.in_features))
                candidate_grad = sampled_gradient(grad_out, inputs, pattern)
            elif not window.selected:
                if dense is None:
                    dense = grad_out.T.float() @ inputs.float()
                weight = logical_weight(self.get_base_layer()).detach()
                window.select(dense, weight, self.pruned_positions(name), *squares)
                candidate_grad = dense.reshape(-1)[window.candidates]
            elif gradient.numel() == k + window.candidates.numel():
                candidate_grad = gradient[k:]
            else:  # this forward ran before the candidates were chosen (several forwards before one backward)
                pattern = SamplePattern.from_flat(window.candidates, (self.out_features, self.in_features))
                candidate_grad = sampled_gradient(grad_out, inputs, pattern)
            window.add_micro_batch(gradient[:k], candidate_grad, *squares)

    def end_window_step(self, adapter_name: str) -> None:
        """After an optimizer step: fold that step's gradients into the adapter's window (if one is open)."""
        window = self._windows.get(adapter_name)
        if window is not None:
            grad = self.seft_values[adapter_name].grad
            window.end_step(None if grad is None else full_tensor(grad), reduce=is_distributed())

    def evolve_adapter(
        self, adapter_name: str, drop_rate: float, config: SEFTConfig
    ) -> tuple[RoundCounts, torch.Tensor, GradientWindow] | None:
        """Run one round on this adapter with the statistics of its closed window.

        Returns the counts, the (K,) mask of changed slots and the window, or None when the round is skipped
        (no window, no finite gradient seen)."""
        window = self.close_window(adapter_name)
        if window is None or window.steps == 0 or not window.finite:
            return None
        indices, values = self.seft_indices[adapter_name], self._full_values(adapter_name)
        pruned_buffer = self.seft_pruned[adapter_name]
        pruned = self.pruned_positions(adapter_name)
        trainable_scores, grow = window.growth(config.growth_statistic)
        restore_scores = window.at(pruned, config.sensitivity_statistic) * self.base_values_at(pruned).float().abs()
        common = {
            "indices": indices,
            "drop_keys": trainable_scores if config.drop_criterion == "gradient" else values.detach().abs(),
            "pruned": pruned,
            "zero_in_base": self.base_values_at(indices) == 0,
            "grow": grow,
            "restore_scores": restore_scores,
            "num_drop": int(drop_rate * indices.numel()),
            "grow_pruned": config.grow_pruned,
            "trainable_scores": trainable_scores,
        }
        # W outside T is frozen during the window: the window's |W| at its candidates still holds. The whole W is
        # formed only where a criterion needs it.
        weight = None
        if adapter_name in self._nm_patterns or config.prune_criterion != "sensitivity":
            weight = self.effective_weight([adapter_name]).reshape(-1)
        if adapter_name in self._nm_patterns:
            result = self._evolve_nm(adapter_name, window, weight, config, common)
        else:
            prune = self._prune_candidates(adapter_name, window, weight, config)
            result = evolve(grow_inactive=window.weight_abs[window.is_grow] == 0, prune=prune, **common)
        with torch.no_grad():
            indices.copy_(result.indices.to(indices.dtype))
            pruned_buffer.fill_(EMPTY_SLOT)
            pruned_buffer[: result.pruned.numel()] = result.pruned.to(pruned_buffer.dtype)
        self._zero_values(adapter_name, result.changed_slots)
        return result.counts, result.changed_slots, window

    def _evolve_nm(
        self, adapter_name: str, window: GradientWindow, weight: torch.Tensor, config: SEFTConfig, common: dict
    ) -> RoundResult:
        """The N:M round (nm_evolution.py): re-activation inside a group is paid for inside that group.

        Frozen partners: with the sensitivity criterion the window's least sensitive weights come first and the
        other frozen weights of a group follow by magnitude |W| (the window tracks only the least sensitive ones);
        magnitude and Wanda scores are computed directly for the groups involved."""
        column_scale, prune = None, Candidates.empty(weight.device)
        if config.prune_criterion == "wanda":
            column_scale = (window.column_sq_sums / window.steps).sqrt()
        elif config.prune_criterion == "sensitivity":
            prune = window.sensitivity(config.sensitivity_statistic)
        m = self._nm_patterns[adapter_name][1]
        return evolve_nm(
            weight=weight, in_features=self.in_features, m=m, prune=prune, column_scale=column_scale, **common
        )

    def _prune_candidates(
        self, adapter_name: str, window: GradientWindow, weight: torch.Tensor | None, config: SEFTConfig
    ) -> Candidates:
        """Frozen active positions (non-zero, not trainable) with the smallest scores, at most K of them.
        ``weight``: the flat W, needed by the magnitude and Wanda criteria only."""
        if config.prune_criterion == "sensitivity":
            return window.sensitivity(config.sensitivity_statistic)  # chosen among frozen active weights
        trainable = self.seft_indices[adapter_name].long()
        scores = weight.abs().float()
        if config.prune_criterion == "wanda":
            column_norms = (window.column_sq_sums / window.steps).sqrt()
            scores = (scores.view(self.out_features, self.in_features) * column_norms).reshape(-1)
        scores.masked_fill_(weight == 0, float("inf"))
        scores[trainable] = float("inf")
        k = min(trainable.numel(), scores.numel())
        best, positions = torch.topk(scores, k, largest=False)
        keep = torch.isfinite(best)
        return Candidates(positions[keep], best[keep])

    # ---- PEFT's layer contract -------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.seft_values]
        if not adapter_names:
            return
        for name in adapter_names:
            if not torch.isfinite(self.seft_values[name]).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self._apply_adapters(self.merged_adapters + adapter_names)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._restore_base_weight()
        self.merged_adapters = []

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if not self.merged:  # also when none of `adapter_names` is on this layer: drop the in-place W of forward
            self._restore_base_weight()
        # Whatever the base weight holds now is kept: forget the originals.
        self._touched_positions = self._original_values = self._applied_key = self._applied_versions = None
        self._state_dict_hook.remove()
        return self.get_base_layer()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if not enabled and not self.merged:
            self._restore_base_weight()

    def delete_adapter(self, adapter_name: str) -> None:
        self._restore_base_weight()
        self._pattern_cache.pop(adapter_name, None)
        self._nm_patterns.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """W - W0 for one adapter as a dense (out, in) tensor (for inspection; never used in training)."""
        return self.effective_weight([adapter_name]) - self.effective_weight([])

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


class SEFTLinear(nn.Module, SEFTLayer):
    """A linear (or Conv1D) layer with SEFT adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SEFTConfig, num_trainable: int, **kwargs):
        super().__init__()
        SEFTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, num_trainable, kwargs.get("layer_name", ""))
        self._warned_about_hooks = False

    def _apply(self, fn, recurse: bool = True):
        # Casts and moves (`.to(bf16)`, `.half()`, `.cuda()`) convert the base weight, which may hold W in place: the
        # kept originals follow, so that restoring writes the converted W0.
        if self._touched_positions is not None:
            self._touched_positions, self._original_values = fn(self._touched_positions), fn(self._original_values)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged and not self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            self.unmerge()
        self._warn_once_about_hooks()
        names = [] if self.disable_adapters else self._active_seft_adapters()
        self._hold_weight_of(names)
        base = self.get_base_layer()
        values = [self.seft_values[name] for name in names]
        patterns = [self._gradient_pattern(name) for name in names]
        weight = logical_weight(base)
        collector = functools.partial(self._collect_gradient, tuple(names)) if names and self._windows else None
        out = seft_linear(x, weight, base.bias, values, patterns, collector)
        if out.grad_fn is not None:
            # Backward reads the base weight again: anything between forward and backward (a reference forward under
            # disable_adapter, a state_dict, another adapter's forward) may have written another W there.
            out.grad_fn.register_prehook(functools.partial(_weight_of_forward, self, names, self._weight_state()))
        return out

    def _warn_once_about_hooks(self) -> None:
        base = self.get_base_layer()
        if not self._warned_about_hooks and (base._forward_hooks or base._forward_pre_hooks):
            warnings.warn(
                "A layer adapted with SEFT has forward hooks on its base layer; SEFT computes the layer itself, so "
                "these hooks do not run. Register them on the SEFT layer instead.",
                stacklevel=2,
            )
            self._warned_about_hooks = True

    def __repr__(self) -> str:
        return "seft." + super().__repr__()


def _weight_of_forward(layer: SEFTLinear, names: list[str], state: tuple, grad_outputs: tuple) -> None:
    """Backward pre-hook: make the base weight hold the W this forward used again (O(K)) if it was overwritten."""
    if layer._shard is not None:  # FSDP2 may have all-gathered the weight again (from shards that hold W): write W
        layer._hold_weight_of(names)
        return
    if layer._weight_state() == state:
        return
    if names and (layer._adapter_key(names), layer._values_versions(names)) != state[:2]:
        raise RuntimeError(
            f"The SEFT adapter(s) {names} changed (values or positions) between a forward and its backward; "
            "call backward before optimizer.step() or any other in-place change of the adapter."
        )
    layer._hold_weight_of(names)


def _show_base_weight_in_state_dict(layer: SEFTLinear, base_layer: nn.Module, prefix: str, keep_vars: bool) -> None:
    # A state dict must hold W0, not the W the last forward wrote in place: a full model state dict loaded into a
    # fresh model would otherwise apply the adapter twice. The next forward writes W again (O(K)).
    if not layer.merged:
        layer._restore_base_weight()


def check_nm_pattern(weight: torch.Tensor, pattern: str, layer_name: str) -> None:
    """Raise a clear error naming the first group of ``weight`` (out, in) that breaks the N:M pattern."""
    n, m = parse_nm_pattern(pattern)
    if weight.shape[1] % m:
        raise ValueError(
            f"SEFTConfig(pattern={pattern!r}) needs input dimensions divisible by {m}, but layer {layer_name or '?'} "
            f"has {weight.shape[1]} inputs. Exclude it with `exclude_modules` or set pattern=None."
        )
    counts = nm_group_counts(weight, m)
    bad = (counts > n).nonzero()
    if bad.numel():
        row, group = bad[0].tolist()
        raise ValueError(
            f"SEFTConfig(pattern={pattern!r}) needs a base whose layers are {pattern} sparse, but layer "
            f"{layer_name or '?'} has {int(counts[row, group])} non-zeros in row {row}, input columns "
            f"{group * m}..{group * m + m - 1}. Prune the model with that pattern first "
            f"(peft_seft.pruning.prune(model, 'wanda', pattern={pattern!r}, ...)) or set pattern=None."
        )
