"""What the ``seft`` subcommands do; each takes the parsed arguments (see cli.py) and returns an exit status.

Every command that writes checks its output directory before the work (never an input, not a non-empty directory
without ``--overwrite``, writable) and writes into a temporary sibling that is renamed into place at the end.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..export.merging import merge_and_save
from ..pruning import sparsity_report
from . import loading
from .outputs import check_output_dir, staged
from .steps import (
    Timer,
    base_metrics,
    evaluate,
    finish,
    heldout_ids,
    load_inputs,
    prune_model,
    pruning_settings,
    record_base_location,
    train_and_save,
)

logger = logging.getLogger("peft_seft.cli")


def _output(args, *inputs: str | None) -> Path:
    return check_output_dir(args.output_dir, args.overwrite, [args.model, getattr(args, "dataset", None), *inputs])


def run_prune(args) -> int:
    timer, output_dir = Timer(), _output(args)
    with timer.stage("load"):
        model, tokenizer, splits = load_inputs(args, need_data=args.method != "magnitude" or args.eval)
    metrics_ppl = {}
    if args.eval:
        heldout = heldout_ids(args, splits, tokenizer)
        with timer.stage("evaluate dense"):
            metrics_ppl["dense"] = evaluate(args, model, heldout)
    dense = sparsity_report(model)
    with timer.stage("prune"):
        pruned = prune_model(args, model, tokenizer, splits)
    if args.eval:
        with timer.stage("evaluate pruned"):
            metrics_ppl["pruned"] = evaluate(args, model, heldout)
    print(pruned.to_table())
    metrics = base_metrics(args, splits, {"dense": dense, "pruned": pruned})
    metrics["settings"] = {"pruning": pruning_settings(args)}
    metrics["outputs"] = {"pruned model": str(output_dir)}
    if metrics_ppl:
        metrics["perplexity"] = metrics_ppl
        metrics["eval_tokens"] = int(heldout.numel())
    with timer.stage("save"), staged(output_dir) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        (work / "sparsity.txt").write_text(pruned.to_table() + "\n")
        finish(metrics, work, "Pruning report", timer)
    print(f"Saved the pruned model ({pruned.sparsity:.2%} sparse) to {output_dir}")
    return 0


def run_train(args) -> int:
    timer, output_dir = Timer(), _output(args, args.resume)
    with timer.stage("load"):
        model, tokenizer, splits = load_inputs(args)
    base = sparsity_report(model)
    if base.sparsity < 0.01:
        logger.warning(
            "The model is dense (%.2f%% sparse): SEFT keeps its non-zero count, but there is no "
            "sparsity to preserve. Prune it first with `seft prune`.",
            100 * base.sparsity,
        )
    heldout = heldout_ids(args, splits, tokenizer) if args.eval else None
    metrics_ppl = {}
    if args.eval:
        with timer.stage("evaluate before"):
            metrics_ppl["pruned"] = evaluate(args, model, heldout)
    record_base_location(model, args.model)
    if args.model is None:
        args.card_base_model = args.card_base_model or loading.EMBEDDED_HUB_ID
    with staged(output_dir, keep_on_failure="trainer") as work:
        with timer.stage("train"):
            result, _, training, settings = train_and_save(args, model, tokenizer, splits, work, {})
        reports = {"pruned": base}
        if args.eval:
            with timer.stage("evaluate after"):
                metrics_ppl["repaired"] = evaluate(args, result.peft_model, heldout)
        metrics = base_metrics(args, splits, reports)
        metrics.update(
            {"settings": settings, "training": training, "outputs": {"adapter": str(output_dir / "adapter")}}
        )
        if metrics_ppl:
            metrics["perplexity"] = metrics_ppl
            metrics["eval_tokens"] = int(heldout.numel())
        finish(metrics, work, "SEFT training report", timer)
    print(f"Saved the SEFT adapter to {output_dir / 'adapter'}")
    return 0


def _base_of_adapter(args) -> dict:
    """The adapter's config; ``--model`` defaults to the base model named in it (never to the embedded model)."""
    config = loading.adapter_config(args.adapter)
    if args.model is None:
        args.model = config.get("base_model_name_or_path") or None
        if args.model is None:
            raise ValueError(f"The adapter {args.adapter} names no base model in its config; pass --model.")
        logger.info("Base model from the adapter's config: %s", args.model)
    return config


def run_eval(args) -> int:
    timer = Timer()
    output_dir = _output(args, args.adapter) if args.output_dir else None
    if args.adapter:
        _base_of_adapter(args)
    with timer.stage("load"):
        model, tokenizer, splits = load_inputs(args)
        if args.adapter:
            model = loading.load_adapter(model, args.adapter)
    heldout = heldout_ids(args, splits, tokenizer)
    with timer.stage("evaluate"):
        value = evaluate(args, model, heldout)
    report = sparsity_report(model.merge_and_unload() if args.adapter else model)
    print(report.to_table())
    print(f"Held-out perplexity: {value:.4f} ({heldout.numel():,} tokens, windows of {args.seq_len})")
    print(f"Sparsity of the target layers: {report.sparsity:.2%} ({report.nonzeros:,} non-zeros of {report.numel:,})")
    if output_dir is not None:
        metrics = base_metrics(args, splits, {"model": report})
        metrics.update({"perplexity": {"model": value}, "eval_tokens": int(heldout.numel())})
        if args.adapter:
            metrics["adapter"] = str(args.adapter)
        with staged(output_dir) as work:
            finish(metrics, work, "Evaluation report", timer)
    return 0


def run_merge(args) -> int:
    config = _base_of_adapter(args)
    output_dir = _output(args, args.adapter)
    model, tokenizer = loading.load_model(args.model, args.dtype, args.device)
    base = sparsity_report(model, config.get("pattern"))
    peft_model = loading.load_adapter(model, args.adapter)
    with staged(output_dir) as work:
        _, check = merge_and_save(peft_model, tokenizer, base, work)
    print(check.summary())
    print(f"Saved the merged model to {output_dir}")
    return 1 if check.failed else 0


def run_repair(args) -> int:
    timer, output_dir = Timer(), _output(args)
    with timer.stage("load"):
        model, tokenizer, splits = load_inputs(args)
        heldout = heldout_ids(args, splits, tokenizer)
    ppl, reports = {}, {"dense": sparsity_report(model)}
    with timer.stage("evaluate dense"):
        ppl["dense"] = evaluate(args, model, heldout)
    with timer.stage("prune"):
        reports["pruned"] = prune_model(args, model, tokenizer, splits)
    with timer.stage("evaluate pruned"):
        ppl["pruned"] = evaluate(args, model, heldout)
    with staged(output_dir, keep_on_failure="trainer") as work:
        with timer.stage("save pruned"):
            model.save_pretrained(work / "pruned")
            tokenizer.save_pretrained(work / "pruned")
            model.name_or_path = model.config._name_or_path = str(output_dir / "pruned")  # where it will be
        extra = {
            "pruning": f"{args.method}, "
            + (f"pattern {args.pattern}" if args.pattern else f"sparsity {args.sparsity:g}"),
            "pruned from": loading.hub_base_id(args.model),
            "pruned base": "`pruned/` next to this adapter (saved by `seft repair`)",
            "held-out perplexity": f"dense {ppl['dense']:.3f}, pruned {ppl['pruned']:.3f}",
        }
        with timer.stage("train"):
            result, _, training, settings = train_and_save(args, model, tokenizer, splits, work, extra)
        with timer.stage("merge"):
            merged, check = merge_and_save(result.peft_model, tokenizer, reports["pruned"], work / "merged")
            reports["repaired"] = check.merged
            logger.info(check.summary())
        with timer.stage("evaluate repaired"):
            ppl["repaired"] = evaluate(args, merged, heldout)
        metrics = base_metrics(args, splits, reports)
        metrics.update({"perplexity": ppl, "eval_tokens": int(heldout.numel()), "training": training})
        metrics["settings"] = {"pruning": pruning_settings(args), **settings}
        metrics["merge_check"] = {
            "equal": check.equal,
            "exceeds": check.exceeds,
            "pattern_kept": check.pattern_kept,
            "summary": check.summary(),
        }
        metrics["outputs"] = {name: str(output_dir / name) for name in ("pruned", "adapter", "merged")}
        finish(metrics, work, "SEFT repair report", timer)
    print(
        f"Held-out perplexity: dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f} -> "
        f"repaired {ppl['repaired']:.3f}\n"
        f"{check.summary()}\nReport: {output_dir / 'report.md'}"
    )
    return 1 if check.failed else 0


def run_push(args) -> int:
    from .publish import publish_run

    return publish_run(args)
