"""SFTTrainer + SEFT under DDP on CPU, run by test_training_integration.py as
``torchrun --standalone --nproc_per_node 2 ddp_seft_train.py OUT_DIR [--seed-optimizer-state] [--nonfinite]``.

Every rank trains on its own shard of the data, and saves to ``OUT_DIR/rank<r>.pt``: its adapter state before
training, after the first round and at the end, effective weights, Adam state of the SEFT values, the rounds it ran,
and for every layer and round whether its own decision differed from rank 0's (the windows are reduced over ranks,
so it never should: the broadcast after each round is a guard).

``--nonfinite``: in the first window, rank 1 sees a non-finite gradient in layer NONFINITE_LAYERS[1] and rank 0 in
layer NONFINITE_LAYERS[0]; the reduced windows of both layers are non-finite on both ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from trl import SFTTrainer

import peft_seft.tuner.training as seft_training
from peft_seft import SEFTConfig, SEFTLayer
from peft_seft.testing import (
    adapter_snapshot,
    char_tokenizer,
    seft_layers,
    sft_args,
    text_dataset,
    tiny_pruned_llama,
)

MAX_STEPS, UPDATE_INTERVAL, SELECTION_STEPS = 12, 5, 2
NONFINITE_LAYERS = ("model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj")  # rank 0's, rank 1's


class SnapshotAfterFirstRound(TrainerCallback):
    def __init__(self) -> None:
        self.snapshot = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == UPDATE_INTERVAL:
            self.snapshot = adapter_snapshot(model)


def inject_nonfinite_gradients(model, rank: int) -> None:
    """This rank's window of one layer sees an inf gradient before the first round (the values' gradient is kept)."""
    target = seft_layers(model)[NONFINITE_LAYERS[rank]]
    collect = SEFTLayer._collect_gradient

    def collect_with_inf(self, adapter_names, grad_out, inputs, value_grads):
        if self is target and int(self.seft_step["default"]) < UPDATE_INTERVAL:
            grad_out = grad_out * float("inf")
            value_grads = [grad * float("inf") for grad in value_grads]
        return collect(self, adapter_names, grad_out, inputs, value_grads)

    SEFTLayer._collect_gradient = collect_with_inf


def main() -> None:
    out_dir = Path(sys.argv[1])
    seed_optimizer_state = "--seed-optimizer-state" in sys.argv[2:]
    nonfinite = "--nonfinite" in sys.argv[2:]
    torch.set_num_threads(1)

    local_decision_differs = []
    broadcast = seft_training._broadcast_adapter_state

    def recording_broadcast(layer, name):
        local = (layer.seft_indices[name].clone(), layer.seft_pruned[name].clone())
        replaced = broadcast(layer, name)
        same = torch.equal(local[0], layer.seft_indices[name]) and torch.equal(local[1], layer.seft_pruned[name])
        local_decision_differs.append(not same)
        return replaced

    seft_training._broadcast_adapter_state = recording_broadcast

    config = SEFTConfig(
        density=0.05,
        update_interval=UPDATE_INTERVAL,
        selection_steps=SELECTION_STEPS,
        random_seed=0,
        grown_optimizer_state="seed" if seed_optimizer_state else "zero",
    )
    trainer = SFTTrainer(
        model=tiny_pruned_llama(),
        args=sft_args(str(out_dir / "trainer"), max_steps=MAX_STEPS, per_device_train_batch_size=2, ddp_backend="gloo"),
        train_dataset=text_dataset(),
        processing_class=char_tokenizer(),
        peft_config=config,
        callbacks=[after_first_round := SnapshotAfterFirstRound()],
    )
    rank = trainer.args.process_index
    if nonfinite:
        inject_nonfinite_gradients(trainer.model, rank)
    initial = adapter_snapshot(trainer.model)
    trainer.train()

    assert dist.is_initialized(), "torchrun did not start a process group"
    assert rank == dist.get_rank()
    world_size = dist.get_world_size()
    wrapped = trainer.model_wrapped
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    layers = seft_layers(trainer.model)
    result = {
        "rank": rank,
        "world_size": world_size,
        "wrapper": type(wrapped).__name__,
        "global_step": trainer.state.global_step,
        "initial": initial,
        "after_first_round": after_first_round.snapshot,
        "snapshot": adapter_snapshot(trainer.model),
        "effective_weights": {name: layer.effective_weight().detach().clone() for name, layer in layers.items()},
        # What the forward actually uses: the base weight holds W in place.
        "in_place_weights": {name: layer.get_base_layer().weight.detach().clone() for name, layer in layers.items()},
        "optimizer_state": {
            name: {k: v.clone() for k, v in optimizer.state[layer.seft_values["default"]].items() if torch.is_tensor(v)}
            for name, layer in layers.items()
        },
        "reports": [
            {
                "step": r.step,
                "counts": vars(r.counts),
                "active": r.active,
                "budget": r.budget,
                "skipped_layers": r.skipped_layers,
            }
            for r in trainer.model.base_model.evolution.reports
        ],
        "local_decision_differs": local_decision_differs,
        "num_layers": len(layers),
    }
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
