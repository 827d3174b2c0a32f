"""One SEFT evolution round for one layer, as plain tensor functions (no model needed).

Positions are flat indices into the layer's logical (out, in) weight. A round:

1. drop the ``d`` trainable entries with the smallest |delta| (or the smallest window growth score, the "gradient"
   drop criterion); a dropped entry whose own growth score ranks among the ``d`` best of the dropped entries and the
   growth candidates is re-grown at once: it keeps its slot and value (as in SpIEL), and the round changes one
   position fewer;
2. grow candidates (not trainable now) with the largest window score into the dropped slots;
3. keep the layer's structurally active count at N: with ``v`` grown positions that were inactive (zero in
   W0 or pruned by SEFT) and ``u`` dropped positions that were zero in W0, prune ``v - u`` frozen active
   weights with the smallest score into P, or restore ``u - v`` positions of P with the largest score.

Grown positions that were in P leave P (their frozen value returns and delta starts at 0), so T and P
never overlap and ``|P| == |{t in T : W0[t] == 0}|`` after every round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Candidates:
    """Positions with a score, e.g. growth candidates by accumulated |grad| or prune candidates by sensitivity."""

    positions: torch.Tensor
    scores: torch.Tensor

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> Candidates:
        return cls(torch.empty(0, dtype=torch.long, device=device), torch.empty(0, device=device))


@dataclass
class RoundCounts:
    dropped: int = 0
    grown: int = 0
    reactivated: int = 0
    repruned: int = 0
    restored: int = 0

    def __add__(self, other: RoundCounts) -> RoundCounts:
        return RoundCounts(*(a + b for a, b in zip(vars(self).values(), vars(other).values(), strict=True)))


@dataclass
class RoundResult:
    indices: torch.Tensor  # (K,) new trainable positions; unchanged slots keep their position
    pruned: torch.Tensor  # the new set P (variable length)
    changed_slots: torch.Tensor  # (K,) bool: slots whose position changed (their value is reset to 0)
    counts: RoundCounts


def drop_count(num_trainable: int, drop_rate: float) -> int:
    return int(drop_rate * num_trainable)


def drop_order(
    drop_keys: torch.Tensor, num_drop: int, trainable_scores: torch.Tensor | None, candidate_scores: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Slots in the order they are dropped, and how many are dropped.

    The ``num_drop`` entries with the smallest ``drop_keys`` (K: |delta|, or a window score) are due; those whose
    growth score (``trainable_scores``, K) ranks among the ``num_drop`` best of theirs and the ``candidate_scores`` of
    the eligible growth candidates are re-grown at once and move to the end of the order (ties favour keeping).
    ``trainable_scores=None`` keeps none.
    """
    order = torch.argsort(drop_keys.detach(), stable=True)
    if trainable_scores is None or num_drop <= 0:
        return order, num_drop
    due = order[:num_drop]
    pool = torch.cat([trainable_scores[due].float(), candidate_scores.float()])
    best = torch.argsort(pool, descending=True, stable=True)[:num_drop]
    kept = torch.zeros(due.numel(), dtype=torch.bool, device=due.device)
    kept[best[best < due.numel()]] = True
    return torch.cat([due[~kept], order[num_drop:], due[kept]]), int((~kept).sum())


def evolve(
    indices: torch.Tensor,
    drop_keys: torch.Tensor,
    pruned: torch.Tensor,
    zero_in_base: torch.Tensor,
    grow: Candidates,
    grow_inactive: torch.Tensor,
    prune: Candidates,
    restore_scores: torch.Tensor,
    num_drop: int,
    grow_pruned: bool = True,
    trainable_scores: torch.Tensor | None = None,
) -> RoundResult:
    """One round. ``drop_keys`` (K,): the entries with the smallest keys are dropped first (see
    :func:`drop_order`). ``zero_in_base`` (K,): W0 is zero at each trainable position. ``grow_inactive``: each growth
    candidate is structurally inactive (zero in W0 or in P). ``prune`` candidates are frozen active weights
    (non-zero, not trainable, not in P). ``restore_scores`` are aligned with ``pruned``. ``trainable_scores`` (K,):
    the growth scores of T, so that a dropped entry can be re-grown with its value (see :func:`drop_order`)."""
    indices, pruned = indices.long(), pruned.long()
    eligible = ~torch.isin(grow.positions, indices)
    if not grow_pruned:
        eligible &= ~grow_inactive
    grow_positions, grow_scores, grow_inactive = (
        grow.positions[eligible],
        grow.scores[eligible],
        grow_inactive[eligible],
    )
    slots_in_order, num_drop = drop_order(drop_keys, num_drop, trainable_scores, grow_scores)
    num_changes = min(num_drop, grow_positions.numel(), indices.numel())
    prune_budget = prune.positions.numel()
    while True:
        drop_slots = slots_in_order[:num_changes]
        reactivated_dropped = int(zero_in_base[drop_slots].sum())
        # Each inactive growth beyond the re-activated drops must be paid for by pruning a frozen weight.
        chosen = _top_with_cap(grow_scores, grow_inactive, num_changes, reactivated_dropped + prune_budget)
        grown = grow_positions[chosen]
        prunable = int((~torch.isin(prune.positions, grown)).sum())
        if int(grow_inactive[chosen].sum()) - reactivated_dropped > prunable:
            prune_budget = prunable
        elif chosen.numel() < num_changes:
            num_changes = chosen.numel()
        else:
            break
    grown_inactive = grow_inactive[chosen]
    new_indices, changed = replace_slots(indices, drop_slots, grown)

    remaining_pruned = ~torch.isin(pruned, grown)
    pruned, restore_scores = pruned[remaining_pruned], restore_scores[remaining_pruned]
    balance = int(grown_inactive.sum()) - reactivated_dropped
    repruned = restored = 0
    if balance > 0:
        allowed = ~torch.isin(prune.positions, grown)
        order = torch.argsort(prune.scores[allowed], stable=True)[:balance]
        pruned = torch.cat([pruned, prune.positions[allowed][order]])
        repruned = order.numel()
    elif balance < 0:
        restored = -balance
        order = torch.argsort(restore_scores, descending=True, stable=True)
        pruned = pruned[order[restored:]]
    counts = RoundCounts(
        dropped=num_changes,
        grown=num_changes,
        reactivated=int(grown_inactive.sum()),
        repruned=repruned,
        restored=restored,
    )
    return RoundResult(new_indices, pruned.sort().values, changed, counts)


def replace_slots(
    indices: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``indices`` with ``positions`` in ``slots``, and the (K,) mask of those slots.

    Both go in ascending order, so that the result depends on which slots and positions were chosen, not on how
    near-equal scores ordered them: ranks that sum the same gradients in another order then still agree."""
    new_indices = indices.clone()
    new_indices[slots.sort().values] = positions.sort().values
    changed = torch.zeros_like(indices, dtype=torch.bool)
    changed[slots] = True
    return new_indices, changed


def _top_with_cap(scores: torch.Tensor, capped: torch.Tensor, count: int, cap: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores with at most ``cap`` of them where ``capped`` is True."""
    order = torch.argsort(scores, descending=True, stable=True)
    capped_order, free_order = order[capped[order]], order[~capped[order]]
    take_capped = min(cap, capped_order.numel())
    best = torch.cat([capped_order[:take_capped], free_order])
    best = best[torch.argsort(scores[best], descending=True, stable=True)]
    return best[:count]


def structural_active_count(base_nonzero: torch.Tensor, indices: torch.Tensor, pruned: torch.Tensor) -> int:
    """|(nonzero(W0) minus P) union T| for a flat boolean ``base_nonzero`` mask."""
    active = base_nonzero.clone()
    active[pruned.long()] = False
    active[indices.long()] = True
    return int(active.sum())


def drop_rate(
    step: int, total_steps: int, initial_rate: float, schedule: str, full_first_round_at: int | None = None
) -> float:
    """The drop rate of a round after ``step`` optimizer steps: decays from ``initial_rate`` to 0 at ``total_steps``.

    ``full_first_round_at``: the step of the first round when it re-selects everything (rate 1.0).
    """
    if step >= total_steps:
        return 0.0
    if full_first_round_at is not None and step == full_first_round_at:
        return 1.0
    progress = step / total_steps
    if schedule == "cosine":
        return initial_rate * 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * progress)).item())
    if schedule == "linear":
        return initial_rate * (1.0 - progress)
    raise ValueError(f"Unknown drop schedule {schedule!r}; use 'cosine' or 'linear'.")
