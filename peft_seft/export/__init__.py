"""What leaves the training run: a merged plain sparse checkpoint (``merging``), N:M checks and 2:4 semi-structured
weights (``semi_structured``), and Hub publishing (``hub``, tested against ``hub_standin``).

The names of ``semi_structured`` are re-exported here: ``peft_seft.export.to_semi_structured`` is a public path.
"""

from .semi_structured import (
    SEMI_STRUCTURED_DTYPES,
    ExportReport,
    LayerExport,
    nm_compliance,
    select_linears,
    semi_structured_unsupported,
    to_semi_structured,
    violation_message,
)

__all__ = [
    "SEMI_STRUCTURED_DTYPES",
    "ExportReport",
    "LayerExport",
    "nm_compliance",
    "select_linears",
    "semi_structured_unsupported",
    "to_semi_structured",
    "violation_message",
]
