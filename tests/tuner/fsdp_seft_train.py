"""SEFT under FSDP2 and DDP against one process on the full batch, run by test_distributed.py as
``torchrun --standalone --nproc_per_node 2 fsdp_seft_train.py OUT_DIR``.

A plain PyTorch loop on the tiny pruned Llama: STEPS optimizer steps of ACCUMULATION micro-batches each, every
micro-batch GLOBAL_BATCH sequences of equal length (so the mean of the ranks' mean losses is the global mean loss);
rounds at steps 4 and 8 with windows of 3 steps. Rank r trains on rows [r * B / 2, (r + 1) * B / 2) of each
micro-batch. Before the process group exists, rank 0 runs the single-process reference on the full batches.

Variants, in this order in one launch: FSDP2 with reshard_after_forward True and False (each decoder block, then the
root), DDP, FSDP2 with SEEDED options and gradient clipping (against its own reference), FSDP2 where rank 1's first
round is made to decide otherwise (the guard must restore rank 0's decision), FSDP1, which must fail at its first
forward, and get_peft_model on an already sharded base, which must fail. With one process: FSDP2 only. The first
FSDP2 run also saves its adapter at the end and, mid-window at step RESUME_AT, its adapter and optimizer state; a
fresh model then resumes from them and trains to the end. Everything is written to ``OUT_DIR/results.pt`` by rank 0
(adapters in OUT_DIR/<variant>/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model

from peft_seft import SEFTConfig
from peft_seft.testing import seft_layers, tiny_pruned_llama, token_batch
from peft_seft.utils.distributed import full_tensor

STEPS, ACCUMULATION, GLOBAL_BATCH, SEQ_LEN = 10, 2, 4, 24
RESUME_AT = 6  # inside the window of the round at step 8 (steps 6-8)


# The seeded variant: Adam moments of grown slots seeded from the window, Wanda re-pruning (squared inputs summed over
# ranks, the whole weight gathered for the round), growth per unit of input and output gradient (both squares reduced
# over ranks), and gradient clipping (the window's sums rescaled by the factor); the FSDP2 run also uses activation
# checkpointing (the reference does not).
SEEDED = {"grown_optimizer_state": "seed", "prune_criterion": "wanda", "growth_normalization": "input_output"}
CLIP = 0.05


def seft_config(**overrides) -> SEFTConfig:
    kwargs = {"density": 0.05, "update_interval": 4, "selection_steps": 3, "random_seed": 0, "total_steps": STEPS}
    return SEFTConfig(**{**kwargs, **overrides})


def batches(step: int) -> list[torch.Tensor]:
    return [token_batch(GLOBAL_BATCH, SEQ_LEN, seed=100 * step + i) for i in range(ACCUMULATION)]


def snapshot(model) -> dict:
    """Positions, pruned set, values (gathered), step, and the effective weights' non-zeros, per layer (every rank
    must call it under FSDP2: the values and weights are gathered)."""
    result = {}
    for name, layer in seft_layers(model).items():
        weight = layer.effective_weight()
        result[name] = {
            "indices": layer.seft_indices["default"].clone(),
            "pruned": layer.seft_pruned["default"].clone(),
            "values": full_tensor(layer.seft_values["default"]).detach().clone(),
            "step": int(layer.seft_step["default"]),
            "nonzeros": int(torch.count_nonzero(weight)),
        }
    return result


def value_grads(model) -> dict:
    return {
        name: full_tensor(layer.seft_values["default"].grad).detach().clone()
        for name, layer in seft_layers(model).items()
    }


def train(
    model, optimizer, first_step: int, last_step: int, rows: slice, on_step=None, peft_model=None, clip=None
) -> dict:
    """Train; returns the loss of each step (of the global batch) and the values' gradients of step 1."""
    losses, grads = [], None
    for step in range(first_step, last_step + 1):
        total = 0.0
        for micro_batch in batches(step):
            ids = micro_batch[rows]
            loss = model(input_ids=ids, labels=ids).loss / ACCUMULATION
            loss.backward()
            total += float(loss.detach())
        if dist.is_initialized():
            total = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(total)
            total = float(total) / dist.get_world_size()
        if step == 1:
            grads = value_grads(peft_model or model)
        if clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            assert float(full_tensor(norm)) > clip  # it does clip
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
        if on_step is not None:
            on_step(step)
    return {"losses": losses, "grads": grads}


def optimizer_of(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def reference(out_dir: Path, seeded: bool = False) -> dict:
    model = get_peft_model(tiny_pruned_llama(), seft_config(**(SEEDED if seeded else {})))
    result = train(model, optimizer_of(model), 1, STEPS, slice(None), clip=CLIP if seeded else None)
    result["snapshot"] = snapshot(model)
    result["rounds"] = [(r.step, vars(r.counts)) for r in model.base_model.evolution.reports]
    if not seeded:
        model.save_pretrained(str(out_dir / "reference"))
    return result


def shard(model, reshard_after_forward: bool):
    for block in model.base_model.model.model.layers:
        shard_module(block, reshard_after_forward)
    shard_module(model, reshard_after_forward)
    return model


def distributed_run(variant: str, out_dir: Path, rows: slice) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    seeded = variant == "fsdp_seeded"
    model = get_peft_model(tiny_pruned_llama(), seft_config(**(SEEDED if seeded else {})))
    if seeded:  # and activation checkpointing: recomputed forwards write W again, the window sees one backward
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    if variant == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        wrapped = shard(model, reshard_after_forward=variant != "fsdp_keep")
    optimizer = optimizer_of(wrapped)
    saving = variant == "fsdp_reshard"
    replaced = perturb_rank1_first_round(model) if variant == "fsdp_guard" else None

    def save_mid_window(step: int) -> None:
        if saving and step == RESUME_AT:
            model.save_pretrained(str(out_dir / "resume"), is_main_process=dist.get_rank() == 0)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_optimizer_state_dict(model, optimizer, options=options)
            if dist.get_rank() == 0:
                torch.save(state, out_dir / "resume" / "optimizer.pt")
            dist.barrier()

    clip = CLIP if seeded else None
    result = train(wrapped, optimizer, 1, STEPS, rows, save_mid_window, peft_model=model, clip=clip)
    result["snapshot"] = snapshot(model)
    result["rounds"] = [(r.step, vars(r.counts)) for r in model.base_model.evolution.reports]
    result["wrapper"] = type(wrapped).__name__
    if replaced is not None:  # how often each rank took rank 0's positions
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, replaced[0])
        result["guard_replacements"] = counts
    result["base_weight_type"] = type(seft_layers(model)["model.layers.0.self_attn.q_proj"].base_layer.weight).__name__
    if saving:
        model.save_pretrained(str(out_dir / variant), is_main_process=dist.get_rank() == 0)
        dist.barrier()
        result["resumed"] = resume(out_dir / "resume", rows)
    elif variant == "fsdp_keep":
        # As the Trainer saves with FULL_STATE_DICT: a state dict gathered on every rank, then rank 0 saves alone.
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            model.save_pretrained(str(out_dir / variant), state_dict=state)
        dist.barrier()
    return result


def perturb_rank1_first_round(model) -> list[int]:
    """On rank 1, the first round of one layer sees permuted window sums, so its own decision differs from rank 0's:
    the guard after the round must give it rank 0's positions (and values). Returns a counter of replacements."""
    import peft_seft.tuner.training as seft_training

    layer = seft_layers(model)["model.layers.0.mlp.up_proj"]
    original_evolve, original_guard = layer.evolve_adapter, seft_training._broadcast_adapter_state
    replaced = [0]

    def evolve(name, rate, config):
        window = layer._windows.get(name)
        if dist.get_rank() == 1 and window is not None and int(layer.seft_step[name]) == 4:
            window.sums.copy_(window.sums.flip(0))
        return original_evolve(name, rate, config)

    def guard(guarded_layer, name):
        took = original_guard(guarded_layer, name)
        replaced[0] += int(took)
        return took

    layer.evolve_adapter = evolve
    seft_training._broadcast_adapter_state = guard
    return replaced


def resume(checkpoint: Path, rows: slice) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    model = PeftModel.from_pretrained(tiny_pruned_llama(), str(checkpoint), is_trainable=True)
    model.peft_config["default"].total_steps = STEPS
    shard(model, reshard_after_forward=True)
    optimizer = optimizer_of(model)
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    result = train(model, optimizer, RESUME_AT + 1, STEPS, rows)
    result["snapshot"] = snapshot(model)
    result["rounds"] = [(r.step, vars(r.counts)) for r in model.base_model.evolution.reports]
    return result


def fsdp1_error(rows: slice) -> str:
    """FSDP1 (FullyShardedDataParallel) must fail at the first forward with a message naming FSDP2."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = get_peft_model(tiny_pruned_llama(), seft_config())  # PEFT models need use_orig_params=True under FSDP1
    model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    ids = batches(1)[0][rows]
    try:
        model(input_ids=ids, labels=ids)
    except RuntimeError as error:
        return str(error)
    return ""


def sharded_first_error() -> str:
    """get_peft_model on a base that fully_shard already sharded must fail with a message saying the order."""
    base = tiny_pruned_llama()
    for block in base.model.layers:
        shard_module(block)
    try:
        get_peft_model(base, seft_config())
    except RuntimeError as error:
        return str(error)
    return ""


def shard_module(module, reshard_after_forward: bool = True):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    import os

    rank = int(os.environ["RANK"])
    results = {}
    if rank == 0:  # before the process group exists: plain single-process SEFT
        results = {"reference": reference(out_dir)}
        if int(os.environ["WORLD_SIZE"]) > 1:
            results["reference_seeded"] = reference(out_dir, seeded=True)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    part = GLOBAL_BATCH // world
    rows = slice(rank * part, (rank + 1) * part)
    if world == 1:  # FSDP2 over a single rank (shards are whole weights): only the first variant, no resume
        results["fsdp_single"] = distributed_run("fsdp_single", out_dir, rows)
    else:
        for variant in ("fsdp_reshard", "fsdp_keep", "ddp", "fsdp_seeded", "fsdp_guard"):
            results[variant] = distributed_run(variant, out_dir, rows)
        results["fsdp1_error"] = fsdp1_error(rows)
        results["sharded_first_error"] = sharded_first_error()
    if rank == 0:
        torch.save(results, out_dir / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
