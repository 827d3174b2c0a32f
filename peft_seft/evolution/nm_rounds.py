"""One SEFT evolution round for one layer under an N:M pattern, as a plain tensor function.

Groups are M consecutive weights along the input dimension of the logical (out, in) weight: flat position
``p`` lies in group ``(p // in) * (in // M) + (p % in) // M``. The round keeps, in every group ``g``, the number
of structurally active positions ``|((nonzero(W0) \\ P) | T) & g|`` equal to that of the base, so a base that is
N:M stays N:M after every round, and the layer's count stays exactly ``nnz(W0)``. Equivalently, per group,
``|P & g| == |T & zero(W0) & g|``.

A round (``d`` = number of drops):

1. drop the ``d`` trainable entries with the smallest |delta| (as :func:`~peft_seft.evolution.evolve`);
2. grow the ``d`` best candidates (not in T) by accumulated |grad|. An *active* candidate (a frozen non-zero
   weight) costs nothing. An *inactive* candidate (zero in W0, or in P) of group ``g`` needs a partner in ``g``,
   taken in this order:

   a. a dropped position of ``g`` that is zero in W0 (it deactivates anyway);
   b. a frozen active weight of ``g`` (non-zero, not in T, not in P, not grown in this round), pruned into P,
      least important first;
   c. a dropped trainable position of ``g`` that is non-zero in W0, pruned into P instead of returning to its
      frozen value (when every active weight of the group is trainable, the least important trainable ones,
      the dropped ones, pay), smallest |delta| first.

   Inactive growths per group are capped by the partners available there: inactive candidates are ranked
   within their group and kept while their rank is below the cap, then the top ``d`` of those and of all active
   candidates are taken. Active growths use up frozen partners of their group, so the caps are lowered and the
   choice repeated until it is consistent (caps and ``d`` only ever decrease, so this ends);
3. dropped zero-in-W0 positions of ``g`` that did not serve as partners each restore one position of P in the
   same group (largest restore score first); ``|P & g| == |T & zero(W0) & g|`` before the round guarantees
   there are enough.

Importance of frozen partners (lower = pruned first): the caller passes ``prune`` candidates with scores (the
sensitivity window only holds the K globally least sensitive frozen weights) and they come first, smallest score
first; every other frozen active weight of the group follows, ranked by ``|W|`` times ``column_scale`` of its
input column (``None`` = magnitude; the Wanda column norms give the Wanda criterion, computed directly).
"""

from __future__ import annotations

import torch

from .rounds import Candidates, RoundCounts, RoundResult, drop_order, replace_slots


def nm_group_of(positions: torch.Tensor, in_features: int, m: int) -> torch.Tensor:
    """The N:M group of each flat position of an (out, in) weight (groups of ``m`` consecutive input weights)."""
    positions = positions.long()
    return (positions // in_features) * (in_features // m) + (positions % in_features) // m


def nm_group_positions(groups: torch.Tensor, in_features: int, m: int) -> torch.Tensor:
    """(len(groups), m): the flat positions of each group."""
    groups = groups.long()
    per_row = in_features // m
    starts = (groups // per_row) * in_features + (groups % per_row) * m
    return starts[:, None] + torch.arange(m, device=groups.device)


def rank_within_groups(groups: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of every item within its group among the items ``priority`` lists, best first; items it
    does not list get rank ``len(groups)``."""
    order = priority[torch.argsort(groups[priority], stable=True)]
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.full_like(groups, groups.numel(), dtype=torch.long)
    ranks[order] = torch.arange(order.numel(), device=groups.device) - starts.repeat_interleave(counts)
    return ranks


def evolve_nm(
    indices: torch.Tensor,
    drop_keys: torch.Tensor,
    pruned: torch.Tensor,
    zero_in_base: torch.Tensor,
    weight: torch.Tensor,
    in_features: int,
    m: int,
    grow: Candidates,
    prune: Candidates,
    restore_scores: torch.Tensor,
    num_drop: int,
    grow_pruned: bool = True,
    column_scale: torch.Tensor | None = None,
    trainable_scores: torch.Tensor | None = None,
) -> RoundResult:
    """One N:M round (see the module docstring).

    ``indices`` (K,): T; ``drop_keys`` (K,): the smallest are dropped first (|delta|, or a window score);
    ``pruned``: P; ``zero_in_base`` (K,): W0 is zero at each position of T; ``weight``: the flat effective weight
    W of this adapter (W0 with P zeroed plus delta at T), read at round time only; ``grow``: growth candidates by
    score; ``prune``: preferred frozen partners with their scores (e.g. the sensitivity window, may be empty);
    ``restore_scores`` aligned with ``pruned``; ``grow_pruned=False`` restricts growth to active weights (the
    frozen-topology N:M mode)."""
    device = weight.device
    indices, pruned = indices.long(), pruned.long()
    zero_in_base = zero_in_base.bool()

    def group_of(positions: torch.Tensor) -> torch.Tensor:
        return nm_group_of(positions, in_features, m)

    eligible = ~torch.isin(grow.positions, indices)
    grow_positions, grow_scores = grow.positions[eligible].long(), grow.scores[eligible].float()
    grow_inactive = weight[grow_positions] == 0
    if not grow_pruned:
        keep = ~grow_inactive
        grow_positions, grow_scores, grow_inactive = grow_positions[keep], grow_scores[keep], grow_inactive[keep]

    # Frozen active weights of every group an inactive candidate could be grown in.
    partner_groups = group_of(grow_positions[grow_inactive]).unique()
    frozen = nm_group_positions(partner_groups, in_features, m).reshape(-1)
    frozen = frozen[(weight[frozen] != 0) & ~torch.isin(frozen, indices)]

    # Compact ids 0..G-1 for the G groups that matter in this round, and per-group counts over them.
    universe = torch.cat([group_of(grow_positions), group_of(indices), group_of(pruned), partner_groups]).unique()

    def compact(positions: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(universe, group_of(positions))

    def count(ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.bincount(ids if mask is None else ids[mask], minlength=universe.numel())

    candidate_group, frozen_group = compact(grow_positions), compact(frozen)
    frozen_count = count(frozen_group)
    frozen_budget = frozen_count.clone()
    trainable_group = compact(indices)

    slots_in_order, num_drop = drop_order(drop_keys, num_drop, trainable_scores, grow_scores)
    num_changes = min(num_drop, grow_positions.numel(), indices.numel())
    inactive_order = torch.argsort(grow_scores, descending=True, stable=True)
    inactive_order = inactive_order[grow_inactive[inactive_order]]
    inactive_rank = rank_within_groups(candidate_group, inactive_order)
    while True:
        drop_slots = slots_in_order[:num_changes]
        dropped_zero = count(trainable_group[drop_slots], zero_in_base[drop_slots])
        dropped_nonzero = count(trainable_group[drop_slots], ~zero_in_base[drop_slots])
        cap = dropped_zero + frozen_budget + dropped_nonzero
        allowed = ~grow_inactive | (inactive_rank < cap[candidate_group])
        allowed_idx = allowed.nonzero().squeeze(1)
        best = torch.argsort(grow_scores[allowed_idx], descending=True, stable=True)[:num_changes]
        chosen = allowed_idx[best]
        active_chosen = count(candidate_group[chosen], ~grow_inactive[chosen])
        # Frozen weights left to prune after the active growths (exact in the groups of inactive candidates, the
        # only groups where it matters; elsewhere frozen weights were not enumerated).
        frozen_left = (frozen_count - active_chosen).clamp_min(0)
        need = count(candidate_group[chosen], grow_inactive[chosen])
        short = need > dropped_zero + frozen_left + dropped_nonzero
        if short.any():
            frozen_budget[short] = torch.minimum(frozen_budget[short], frozen_left[short])
        elif chosen.numel() < num_changes:
            num_changes = chosen.numel()
        else:
            break

    grown = grow_positions[chosen]
    grown_inactive = grow_inactive[chosen]
    new_indices, changed = replace_slots(indices, drop_slots, grown)

    use_zero = torch.minimum(need, dropped_zero)
    use_frozen = torch.minimum(need - use_zero, frozen_left)
    use_nonzero = need - use_zero - use_frozen

    # (b) frozen partners: the preferred candidates first (smallest score), then the rest by |W| * column_scale.
    frozen = frozen[~torch.isin(frozen, grown)]
    frozen_group = compact(frozen)
    member = torch.isin(frozen, prune.positions.long())
    preferred_score = torch.zeros(frozen.numel(), device=device)
    if member.any():
        order = torch.argsort(prune.positions.long())
        sorted_positions = prune.positions.long()[order]
        slot = torch.searchsorted(sorted_positions, frozen[member])
        preferred_score[member] = prune.scores.float()[order][slot]
    fallback_score = weight[frozen].abs().float()
    if column_scale is not None:
        fallback_score = fallback_score * column_scale.float()[frozen % in_features]
    score = torch.where(member, preferred_score, fallback_score)
    priority = torch.argsort(score, stable=True)
    priority = priority[torch.argsort((~member[priority]).long(), stable=True)]
    frozen_partners = frozen[rank_within_groups(frozen_group, priority) < use_frozen[frozen_group]]

    # (c) dropped trainable positions that are non-zero in W0, smallest |delta| first (drop order).
    nonzero_slots = drop_slots[~zero_in_base[drop_slots]]
    nonzero_groups = trainable_group[nonzero_slots]
    order = torch.arange(nonzero_slots.numel(), device=device)
    taken = rank_within_groups(nonzero_groups, order) < use_nonzero[nonzero_groups]
    dropped_partners = indices[nonzero_slots[taken]]

    # Restores: dropped zero-in-W0 positions that paid for nothing, each brings back one position of P (same group).
    remaining = ~torch.isin(pruned, grown)
    pruned, restore_scores = pruned[remaining], restore_scores[remaining].float()
    restore = dropped_zero - use_zero
    pruned_group = compact(pruned)
    priority = torch.argsort(restore_scores, descending=True, stable=True)
    restored_mask = rank_within_groups(pruned_group, priority) < restore[pruned_group]
    pruned = torch.cat([pruned[~restored_mask], frozen_partners, dropped_partners])

    counts = RoundCounts(
        dropped=num_changes,
        grown=num_changes,
        reactivated=int(grown_inactive.sum()),
        repruned=frozen_partners.numel() + dropped_partners.numel(),
        restored=int(restored_mask.sum()),
    )
    return RoundResult(new_indices, pruned.sort().values, changed, counts)
