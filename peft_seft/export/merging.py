"""Export a plain sparse transformers checkpoint (merge the SEFT adapter into the base) and verify its sparsity."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pruning import SparsityReport, sparsity_report

logger = logging.getLogger(__name__)


@dataclass
class MergeCheck:
    """Per-layer non-zero counts of the merged model against the base model."""

    base: SparsityReport
    merged: SparsityReport

    def mismatches(self) -> list[tuple[str, int, int]]:
        base = {layer.name: layer.nonzeros for layer in self.base.layers}
        merged = {layer.name: layer.nonzeros for layer in self.merged.layers}
        if set(base) != set(merged):
            missing = sorted(set(base) ^ set(merged))
            raise ValueError(f"The merged model's target layers differ from the base's: {missing[:5]}")
        return [(name, base[name], merged[name]) for name in base if base[name] != merged[name]]

    @property
    def equal(self) -> bool:
        return not self.mismatches()

    @property
    def exceeds(self) -> bool:
        return any(merged > base for _, base, merged in self.mismatches())

    @property
    def pattern_kept(self) -> bool | None:
        """Whether every merged layer satisfies the base's N:M pattern (``None`` for unstructured sparsity)."""
        return self.merged.nm_compliant

    @property
    def failed(self) -> bool:
        return self.exceeds or self.pattern_kept is False

    def summary(self) -> str:
        text = self._count_summary()
        if self.pattern_kept is True:
            text += f" Every layer keeps the {self.base.pattern} pattern."
        elif self.pattern_kept is False:
            text += f" Some layers break the {self.base.pattern} pattern."
        return text

    def _count_summary(self) -> str:
        layers = len(self.base.layers)
        if self.equal:
            return (
                f"Sparsity check passed: the merged model has exactly the base's number of non-zeros in all {layers} "
                f"target layers ({self.merged.nonzeros:,} of {self.merged.numel:,} weights, "
                f"sparsity {self.merged.sparsity:.2%})."
            )
        bad = self.mismatches()
        shown = ", ".join(f"{name}: {merged:,} vs {base:,}" for name, base, merged in bad[:3])
        verdict = "more non-zeros than the base (sparsity lost)" if self.exceeds else "fewer non-zeros than the base"
        return (
            f"Sparsity check: {len(bad)} of {layers} layers have {verdict}: {shown}"
            f"{' ...' if len(bad) > 3 else ''} (merged total {self.merged.nonzeros:,}, base {self.base.nonzeros:,})."
        )


def merge_and_save(
    peft_model: Any, tokenizer: Any, base_report: SparsityReport, output_dir: str | Path
) -> tuple[Any, MergeCheck]:
    """``merge_and_unload`` the adapter, compare per-layer non-zeros with ``base_report``, and ``save_pretrained``
    the merged model (and tokenizer) to ``output_dir``. Returns the merged model and the check."""
    merged = peft_model.merge_and_unload()
    merged_report = sparsity_report(merged, base_report.pattern, [layer.name for layer in base_report.layers])
    check = MergeCheck(base_report, merged_report)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    (output_dir / "sparsity.txt").write_text(f"{merged_report.to_table()}\n\n{check.summary()}\n")
    logger.info("Saved the merged model to %s.", output_dir)
    return merged, check
