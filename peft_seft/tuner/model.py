"""`SEFTModel`: the PEFT tuner that puts SEFT layers into a model."""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from collections.abc import Iterable

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from ..evolution.window import GradientWindow
from ..utils.distributed import check_supported_sharding, full_tensor
from ..utils.targets import check_supported_layer, default_target_pattern
from .config import SEFTConfig
from .fingerprint import trained_checksum, with_trained_checksum
from .layer import SEFTLayer, SEFTLinear
from .training import Evolution
from .validation import AdapterValidationError, validate_adapter_state


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
        refuse_tied_targets(model, self._layer_budgets)
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
                # Before any layer is replaced: refuse sharded (FSDP1/2, ZeRO-3) and quantized layers up front.
                check_supported_sharding([_PlainTarget(module)], injecting=True)
                check_supported_layer(name, module)
                sizes[name] = module.weight.numel()
        if config.num_trainable is None:
            return {name: round(config.density * size) for name, size in sizes.items()}
        total = sum(sizes.values()) or 1
        return {name: round(config.num_trainable * size / total) for name, size in sizes.items()}

    @staticmethod
    def _check_target_module_exists(config: SEFTConfig, key: str):
        found = check_target_module_exists(config, key)
        if found and config.layers_to_transform is not None:
            # PEFT applies layers_to_transform / layers_pattern to suffixes only, not to a regex (SEFT's default target)
            # nor to the exact names 'all-linear' expands to: check a matched module again as a suffix target, which
            # applies PEFT's own layer filter. The budget split and the injection both go through here.
            probe = copy.copy(config)
            probe.target_modules = {key.rsplit(".", 1)[-1]}
            found = check_target_module_exists(probe, key)
        return found

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version assigns `child.weight` to a new module without `base_layer`, which fails when unloading
        # a TrainableTokensWrapper (its `weight` is computed). SEFT layers are built on their base weight's device, so
        # the replacement is all that is needed (as in LoraModel).
        setattr(parent, child_name, new_module)

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
        # Under FSDP2 the values are sharded DTensors: the adapter file holds them whole. From model.state_dict() every
        # rank must save (is_main_process=(rank == 0)): gathering them is a collective. With a gathered full state dict
        # (the Trainer's FULL_STATE_DICT) rank 0 may save alone: W0 at T is known without a collective.
        to_return = {key: full_tensor(value) for key, value in to_return.items()}
        # Saved inside a gradient window (a mid-window checkpoint): add the window's O(K) statistics so that resuming
        # continues exactly. Outside a window nothing is added.
        for name, module in model.named_modules():
            key = f"{name}.seft_fingerprint.{adapter_name}"
            if isinstance(module, SEFTLayer) and key in to_return:  # with the sum of W0 * delta at T (fingerprint.py)
                values = to_return.get(f"{name}.seft_values.{adapter_name}")
                if values is None:
                    values = module._full_values(adapter_name)
                checksum = trained_checksum(module.base_values_at(module.seft_indices[adapter_name]), values)
                to_return[key] = with_trained_checksum(to_return[key], checksum)
            if isinstance(module, SEFTLayer) and adapter_name in module._windows:
                for key, value in module._windows[adapter_name].state_dict().items():
                    to_return[f"{name}.{WINDOW_KEY}.{adapter_name}.{key}"] = value
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            validate_adapter_state(model, adapter_name, remapped)
            restore_windows(model, config, adapter_name, remapped)
        except AdapterValidationError:
            discard_adapter(model, adapter_name)
            raise
        keep_current_fingerprints(model, adapter_name, remapped)
        return remapped

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        # The unloaded model is a plain model again: drop the hook that drove this tuner's evolution (it would keep a
        # dead tuner's Evolution alive in the user's model, and break pickling it).
        for key, hook in list(model._forward_pre_hooks.items()):
            if isinstance(hook, functools.partial) and hook.func is _evolution_before_forward:
                del model._forward_pre_hooks[key]
        return model


def refuse_tied_targets(model: nn.Module, targets: Iterable[str]) -> None:
    """Refuse a target whose weight is shared with another module (e.g. an LM head tied to the input embeddings):
    the in-place W would change the other module too."""
    names_of = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of[id(param)].append(name)
    for target in targets:
        weight = model.get_submodule(target).weight
        tied = [name for name in names_of[id(weight)] if not name.startswith(f"{target}.")]
        if tied:
            raise ValueError(
                f"SEFT cannot adapt {target}: its weight is tied to {', '.join(tied)}. SEFT writes the effective "
                f"weight into the base weight in place, which would change the tied module too. Exclude {target} "
                "(exclude_modules) or untie the weights first (e.g. load the model with tie_word_embeddings=False)."
            )


class _PlainTarget:
    """A target module before injection, seen as a layer by check_supported_sharding."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        self.seft_values = {}

    def get_base_layer(self) -> nn.Module:
        return self.module


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
            trainable = state_dict.get(f"{name}.seft_indices.{adapter_name}", module.seft_indices[adapter_name])
            numel = module.in_features * module.out_features
            try:
                window = GradientWindow.from_state_dict(
                    fields, trainable, numel, module.seft_values[adapter_name].device
                )
                window.growth_normalization = config.growth_normalization
            except ValueError as error:
                raise AdapterValidationError(
                    f"The saved gradient window of SEFT layer {name} (adapter {adapter_name!r}) is invalid: {error}. "
                    "The checkpoint is damaged; resume from another checkpoint."
                ) from None
        module.restore_window(adapter_name, window)


def keep_current_fingerprints(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """After validation, keep the fingerprint of the base the adapter is now on (an adapter saved in another dtype or
    in the older five-number format then loads as well)."""
    for name, module in model.named_modules():
        if isinstance(module, SEFTLayer) and adapter_name in module.seft_fingerprint:
            state_dict[f"{name}.seft_fingerprint.{adapter_name}"] = module.seft_fingerprint[adapter_name].clone()


def discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo the injection of an adapter whose file failed validation, so that the base model is as it was."""
    tuner = next((module for module in model.modules() if isinstance(module, SEFTModel)), None)
    if tuner is None or adapter_name not in tuner.peft_config:
        return
    if list(tuner.peft_config) == [adapter_name]:
        tuner._unload_and_optionally_merge(merge=False)
    else:
        tuner.delete_adapter(adapter_name)
