"""Steps shared by the ``seft`` subcommands (commands.py), driven by the parsed command-line arguments: load the model
and data, evaluate, prune, train and save the adapter, collect metrics and write the report."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..pruning import SparsityReport, prune
from ..tuner.cards import write_model_card
from . import data, loading
from .evaluation import perplexity
from .finetune import TrainSettings, default_precision, seft_config, train_seft
from .reporting import write_report

logger = logging.getLogger("peft_seft.cli")

SEFT_SETTINGS = (
    "density",
    "update_interval",
    "selection_steps",
    "initial_drop_rate",
    "drop_schedule",
    "grow_pruned",
    "prune_criterion",
)


class Timer:
    """Wall time per named stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        logger.info("== %s ==", name)
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - begin

    def as_dict(self) -> dict[str, float]:
        return {**self.stages, "total": time.perf_counter() - self.start}


def load_inputs(args, need_data: bool = True):
    model, tokenizer = loading.load_model(args.model, args.dtype, args.device)
    splits = (
        data.load_text_splits(args.dataset, args.text_column, args.dataset_config, tokenizer) if need_data else None
    )
    if splits is not None:
        logger.info("Dataset %s: %s.", splits.source, splits.summary())
    return model, tokenizer, splits


def heldout_ids(args, splits: data.TextSplits, tokenizer: Any):
    ids = data.token_stream(splits.heldout, tokenizer, args.eval_tokens)
    if ids.numel() < 2:
        raise ValueError("The held-out split has fewer than two tokens of text.")
    return ids


def evaluate(args, model: Any, heldout_ids) -> float:
    value = perplexity(
        model, heldout_ids, seq_len=args.seq_len, batch_size=args.eval_batch_size, show_progress=args.progress
    )
    logger.info("Held-out perplexity: %.3f", value)
    return value


def prune_model(args, model: Any, tokenizer: Any, splits: data.TextSplits | None) -> SparsityReport:
    report = prune(
        model,
        args.method,
        args.sparsity if args.pattern is None else None,
        pattern=args.pattern,
        calibration=splits.calibration if splits is not None else None,
        tokenizer=tokenizer,
        num_samples=args.calibration_samples,
        seq_len=args.seq_len,
        batch_size=args.eval_batch_size,
        show_progress=args.progress,
    )
    logger.info(
        "Pruned with %s: sparsity %.2f%% (%s non-zeros).", args.method, 100 * report.sparsity, f"{report.nonzeros:,}"
    )
    return report


def _layer_rows(reports: dict[str, SparsityReport]) -> list[dict[str, Any]]:
    first = next(iter(reports.values()))
    rows = [{"name": layer.name, "numel": layer.numel} for layer in first.layers]
    for stage, report in reports.items():
        for row, layer in zip(rows, report.layers, strict=True):
            row[stage] = layer.nonzeros
    return rows


def base_metrics(args, splits: data.TextSplits | None, reports: dict[str, SparsityReport]) -> dict[str, Any]:
    first = next(iter(reports.values()))
    metrics = {
        "command": args.command,
        "model": loading.model_label(args.model),
        "dataset": splits.source if splits is not None else None,
        "seq_len": args.seq_len,
        "numel": first.numel,
        "num_layers": len(first.layers),
        "nonzeros": {stage: report.nonzeros for stage, report in reports.items()},
        "sparsity": {stage: report.sparsity for stage, report in reports.items()},
        "layers": _layer_rows(reports),
    }
    if splits is not None:
        metrics["data"] = {"split": splits.summary()}
    return metrics


def pruning_settings(args) -> dict[str, Any]:
    return {
        "method": args.method,
        "sparsity": args.sparsity if args.pattern is None else None,
        "pattern": args.pattern or "unstructured",
        "calibration_samples": args.calibration_samples,
        "seq_len": args.seq_len,
    }


def _train_settings(args, device: str) -> TrainSettings:
    epochs = args.num_train_epochs is not None and args.max_steps is None
    return TrainSettings(
        max_steps=-1 if epochs else args.max_steps or 100,
        num_train_epochs=args.num_train_epochs or 1.0,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup,
        lr_scheduler=args.lr_scheduler,
        logging_steps=args.logging_steps,
        seq_len=args.seq_len,
        seed=args.seed,
        progress=args.progress,
        precision=args.precision or default_precision(device),
        gradient_checkpointing=args.gradient_checkpointing,
        save_steps=args.save_steps,
        report_to=[] if args.report_to == ["none"] else args.report_to,
        packing=args.packing,
        use_cpu=device == "cpu",
    )


def _seft_config(args):
    return seft_config(
        density=args.density,
        update_interval=args.update_interval,
        selection_steps=args.selection_steps,
        initial_drop_rate=args.initial_drop_rate,
        drop_schedule=args.drop_schedule,
        grow_pruned=args.grow_pruned,
        prune_criterion=args.prune_criterion,
        pattern=args.pattern,
        seed=args.seed,
        total_steps=None,  # the Trainer's max steps (SEFTCallback), also when training for whole epochs
    )


def _train_dataset(args, tokenizer: Any, splits: data.TextSplits, settings: TrainSettings) -> tuple[Any, str]:
    """The training data and its description: chat records for SFTTrainer to process, else fixed-length
    sequences of the concatenated text."""
    from datasets import Dataset

    if splits.train_records is not None:
        dataset = Dataset.from_list(splits.train_records)
        return dataset, f"{len(dataset)} chats from {splits.source} (SFTTrainer's chat processing)"
    dataset = data.lm_dataset(splits.train, tokenizer, args.seq_len, settings.sequences_needed)
    needed = settings.sequences_needed
    if needed is not None and len(dataset) < needed:
        logger.info(
            "The training split has %d sequences of %d tokens; %d steps x %d sequences repeat it %.1f times.",
            len(dataset),
            args.seq_len,
            settings.max_steps,
            settings.batch_size * settings.grad_accum,
            needed / len(dataset),
        )
    return dataset, f"{len(dataset)} sequences of {args.seq_len} tokens from {splits.source}"


def train_and_save(args, model: Any, tokenizer: Any, splits: data.TextSplits, output_dir: Path, extra: dict[str, Any]):
    settings = _train_settings(args, str(next(model.parameters()).device))
    train_dataset, described = _train_dataset(args, tokenizer, splits, settings)
    config = _seft_config(args)
    result = train_seft(model, tokenizer, train_dataset, config, settings, output_dir / "trainer", args.resume)
    adapter_dir = output_dir / "adapter"
    result.peft_model.save_pretrained(adapter_dir, save_embedding_layers=False)  # SEFT never adapts embeddings here
    tokenizer.save_pretrained(adapter_dir)
    extra = {**extra, "training data": described}
    write_model_card(result.peft_model, adapter_dir, base_model=args.card_base_model, extra=extra)
    logger.info("Saved the SEFT adapter and its model card.")
    training = {
        "steps": result.steps,
        "runtime_s": result.runtime_s,
        "trainable": sum(p.numel() for p in result.peft_model.parameters() if p.requires_grad),
        "losses": result.losses,
        "rounds": result.rounds,
        "topology": result.topology,
    }
    settings_dict = {
        "training": {k: v for k, v in asdict(settings).items() if k != "progress"},
        "seft": {name: getattr(config, name) for name in SEFT_SETTINGS} | {"pattern": config.pattern or "unstructured"},
    }
    return result, adapter_dir, training, settings_dict


def record_base_location(model: Any, name: str | None) -> None:
    """Make the adapter's ``base_model_name_or_path`` an absolute path when the model is a local directory."""
    if name is not None and Path(name).expanduser().is_dir():
        model.name_or_path = model.config._name_or_path = str(Path(name).expanduser().resolve())


def finish(metrics: dict[str, Any], output_dir: Path, title: str, timer: Timer) -> None:
    metrics["timings"] = timer.as_dict()
    report = write_report(metrics, output_dir, title)
    logger.info("Report: %s (metrics: %s).", report, output_dir / "metrics.json")
