"""Gradient statistics of one layer over the selection window, in O(K) memory.

Each backward inside the window hands over the dense weight gradient G of one layer (it is freed right
after). It is reduced at once to running candidate sets of fixed capacity:

- growth: the positions outside T with the largest mean |G| (and their mean signed G, to seed Adam);
- pruning: the frozen active positions with the smallest mean sensitivity |W * G|;
- restoring: the mean |W0 * G| at the positions of P (P is fixed during a window);
- Wanda: the per-input-column sum of squared inputs (size ``in``).

A candidate's mean is exact over the window steps since it entered the set; newcomers are ranked by
their mean over the steps they were seen in. Nothing weight-sized survives between steps.
"""

from __future__ import annotations

import torch

from .evolution import Candidates


class RunningCandidates:
    """A fixed-capacity set of positions with running sums, keeping the largest (or smallest) means."""

    def __init__(self, capacity: int, largest: bool, device: torch.device) -> None:
        self.capacity, self.largest = capacity, largest
        self.positions = torch.empty(0, dtype=torch.long, device=device)
        self.sums = torch.empty(0, device=device)
        self.signed_sums = torch.empty(0, device=device)
        self.counts = torch.empty(0, device=device)

    def update(self, scores: torch.Tensor, excluded: torch.Tensor, signed: torch.Tensor | None = None) -> None:
        """Add one step. ``scores`` is a flat fp32 tensor this call may overwrite; ``excluded`` a flat bool mask."""
        self.sums += scores[self.positions]
        self.counts += 1
        if signed is not None:
            self.signed_sums += signed[self.positions]
        blocked = float("-inf") if self.largest else float("inf")
        scores.masked_fill_(excluded, blocked)
        scores[self.positions] = blocked
        k = min(self.capacity, scores.numel())
        new_scores, new_positions = torch.topk(scores, k, largest=self.largest, sorted=False)
        keep = torch.isfinite(new_scores)
        new_positions, new_scores = new_positions[keep], new_scores[keep]
        new_signed = signed[new_positions] if signed is not None else torch.zeros_like(new_scores)
        positions = torch.cat([self.positions, new_positions])
        sums = torch.cat([self.sums, new_scores])
        signed_sums = torch.cat([self.signed_sums, new_signed])
        counts = torch.cat([self.counts, torch.ones_like(new_scores)])
        order = torch.argsort(sums / counts, descending=self.largest, stable=True)[: self.capacity]
        self.positions, self.sums, self.signed_sums, self.counts = (
            positions[order],
            sums[order],
            signed_sums[order],
            counts[order],
        )

    def candidates(self) -> Candidates:
        return Candidates(self.positions, self.sums / self.counts.clamp_min(1))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean signed and mean absolute score at ``positions`` (0 where a position is not a member)."""
        zeros = torch.zeros(positions.numel(), device=positions.device)
        if self.positions.numel() == 0:
            return zeros, zeros.clone()
        order = torch.argsort(self.positions)
        members = self.positions[order]
        slot = torch.searchsorted(members, positions).clamp_max(members.numel() - 1)
        found = members[slot] == positions
        counts = self.counts[order][slot]
        mean_signed = torch.where(found, self.signed_sums[order][slot] / counts, zeros)
        mean_abs = torch.where(found, self.sums[order][slot] / counts, zeros)
        return mean_signed, mean_abs


class GradientWindow:
    """What one adapter of one layer remembers of the gradients in the current selection window."""

    def __init__(
        self, capacity: int, in_features: int, track_sensitivity: bool, grow_pruned: bool, device: torch.device
    ) -> None:
        self.grow_pruned = grow_pruned
        self.grow = RunningCandidates(capacity, largest=True, device=device)
        self.prune = RunningCandidates(capacity, largest=False, device=device) if track_sensitivity else None
        self.restore_sums = torch.zeros(capacity, device=device)
        self.column_sq_sums = torch.zeros(in_features, device=device)
        self.steps = 0
        self.finite = True

    def update(
        self,
        grad: torch.Tensor,
        inputs: torch.Tensor,
        weight: torch.Tensor,
        trainable: torch.Tensor,
        pruned_slots: torch.Tensor,
        base_at_pruned: torch.Tensor,
    ) -> None:
        """``grad`` and ``weight`` (out, in), the effective weight; ``inputs`` (N, in); ``trainable`` the
        positions of T; ``pruned_slots`` the P buffer (-1 = empty) and ``base_at_pruned`` W0 there."""
        if not torch.isfinite(grad).all():
            self.finite = False
            return
        self.steps += 1
        flat_grad = grad.reshape(-1)
        flat_weight = weight.reshape(-1)
        inactive = flat_weight == 0
        in_trainable = torch.zeros_like(inactive)
        in_trainable[trainable.long()] = True

        used = pruned_slots >= 0
        self.restore_sums[used] += (base_at_pruned[used].float() * flat_grad[pruned_slots[used].long()]).abs()
        self.column_sq_sums += inputs.float().pow(2).sum(0)
        if self.prune is not None:
            sensitivity = (flat_weight.float() * flat_grad).abs_()
            self.prune.update(sensitivity, inactive | in_trainable)
        grow_excluded = in_trainable if self.grow_pruned else in_trainable | inactive
        self.grow.update(flat_grad.abs(), grow_excluded, signed=flat_grad)

    # ---- checkpointing: a window open at save time is saved with the adapter and restored on load ----------

    _CANDIDATE_FIELDS = ("positions", "sums", "signed_sums", "counts")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The window's statistics as plain tensors (all O(K) or O(in)), so that a run resumed from a checkpoint
        saved inside a window continues exactly."""
        meta = [self.steps, int(self.finite), int(self.prune is not None), int(self.grow_pruned), self.grow.capacity]
        state = {
            "meta": torch.tensor(meta, dtype=torch.int64),
            "restore_sums": self.restore_sums,
            "column_sq_sums": self.column_sq_sums,
        }
        for prefix, candidates in (("grow", self.grow), ("prune", self.prune)):
            if candidates is not None:
                state.update({f"{prefix}_{field}": getattr(candidates, field) for field in self._CANDIDATE_FIELDS})
        return {key: value.detach().clone().contiguous() for key, value in state.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: torch.device) -> GradientWindow:
        steps, finite, track_sensitivity, grow_pruned, capacity = (int(v) for v in state["meta"].tolist())
        in_features = state["column_sq_sums"].numel()
        window = cls(capacity, in_features, bool(track_sensitivity), bool(grow_pruned), device)
        window.steps, window.finite = steps, bool(finite)
        window.restore_sums = state["restore_sums"].to(device=device, dtype=torch.float32)
        window.column_sq_sums = state["column_sq_sums"].to(device=device, dtype=torch.float32)
        for prefix, candidates in (("grow", window.grow), ("prune", window.prune)):
            if candidates is not None:
                for field in cls._CANDIDATE_FIELDS:
                    value = state[f"{prefix}_{field}"].to(device)
                    setattr(candidates, field, value.long() if field == "positions" else value.float())
        return window
