"""Text data for the ``seft`` command: ``peft_seft.data`` lives in :mod:`peft_seft.cli.data`.

This old path keeps working: the module only re-exports; see ARCHITECTURE.md (public paths).
"""

from .cli.data import (
    EMBEDDED_NAME,
    FILE_BUILDERS,
    HELDOUT_SPLITS,
    STRING_DTYPES,
    TextSplits,
    chat_format,
    chunk,
    embedded_splits,
    lm_dataset,
    load_raw_dataset,
    load_text_splits,
    pick_text_column,
    render,
    split_documents,
    token_stream,
)

__all__ = [
    "EMBEDDED_NAME",
    "FILE_BUILDERS",
    "HELDOUT_SPLITS",
    "STRING_DTYPES",
    "TextSplits",
    "chat_format",
    "chunk",
    "embedded_splits",
    "lm_dataset",
    "load_raw_dataset",
    "load_text_splits",
    "pick_text_column",
    "render",
    "split_documents",
    "token_stream",
]
