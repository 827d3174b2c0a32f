"""Exact gradient statistics of one layer over the selection window, in O(K) memory.

The statistics are those of optimizer-step gradients: each micro-batch's gradient is added to a step accumulator,
and :meth:`GradientWindow.end_step` folds the step into the window sums (signed sum, sum of absolute values, sum of
squares). Rounds rank by these exact sums, never by a single reading.

Which positions are tracked is decided once, on the window's first micro-batch, from that micro-batch's dense weight
gradient G (formed one layer at a time inside backward and freed right after), as SpIEL does:

- the K trainable positions T (their gradient is the value gradient, computed on every step anyway);
- growth candidates: the ``num_grow`` positions outside T with the largest |G| (only currently active positions
  when ``grow_pruned`` is False), or the largest normalized |G_ij| (see below);
- prune candidates (sensitivity criterion only): the ``num_prune`` frozen active positions (non-zero, not in T) with
  the smallest |W * G|;
- the positions of P (SEFT's pruned positions), whose restore scores need their gradient.

On every later micro-batch the gradient is computed at the tracked positions only, with the same sampled product
as the value gradient. Per-input-column sums of squared inputs are kept for the Wanda criterion and for growth
normalization, per-output-row sums of squared output gradients for the latter. Nothing weight-sized survives a
backward.

``growth_normalization="input"`` divides growth scores by the RMS of each position's input feature x_j: the gradient
in the coordinates W_ij * ||x_j|| that Wanda prunes in. Adam moves every trainable weight by about the learning rate,
which moves the output by that times ||x_j||, so ranking by raw |g| favours weights on a few large-activation inputs,
the ones whose steps overshoot. ``"input_output"`` divides by ||e_i|| too, the norm of output i's gradient over the
tokens: on one micro-batch the score is then the cosine between e_i and x_j (|g_ij| <= ||e_i|| ||x_j||), and growth
no longer piles into the few outputs whose gradient is largest.
"""

from __future__ import annotations

import torch

from ..utils.distributed import is_distributed
from .rounds import Candidates

EXCLUDED = -torch.finfo(torch.float32).max  # the key of a position that may not be chosen
THRESHOLD_SAMPLE = 8192


class GradientWindow:
    """What one adapter of one layer gathers of the gradients in the current selection window.

    Tracked positions are ``trainable`` (K, in slot order) followed by ``candidates`` (C, sorted, unique); every
    statistic is a (K + C,) tensor in that order.
    """

    def __init__(
        self,
        trainable: torch.Tensor,
        num_grow: int,
        num_prune: int,
        grow_pruned: bool,
        in_features: int,
        out_features: int,
        growth_normalization: str = "none",
    ) -> None:
        device = trainable.device
        self.trainable = trainable.long().clone()
        self.num_grow, self.num_prune, self.grow_pruned = num_grow, num_prune, grow_pruned
        self.growth_normalization = growth_normalization  # a setting of the adapter: not saved with the window
        self.candidates = torch.empty(0, dtype=torch.long, device=device)
        self.is_grow = torch.empty(0, dtype=torch.bool, device=device)
        self.is_prune = torch.empty(0, dtype=torch.bool, device=device)
        self.weight_abs = torch.empty(0, device=device)  # |W| at the candidates (constant during a window)
        self.selected = False
        self.column_sq_sums = torch.zeros(in_features, device=device)
        self.row_sq_sums = torch.zeros(out_features, device=device)
        self._allocate()
        self.steps = 0
        self.finite = True

    def _allocate(self) -> None:
        size = self.trainable.numel() + self.candidates.numel()
        device = self.trainable.device
        self.step_sum, self.sums, self.abs_sums, self.sq_sums = (torch.zeros(size, device=device) for _ in range(4))
        self.step_column_sq = self.step_row_sq = None  # this step's squares, kept apart while ranks must reduce them
        self.step_micro_batches = 0

    # ---- gathering ---------------------------------------------------------------------------------------

    def select(
        self,
        grad: torch.Tensor,
        weight: torch.Tensor,
        pruned: torch.Tensor,
        column_sq: torch.Tensor | None = None,
        row_sq: torch.Tensor | None = None,
    ) -> None:
        """Choose the candidates from the first micro-batch's dense gradient ``grad`` (out, in) fp32, with the
        effective weight ``weight`` (out, in) and the positions ``pruned`` of P. ``column_sq`` (in,) and ``row_sq``
        (out,): that micro-batch's sums of squared inputs per column and of squared output gradients per row, needed
        by growth normalization."""
        flat_grad, flat_weight = grad.reshape(-1), weight.reshape(-1)
        # Two weight-sized buffers serve every key: fresh ones cost page faults on CPU. Keys are ranked largest
        # first; positions that may not be chosen get the key EXCLUDED, added arithmetically from a 0/1 float mask
        # (exact for the others: they add 0), because masked_fill_, where and comparisons into bool are several
        # times slower on CPU than arithmetic and comparisons into float.
        keys, scratch = torch.empty_like(flat_grad), torch.empty_like(flat_grad)
        torch.abs(flat_grad, out=keys)
        if self.growth_normalization != "none":
            rows, columns = (torch.arange(size, device=grad.device) for size in grad.shape)
            divisor = self._growth_divisor(column_sq, row_sq, rows[:, None], columns[None, :], scratch.view_as(grad))
            keys.view_as(grad).div_(divisor)
        inactive = torch.eq(flat_weight, 0, out=scratch)  # 1.0 where W is zero
        if not self.grow_pruned:
            keys.add_(inactive, alpha=EXCLUDED)
        keys[self.trainable] = EXCLUDED
        grow = _top(keys, self.num_grow)
        prune = torch.empty(0, dtype=torch.long, device=grad.device)
        if self.num_prune:
            torch.mul(flat_weight, flat_grad, out=keys).abs_().neg_()  # smallest |W * G| first
            keys.add_(inactive, alpha=EXCLUDED)
            keys[self.trainable] = EXCLUDED
            prune = _top(keys, self.num_prune)
        self.candidates, inverse = torch.cat([grow, prune, pruned.long()]).unique(return_inverse=True)
        flags = torch.zeros(self.candidates.numel(), dtype=torch.bool, device=grad.device)
        self.is_grow = flags.index_fill(0, inverse[: grow.numel()], True)
        self.is_prune = flags.index_fill(0, inverse[grow.numel() : grow.numel() + prune.numel()], True)
        self.weight_abs = flat_weight[self.candidates].float().abs()
        self.selected = True
        self._allocate()

    def add_micro_batch(
        self,
        trainable_grad: torch.Tensor,
        candidate_grad: torch.Tensor,
        column_sq: torch.Tensor | None = None,
        row_sq: torch.Tensor | None = None,
    ) -> None:
        """One micro-batch: the gradient at T (K,) and at the candidates (C,); its sums of squared inputs per
        column ``column_sq`` (in,) for Wanda and growth normalization, and of squared output gradients per row
        ``row_sq`` (out,) for ``growth_normalization="input_output"``."""
        if not (torch.isfinite(trainable_grad).all() and torch.isfinite(candidate_grad).all()):
            self.finite = False
            return
        self.step_sum += torch.cat([trainable_grad.float(), candidate_grad.float()])
        self.step_micro_batches += 1
        if column_sq is not None:
            self.step_column_sq = _add(self.step_column_sq, column_sq)
        if row_sq is not None:
            self.step_row_sq = _add(self.step_row_sq, row_sq)
        if not is_distributed():
            self._fold_squares()

    def _fold_squares(self) -> None:
        if self.step_column_sq is not None:
            self.column_sq_sums += self.step_column_sq
        if self.step_row_sq is not None:
            self.row_sq_sums += self.step_row_sq
        self.step_column_sq = self.step_row_sq = None

    def end_step(self, optimizer_grad: torch.Tensor | None, reduce: bool = False) -> None:
        """Fold the finished optimizer step into the window sums.

        ``optimizer_grad`` is the trainable values' gradient as the optimizer saw it (after accumulation, gradient
        clipping or loss-scale unscaling): the step's sums are rescaled by its norm over the norm of the accumulated
        gradient at T, so that every statistic is one of the optimizer-step gradient (clipping and unscaling are a
        single factor per step).

        ``reduce`` (under torch.distributed, every rank calls it at the same step): the step's sums become those of the
        global batch first: the mean of the ranks' gradients (DDP and FSDP average them), the sum of their squared
        inputs and output gradients (of the global mean loss), and the step is non-finite on every rank when it was
        on one."""
        if reduce:
            self._reduce_step()
        if not self.step_micro_batches:
            return
        step = self.step_sum
        raw_norm = step[: self.trainable.numel()].norm()
        if optimizer_grad is not None and raw_norm > 0:
            step = step * (optimizer_grad.detach().float().norm() / raw_norm)
        self.sums += step
        self.abs_sums += step.abs()
        self.sq_sums += step.pow(2)
        self.step_sum = torch.zeros_like(step)
        self.step_micro_batches = 0
        self.steps += 1

    def _reduce_step(self) -> None:
        dist = torch.distributed
        columns = _add(self.step_column_sq, torch.zeros_like(self.column_sq_sums))
        rows = _add(self.step_row_sq, torch.zeros_like(self.row_sq_sums))
        flags = torch.tensor([float(self.finite), float(self.step_micro_batches > 0)], device=columns.device)
        packed = torch.cat([self.step_sum, columns, rows, flags])
        dist.all_reduce(packed)
        world = dist.get_world_size()
        self.step_sum, self.step_column_sq, self.step_row_sq, _ = packed.split(
            [self.step_sum.numel(), columns.numel(), rows.numel(), 2]
        )
        # each rank's output gradients are those of its own mean loss: world times those of the global mean loss
        self.step_sum, self.step_row_sq = self.step_sum / world, self.step_row_sq / world**2
        self._fold_squares()
        finite, with_batches = packed[-2:].tolist()
        self.finite = finite == world
        self.step_micro_batches = self.step_micro_batches if self.step_micro_batches or not with_batches else 1

    # ---- statistics for the round ------------------------------------------------------------------------

    def _statistic(self, kind: str) -> torch.Tensor:
        if kind == "abs_sum":
            return self.sums.abs()
        if kind == "mean_abs":
            return self.abs_sums / max(self.steps, 1)
        if kind == "rms":
            return (self.sq_sums / max(self.steps, 1)).sqrt()
        if kind == "consistent":
            # (sum g)^2 - sum g^2 is the sum of g_i * g_j over pairs of different steps: its expectation is
            # n(n - 1) E[g]^2 when the steps are independent, so a spike in one step adds nothing and noise does
            # not favour the positions whose gradient varies most (what ranking by |sum g| does in short windows).
            return self.sums.pow(2) - self.sq_sums
        raise ValueError(f"Unknown window statistic {kind!r}; use 'abs_sum', 'mean_abs', 'rms' or 'consistent'.")

    def growth(self, kind: str) -> tuple[torch.Tensor, Candidates]:
        """Growth scores of T (K,) and of the growth candidates."""
        score = self._statistic(kind)
        if self.growth_normalization != "none":
            positions = torch.cat([self.trainable, self.candidates])
            in_features = self.column_sq_sums.numel()
            rows, columns = positions.div(in_features, rounding_mode="floor"), positions % in_features
            divisor = self._growth_divisor(self.column_sq_sums, self.row_sq_sums, rows, columns)
            # the 'consistent' statistic is in units of g^2: divide by the square to rank as |g| / divisor would
            score = score / divisor.pow(2 if kind == "consistent" else 1)
        k = self.trainable.numel()
        return score[:k], Candidates(self.candidates[self.is_grow], score[k:][self.is_grow])

    def _growth_divisor(
        self,
        column_sq: torch.Tensor | None,
        row_sq: torch.Tensor | None,
        rows: torch.Tensor,
        columns: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """||x_j|| (and ||e_i|| with "input_output") at ``rows`` and ``columns``, broadcast together (into ``out``
        when both are needed)."""
        if column_sq is None:
            raise ValueError("growth normalization needs the squared inputs per column (column_sq)")
        divisor = column_norms(column_sq)[columns]
        if self.growth_normalization == "input_output":
            if row_sq is None:
                raise ValueError("growth_normalization='input_output' needs the squared output gradients (row_sq)")
            divisor = torch.mul(divisor, column_norms(row_sq)[rows], out=out)
        return divisor

    def sensitivity(self, kind: str) -> Candidates:
        """The prune candidates with their sensitivity |W| * statistic (W is frozen there during the window)."""
        score = self._statistic(kind)[self.trainable.numel() :] * self.weight_abs
        return Candidates(self.candidates[self.is_prune], score[self.is_prune])

    def at(self, positions: torch.Tensor, kind: str) -> torch.Tensor:
        """The statistic at candidate ``positions`` (0 where a position is not a candidate)."""
        return self._lookup(positions, self._statistic(kind)[self.trainable.numel() :])

    def optimizer_seed(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and mean square of the optimizer-step gradient at candidate ``positions`` over the window."""
        k, steps = self.trainable.numel(), max(self.steps, 1)
        return (self._lookup(positions, self.sums[k:] / steps), self._lookup(positions, self.sq_sums[k:] / steps))

    def _lookup(self, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        positions = positions.long()
        if not self.candidates.numel():
            return torch.zeros(positions.numel(), device=positions.device)
        slot = torch.searchsorted(self.candidates, positions).clamp_max(self.candidates.numel() - 1)
        return torch.where(self.candidates[slot] == positions, values[slot], torch.zeros_like(values[slot]))

    # ---- checkpointing: a window open at save time is saved with the adapter and restored on load ----------

    _TENSORS = ("trainable", "candidates", "is_grow", "is_prune", "weight_abs", "column_sq_sums", "row_sq_sums")
    _SUMS = ("sums", "abs_sums", "sq_sums")  # checkpoints are taken between optimizer steps: step_sum is empty

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The window's statistics as plain tensors (all O(K) or O(in)), so that a run resumed from a checkpoint
        saved inside a window continues exactly."""
        meta = [self.steps, int(self.finite), int(self.selected), int(self.grow_pruned), self.num_grow, self.num_prune]
        state = {"meta": torch.tensor(meta, dtype=torch.int64)}
        state.update({name: getattr(self, name) for name in self._TENSORS + self._SUMS})
        return {key: value.detach().clone().contiguous() for key, value in state.items()}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], trainable: torch.Tensor, weight_numel: int, device: torch.device
    ) -> GradientWindow:
        """Rebuild a saved window; raises ValueError (what is wrong) when the entries do not describe a window of
        this layer: ``trainable`` its current positions T, ``weight_numel`` its weight size."""
        missing = sorted({"meta", *cls._TENSORS, *cls._SUMS} - set(state))
        if missing:
            raise ValueError(f"window entries {missing} are missing")
        meta = state["meta"]
        if meta.dtype != torch.int64 or meta.shape != (6,):
            raise ValueError("window entry 'meta' is not six int64 values")
        steps, finite, selected, grow_pruned, num_grow, num_prune = (int(v) for v in meta.tolist())
        if steps < 0 or min(num_grow, num_prune) < 0 or max(num_grow, num_prune) > weight_numel:
            raise ValueError(f"window entry 'meta' holds impossible values {meta.tolist()}")
        if not torch.equal(state["trainable"].long().cpu(), trainable.long().cpu()):
            raise ValueError("window entry 'trainable' differs from the adapter's trainable positions")
        candidates = state["candidates"]
        num = candidates.numel()
        if candidates.dtype != torch.int64 or candidates.dim() != 1 or num > num_grow + num_prune + trainable.numel():
            raise ValueError(f"window entry 'candidates' has dtype {candidates.dtype}, shape {tuple(candidates.shape)}")
        if num and (candidates.min() < 0 or candidates.max() >= weight_numel or (candidates.diff() <= 0).any()):
            raise ValueError("window entry 'candidates' is not sorted unique positions inside the weight")
        expected = {"is_grow": num, "is_prune": num, "weight_abs": num}
        expected.update({name: trainable.numel() + num for name in cls._SUMS})
        for name, size in expected.items():
            if state[name].shape != (size,):
                raise ValueError(f"window entry {name!r} has shape {tuple(state[name].shape)}, expected ({size},)")
        for name in ("weight_abs", "column_sq_sums", "row_sq_sums", *cls._SUMS):
            if not state[name].is_floating_point() or not torch.isfinite(state[name]).all():
                raise ValueError(f"window entry {name!r} is not a finite floating-point tensor")
        in_features, out_features = state["column_sq_sums"].numel(), state["row_sq_sums"].numel()
        if in_features * out_features != weight_numel:
            raise ValueError(f"window entries 'column_sq_sums' and 'row_sq_sums' do not fit a weight of {weight_numel}")
        window = cls(trainable.to(device), num_grow, num_prune, bool(grow_pruned), in_features, out_features)
        window.steps, window.finite, window.selected = steps, bool(finite), bool(selected)
        window.candidates = candidates.to(device)
        window._allocate()
        for name in ("is_grow", "is_prune"):
            setattr(window, name, state[name].to(device=device, dtype=torch.bool))
        for name in ("weight_abs", "column_sq_sums", "row_sq_sums", *cls._SUMS):
            setattr(window, name, state[name].to(device=device, dtype=torch.float32))
        return window


def column_norms(column_sq: torch.Tensor) -> torch.Tensor:
    """||x_j|| (or ||e_i||) from sums of squares, kept above zero: a column that never saw an input (a row that
    never had an output gradient) has a zero gradient, which stays zero."""
    return column_sq.sqrt().clamp_min(torch.finfo(column_sq.dtype).tiny)


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value if total is None else total + value


def _top(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the ``count`` largest keys, leaving out those that are EXCLUDED.

    Exact, but not by one ``torch.topk`` over the whole weight (slow on CPU for thousands of positions out of
    millions): a strided sample of about 8192 keys gives a threshold that about twice ``count`` keys pass, and the top
    is taken among those; when fewer pass, the plain top-k runs."""
    count = min(count, keys.numel())
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=keys.device)
    positions = None
    stride = keys.numel() // THRESHOLD_SAMPLE
    if stride >= 1 and 64 * count <= keys.numel():
        sample = keys[::stride]
        threshold = sample.topk(2 * count // stride + 16).values[-1]
        above = (keys >= threshold).nonzero().squeeze(1)
        if above.numel() >= count:
            positions = above[keys[above].topk(count, sorted=False).indices]
    if positions is None:
        positions = keys.topk(count, sorted=False).indices
    return positions[keys[positions] > EXCLUDED]
