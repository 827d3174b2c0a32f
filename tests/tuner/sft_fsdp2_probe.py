"""A probe, not a test: TRL's SFTTrainer with the Trainer's FSDP2 settings on CPU (issue 12, item 3).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/tuner/sft_fsdp2_probe.py OUT_DIR [--force] [--save]

Without ``--force``: accelerate (1.15) attaches its FSDP plugin only for GPU-like devices, so on CPU the Trainer
silently wraps the model in DDP ("wrapper DistributedDataParallel" below), whatever ``fsdp_config`` says.
With ``--force`` the plugin is forced onto accelerate's CPU state (a patch of accelerate internals): the model is
sharded with FSDP2 ("FSDPPeftModel", DTensor weights and values) and 10 steps with 2 rounds train to the same
rounds, positions and values as the DDP run. With ``--save`` as well, the step-5 checkpoint fails: accelerate's
state reports MULTI_CPU again by then, its get_state_dict takes the FSDP1 path and returns sharded DTensors, and
rank 0 alone gathers them in save_pretrained (a gloo collective mismatch).
"""

from __future__ import annotations

import sys

import accelerate.state as accelerate_state
import torch
import torch.distributed as dist
from trl import SFTTrainer

from peft_seft import SEFTConfig
from peft_seft.testing import char_tokenizer, seft_layers, sft_args, text_dataset, tiny_pruned_llama
from peft_seft.utils.distributed import full_tensor


def force_fsdp_plugin_on_cpu() -> None:
    original = accelerate_state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == accelerate_state.DistributedType.MULTI_CPU:
            self.distributed_type = accelerate_state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate_state.AcceleratorState.__init__ = patched


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    if "--force" in sys.argv:
        force_fsdp_plugin_on_cpu()
    save = "--save" in sys.argv
    args = sft_args(
        out + "/trainer",
        max_steps=10,
        per_device_train_batch_size=2,
        ddp_backend="gloo",
        fsdp="full_shard auto_wrap",
        fsdp_config={
            "version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
        },
        save_strategy="steps" if save else "no",
        save_steps=5,
    )
    trainer = SFTTrainer(
        model=tiny_pruned_llama(),
        args=args,
        train_dataset=text_dataset(),
        processing_class=char_tokenizer(),
        peft_config=SEFTConfig(density=0.05, update_interval=4, selection_steps=2, random_seed=0),
    )
    trainer.train()
    model, rank = trainer.model, dist.get_rank()
    layer = seft_layers(model)["model.layers.0.self_attn.q_proj"]
    values = full_tensor(layer.seft_values["default"]).detach()
    print(
        rank,
        "wrapper",
        type(trainer.model_wrapped).__name__,
        type(layer.base_layer.weight).__name__,
        type(layer.seft_values["default"]).__name__,
        "rounds",
        [(r.step, vars(r.counts)) for r in model.base_model.evolution.reports],
        "values norm",
        float(values.norm()),
        "indices sum",
        int(layer.seft_indices["default"].sum()),
    )


if __name__ == "__main__":
    main()
