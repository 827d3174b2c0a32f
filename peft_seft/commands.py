"""What the ``seft`` subcommands do; each takes the parsed arguments (see cli.py) and returns an exit status."""

from __future__ import annotations

import logging
from pathlib import Path

from . import loading
from .merging import merge_and_save
from .pruning import sparsity_report
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


def run_prune(args) -> int:
    timer, output_dir = Timer(), Path(args.output_dir)
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
    with timer.stage("save"):
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "sparsity.txt").write_text(pruned.to_table() + "\n")
    metrics = base_metrics(args, splits, {"dense": dense, "pruned": pruned})
    metrics["settings"] = {"pruning": pruning_settings(args)}
    metrics["outputs"] = {"pruned model": str(output_dir)}
    if metrics_ppl:
        metrics["perplexity"] = metrics_ppl
        metrics["eval_tokens"] = int(heldout.numel())
    finish(metrics, output_dir, "Pruning report", timer)
    print(f"Saved the pruned model ({pruned.sparsity:.2%} sparse) to {output_dir}")
    return 0


def run_train(args) -> int:
    timer, output_dir = Timer(), Path(args.output_dir)
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
    with timer.stage("train"):
        result, adapter_dir, training, settings = train_and_save(args, model, tokenizer, splits, output_dir, {})
    reports = {"pruned": base}
    if args.eval:
        with timer.stage("evaluate after"):
            metrics_ppl["repaired"] = evaluate(args, result.peft_model, heldout)
    metrics = base_metrics(args, splits, reports)
    metrics.update({"settings": settings, "training": training, "outputs": {"adapter": str(adapter_dir)}})
    if metrics_ppl:
        metrics["perplexity"] = metrics_ppl
        metrics["eval_tokens"] = int(heldout.numel())
    finish(metrics, output_dir, "SEFT training report", timer)
    print(f"Saved the SEFT adapter to {adapter_dir}")
    return 0


def _base_of_adapter(args) -> dict:
    """The adapter's config; ``--model`` defaults to the base model named in it."""
    config = loading.adapter_config(args.adapter)
    if args.model is None:
        args.model = config.get("base_model_name_or_path") or None
        logger.info("Base model from the adapter's config: %s", loading.model_label(args.model))
    return config


def run_eval(args) -> int:
    timer = Timer()
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
    if args.output_dir:
        metrics = base_metrics(args, splits, {"model": report})
        metrics.update({"perplexity": {"model": value}, "eval_tokens": int(heldout.numel())})
        if args.adapter:
            metrics["adapter"] = str(args.adapter)
        finish(metrics, Path(args.output_dir), "Evaluation report", timer)
    return 0


def run_merge(args) -> int:
    config = _base_of_adapter(args)
    model, tokenizer = loading.load_model(args.model, args.dtype, args.device)
    base = sparsity_report(model, config.get("pattern"))
    peft_model = loading.load_adapter(model, args.adapter)
    _, check = merge_and_save(peft_model, tokenizer, base, args.output_dir)
    print(check.summary())
    print(f"Saved the merged model to {args.output_dir}")
    return 1 if check.failed else 0


def run_repair(args) -> int:
    timer, output_dir = Timer(), Path(args.output_dir)
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
    pruned_dir = output_dir / "pruned"
    with timer.stage("save pruned"):
        model.save_pretrained(pruned_dir)
        tokenizer.save_pretrained(pruned_dir)
        model.name_or_path = model.config._name_or_path = str(pruned_dir.resolve())
    extra = {
        "pruning": f"{args.method}, " + (f"pattern {args.pattern}" if args.pattern else f"sparsity {args.sparsity:g}"),
        "pruned base": f"`{pruned_dir}` (saved by `seft repair`)",
        "held-out perplexity": f"dense {ppl['dense']:.3f}, pruned {ppl['pruned']:.3f}",
    }
    args.card_base_model = args.card_base_model or loading.hub_base_id(args.model)
    with timer.stage("train"):
        result, adapter_dir, training, settings = train_and_save(args, model, tokenizer, splits, output_dir, extra)
    with timer.stage("merge"):
        merged, check = merge_and_save(result.peft_model, tokenizer, reports["pruned"], output_dir / "merged")
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
    metrics["outputs"] = {
        "pruned model": str(pruned_dir),
        "adapter": str(adapter_dir),
        "merged model": str(output_dir / "merged"),
    }
    finish(metrics, output_dir, "SEFT repair report", timer)
    print(
        f"Held-out perplexity: dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f} -> "
        f"repaired {ppl['repaired']:.3f}\n"
        f"{check.summary()}\nReport: {output_dir / 'report.md'}"
    )
    return 1 if check.failed else 0
