"""The O(K) gradient window: exact running means for members, bounded capacity, exclusions."""

from __future__ import annotations

import torch

from peft_seft.window import GradientWindow, RunningCandidates


def test_running_candidates_keep_exact_means_of_members():
    top = RunningCandidates(capacity=3, largest=True, device=torch.device("cpu"))
    steps = [torch.tensor([5.0, 1.0, 4.0, 0.0, 3.0, 2.0]), torch.tensor([3.0, 0.0, 6.0, 0.0, 3.0, 9.0])]
    for scores in steps:
        top.update(scores.clone(), excluded=torch.tensor([False, False, False, True, False, False]))
    candidates = top.candidates()
    means = dict(zip(candidates.positions.tolist(), candidates.scores.tolist(), strict=True))
    assert len(means) == 3
    assert means[0] == 4.0 and means[2] == 5.0  # members since step 1: exact means over both steps
    assert means[5] == 9.0  # entered at step 2: mean over the step it was seen in
    signed, absolute = top.lookup(torch.tensor([2, 3]))
    assert absolute.tolist() == [5.0, 0.0]


def test_window_excludes_trainable_and_inactive_positions():
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 4.0]])
    window = GradientWindow(capacity=2, in_features=3, track_sensitivity=True, grow_pruned=False, device="cpu")
    grad = torch.tensor([[9.0, 8.0, 1.0], [7.0, 0.5, 0.1]])
    trainable = torch.tensor([0])
    pruned = torch.tensor([-1, -1])
    window.update(grad, torch.ones(4, 3), weight, trainable, pruned, torch.zeros(2))
    grow = window.grow.candidates().positions.tolist()
    assert 0 not in grow and 1 not in grow and 3 not in grow  # trainable, and zero weights without grow_pruned
    prune = window.prune.candidates()
    assert set(prune.positions.tolist()) <= {2, 4, 5} and prune.scores.min() == 0.4  # |W*G| = 2, 1.5, 0.4
    assert window.column_sq_sums.tolist() == [4.0, 4.0, 4.0]


def test_non_finite_gradients_poison_the_window():
    window = GradientWindow(capacity=2, in_features=2, track_sensitivity=True, grow_pruned=True, device="cpu")
    grad = torch.tensor([[float("nan"), 1.0], [1.0, 1.0]])
    window.update(grad, torch.ones(1, 2), torch.ones(2, 2), torch.tensor([0]), torch.tensor([-1, -1]), torch.zeros(2))
    assert not window.finite and window.steps == 0
