"""Trainer integration: the Trainer's max steps as the default ``total_steps``, and per-round logs."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger("peft_seft")


def _seft_tuner(model):
    """The SEFT tuner inside a (possibly wrapped) PeftModel, or None."""
    from .model import SEFTModel

    for module in (model, getattr(model, "base_model", None), getattr(model, "module", None)):
        if isinstance(module, SEFTModel):
            return module
        inner = getattr(module, "base_model", None)
        if isinstance(inner, SEFTModel):
            return inner
    return None


class SEFTCallback(TrainerCallback):
    """Writes every evolution round to the Trainer's logs (``state.log_history``, and the Python logger):
    dropped, grown, re-activated, re-pruned and restored positions, and the structurally active count
    versus the non-zero budget. Also sets ``total_steps`` to the Trainer's max steps when unset."""

    log_rounds = True

    def __init__(self) -> None:
        self._reported = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = _seft_tuner(model)
        if tuner is None:
            return
        for name, config in tuner.peft_config.items():
            if getattr(config, "total_steps", 0) is None:
                config.total_steps = state.max_steps
                logger.info("SEFT adapter %r: total_steps set to the Trainer's max_steps (%d).", name, state.max_steps)
        self._reported = len(tuner.evolution.reports)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tuner = _seft_tuner(model)
        if tuner is None or not self.log_rounds:
            return
        for report in tuner.evolution.reports[self._reported :]:
            state.log_history.append({**report.as_log(), "step": state.global_step})
        self._reported = len(tuner.evolution.reports)


class SEFTDefaultsCallback(SEFTCallback):
    """Added to every Trainer by ``import peft_seft``: only sets the default ``total_steps``."""

    log_rounds = False


def install_default_callback() -> None:
    """Make every transformers Trainer (and so TRL's SFTTrainer) set SEFT's default ``total_steps``."""
    from transformers import trainer

    if not any(getattr(cb, "__name__", "") == SEFTDefaultsCallback.__name__ for cb in trainer.DEFAULT_CALLBACKS):
        trainer.DEFAULT_CALLBACKS.append(SEFTDefaultsCallback)
