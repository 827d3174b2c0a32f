"""SEFT fine-tuning with TRL's ``SFTTrainer`` (``SEFTConfig`` as ``peft_config``) on pre-tokenized sequences."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..tuner.config import SEFTConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Trainer hyper-parameters of ``seft train`` / ``seft repair``."""

    max_steps: int = 100  # -1: train for num_train_epochs
    num_train_epochs: float = 1.0
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 2e-3
    warmup_steps: float = 0.05
    lr_scheduler: str = "linear"
    logging_steps: int = 5
    seq_len: int = 256
    seed: int = 0
    progress: bool = True
    precision: str = "fp32"  # "bf16", "fp16" (mixed precision) or "fp32"
    gradient_checkpointing: bool = False
    save_steps: int = 0  # 0: no checkpoints
    report_to: list[str] = field(default_factory=list)
    packing: bool = False
    use_cpu: bool = False  # train on the CPU even where a GPU is available (--device cpu)

    @property
    def sequences_needed(self) -> int | None:
        """Sequences that ``max_steps`` consume (None when training for whole epochs)."""
        return self.max_steps * self.batch_size * self.grad_accum if self.max_steps > 0 else None


def default_precision(device: str) -> str:
    """bf16 mixed precision where the device supports it (CUDA GPUs from Ampere on), else fp32."""
    import torch

    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def _checkpointing_field() -> str:
    """transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing`` in 5.23 (old name deprecated)."""
    from trl import SFTConfig

    names = {f.name for f in fields(SFTConfig)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def topology_per_layer(peft_model: Any, adapter_name: str = "default") -> list[dict[str, Any]]:
    """Where evolution moved the topology, per SEFT layer: pruned weights of the base that are now trainable
    (re-activated) and frozen weights SEFT pruned to pay for them (re-pruned)."""
    from ..tuner.layer import EMPTY_SLOT, SEFTLayer

    rows = []
    with torch.no_grad():
        for name, layer in peft_model.named_modules():
            if isinstance(layer, SEFTLayer) and adapter_name in layer.seft_indices:
                zero_in_base = layer.base_values_at(layer.seft_indices[adapter_name]) == 0
                repruned = layer.seft_pruned[adapter_name] != EMPTY_SLOT
                short = name.removeprefix("base_model.model.")
                rows.append({"name": short, "reactivated": int(zero_in_base.sum()), "repruned": int(repruned.sum())})
    return rows


@dataclass
class TrainResult:
    peft_model: Any
    losses: list[tuple[int, float]]
    rounds: list[dict[str, Any]]
    runtime_s: float
    log_history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    topology: list[dict[str, Any]] = field(default_factory=list)


def seft_config(
    density: float = 0.02,
    update_interval: int = 20,
    selection_steps: int = 5,
    initial_drop_rate: float = 0.2,
    drop_schedule: str = "cosine",
    grow_pruned: bool = True,
    prune_criterion: str = "sensitivity",
    pattern: str | None = None,
    seed: int | None = 0,
    total_steps: int | None = None,
) -> SEFTConfig:
    """A ``SEFTConfig`` for causal LM fine-tuning (errors name the offending field)."""
    return SEFTConfig(
        task_type="CAUSAL_LM",
        density=density,
        update_interval=update_interval,
        selection_steps=min(selection_steps, update_interval),
        initial_drop_rate=initial_drop_rate,
        drop_schedule=drop_schedule,
        grow_pruned=grow_pruned,
        prune_criterion=prune_criterion,
        pattern=pattern,
        random_seed=seed,
        total_steps=total_steps,
    )


def sft_config(output_dir: str | Path, settings: TrainSettings) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=settings.max_steps,
        num_train_epochs=settings.num_train_epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_steps,
        weight_decay=0.0,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        max_length=settings.seq_len,
        packing=settings.packing,
        use_cpu=settings.use_cpu,
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        **{_checkpointing_field(): settings.gradient_checkpointing},
        dataloader_pin_memory=torch.cuda.is_available(),
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        report_to=settings.report_to,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        disable_tqdm=not settings.progress,
    )


def train_seft(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    config: SEFTConfig,
    settings: TrainSettings,
    output_dir: str | Path,
    resume_from: str | None = None,
) -> TrainResult:
    """Wrap ``model`` with SEFT via ``SFTTrainer(peft_config=config)`` and train it (from the Trainer checkpoint
    ``resume_from`` if given); returns the ``PeftModel``, the logged losses, the evolution rounds and the training
    time. ``train_dataset`` is pre-tokenized or in any format SFTTrainer processes (text, conversational,
    prompt/completion)."""
    from trl import SFTTrainer

    from ..tuner.callbacks import SEFTCallback

    trainer = SFTTrainer(
        model=model,
        args=sft_config(output_dir, settings),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=config,
        callbacks=[SEFTCallback()],
    )
    peft_model = trainer.model
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info(
        "SEFT fine-tuning: %s, batch %d x %d tokens, lr %g, %s trainable values (density %g).",
        f"{settings.max_steps} steps" if settings.max_steps > 0 else f"{settings.num_train_epochs:g} epochs",
        settings.batch_size * settings.grad_accum,
        settings.seq_len,
        settings.lr,
        f"{trainable:,}",
        config.density,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    runtime = time.perf_counter() - start
    history = trainer.state.log_history
    losses = [(entry["step"], float(entry["loss"])) for entry in history if "loss" in entry]
    rounds = [
        {"step": r.step, "drop_rate": r.drop_rate, **vars(r.counts), "active": r.active, "budget": r.budget}
        for r in peft_model.base_model.evolution.reports
    ]
    peft_model.eval()
    steps, topology = trainer.state.global_step, topology_per_layer(peft_model)
    return TrainResult(peft_model, losses, rounds, runtime, history, steps, topology)
