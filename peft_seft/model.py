"""`SEFTModel`: the PEFT tuner that puts SEFT layers into a model."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _maybe_include_all_linear_layers
from torch import nn

from .config import SEFTConfig
from .fingerprint import fingerprint_mismatch, weight_fingerprint
from .layer import SEFTLayer, SEFTLinear
from .targets import default_target_pattern, is_linear
from .training import Evolution


class SEFTModel(BaseTuner):
    """Creates a SEFT model from a pretrained (usually pruned) transformers model.

    Example::

        >>> import peft_seft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_seft.SEFTConfig(density=0.01))
    """

    prefix: str = "seft_"
    tuner_layer_cls = SEFTLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config: SEFTConfig = self.peft_config[adapter_name]
        if config.target_modules is None:
            config.target_modules = default_target_pattern(model)
        _maybe_include_all_linear_layers(config, model)
        self._layer_budgets = self._split_budget(model, config)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _post_injection_hook(self, model: nn.Module, config: SEFTConfig, adapter_name: str) -> None:
        if not hasattr(self, "evolution"):
            self.evolution = Evolution(self)
            self.register_forward_pre_hook(lambda module, args: module.evolution.before_forward())

    def _split_budget(self, model: nn.Module, config: SEFTConfig) -> dict[str, int]:
        """K per target layer: density * size, or ``num_trainable`` split in proportion to size."""
        sizes = {
            name: module.weight.numel()
            for name, module in model.named_modules()
            if is_linear(module) and self._check_target_module_exists(config, name)
        }
        if config.num_trainable is None:
            return {name: round(config.density * size) for name, size in sizes.items()}
        total = sum(sizes.values()) or 1
        return {name: round(config.num_trainable * size / total) for name, size in sizes.items()}

    def _create_and_replace(
        self,
        config: SEFTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        num_trainable = self._layer_budgets.get(current_key, round(config.density * base.weight.numel()))
        if isinstance(target, SEFTLayer):
            target.update_layer(adapter_name, config, num_trainable, current_key)
            return
        new_module = SEFTLinear(target, adapter_name, config, num_trainable, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_fits_base(model, adapter_name, remapped)
        return remapped


def check_adapter_fits_base(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Fail loudly (before anything is loaded) when a SEFT state dict was made for another base model."""
    problems = []
    for name, module in model.named_modules():
        if not isinstance(module, SEFTLayer) or adapter_name not in module.seft_fingerprint:
            continue
        saved = state_dict.get(f"{name}.seft_fingerprint.{adapter_name}")
        if saved is None:
            problems.append(f"{name}: the adapter has no entry for this layer")
            continue
        # The base as it is without any adapter applied (the layer may hold W in place right now).
        mismatch = fingerprint_mismatch(saved, weight_fingerprint(module.effective_weight([])))
        if mismatch:
            problems.append(f"{name}: {mismatch}")
    if problems:
        shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(
            f"This SEFT adapter does not fit the base model it is being loaded onto ({len(problems)} layer(s)):\n  "
            f"{shown}\nLoad it onto the (pruned) base model it was trained on; its name is in adapter_config.json "
            "(base_model_name_or_path)."
        )
