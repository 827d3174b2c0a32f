"""`SEFTModel`: the PEFT tuner that puts SEFT layers into a model."""

from __future__ import annotations

import copy
import functools

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from .config import SEFTConfig
from .fingerprint import fingerprint_mismatch, weight_fingerprint
from .layer import SEFTLayer, SEFTLinear
from .targets import check_supported_layer, default_target_pattern
from .training import Evolution
from .window import GradientWindow


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
            from .callbacks import install_default_callback  # not at import: see peft_seft.__getattr__

            install_default_callback()  # every Trainer built from now on sets total_steps
            self.evolution = Evolution(self)
            # A partial of a module-level function, not a lambda: the model stays picklable, and a (deep) copy's hooks
            # call the copy's Evolution.
            hook = functools.partial(_evolution_before_forward, self.evolution)
            self.register_forward_pre_hook(hook)
            # A PeftModel without task_type calls the inner model directly (not this tuner), so hook it too.
            model.register_forward_pre_hook(hook)

    def _split_budget(self, model: nn.Module, config: SEFTConfig) -> dict[str, int]:
        """K per target layer: density * size, or ``num_trainable`` split in proportion to size."""
        sizes = {}
        # Layers that already hold an adapter: budget their base layer, skip their insides (as BaseTuner does).
        adapted: tuple[str, ...] = ()
        for name, module in model.named_modules():
            if adapted and name.startswith(adapted):
                continue
            if isinstance(module, BaseTunerLayer):
                adapted += (f"{name}.",)
                module = module.get_base_layer()
            if self._check_target_module_exists(config, name):
                check_supported_layer(name, module)  # before any layer is replaced: refuse quantized layers up front
                sizes[name] = module.weight.numel()
        if config.num_trainable is None:
            return {name: round(config.density * size) for name, size in sizes.items()}
        total = sum(sizes.values()) or 1
        return {name: round(config.num_trainable * size / total) for name, size in sizes.items()}

    @staticmethod
    def _check_target_module_exists(config: SEFTConfig, key: str):
        found = check_target_module_exists(config, key)
        if found and isinstance(config.target_modules, str) and config.layers_to_transform is not None:
            # PEFT applies layers_to_transform / layers_pattern to lists of names only, but SEFT's default target is
            # a regex: check a matched module again as a list target, which applies PEFT's own layer filter.
            probe = copy.copy(config)
            probe.target_modules = {key.rsplit(".", 1)[-1]}
            found = check_target_module_exists(probe, key)
        return found

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
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        # Saved inside a gradient window (a mid-window checkpoint): add the window's O(K) statistics so that resuming
        # continues exactly. Outside a window nothing is added.
        for name, module in model.named_modules():
            if isinstance(module, SEFTLayer) and adapter_name in module._windows:
                for key, value in module._windows[adapter_name].state_dict().items():
                    to_return[f"{name}.{WINDOW_KEY}.{adapter_name}.{key}"] = value
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_fits_base(model, adapter_name, remapped)
        restore_windows(model, config, adapter_name, remapped)
        return remapped

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        # The unloaded model is a plain model again: drop the hook that drove this tuner's evolution (it would keep a
        # dead tuner's Evolution alive in the user's model, and break pickling it).
        for key, hook in list(model._forward_pre_hooks.items()):
            if isinstance(hook, functools.partial) and hook.func is _evolution_before_forward:
                del model._forward_pre_hooks[key]
        return model


def _evolution_before_forward(evolution: Evolution, module: nn.Module, args: tuple) -> None:
    evolution.before_forward()


WINDOW_KEY = "seft_window"


def restore_windows(model: nn.Module, config: SEFTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]):
    """Pop the gradient-window entries of a state dict and put the windows back on the layers (a trainable adapter
    loaded from a checkpoint saved mid-window); every other window of this adapter is closed."""
    saved = {key: state_dict.pop(key) for key in [k for k in state_dict if f".{WINDOW_KEY}." in k]}
    for name, module in model.named_modules():
        if not isinstance(module, SEFTLayer) or adapter_name not in module.seft_values:
            continue
        fields = {}
        for prefix in (f"{name}.{WINDOW_KEY}.", f"base_model.model.{name}.{WINDOW_KEY}."):
            fields.update({k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)})
        window = None
        if fields and not config.inference_mode:
            window = GradientWindow.from_state_dict(fields, module.seft_values[adapter_name].device)
        module.restore_window(adapter_name, window)


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
