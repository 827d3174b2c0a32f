"""Make "SEFT" a PEFT method from outside the peft package.

PEFT only registers names that are members of its `PeftType` enum, and `adapter_config.json` is looked
up with the plain string, so the member's name and value must both be "SEFT". Enums cannot be
subclassed, so the member is added through the enum's own tables. Everything here is idempotent:
importing or reloading peft_seft twice is harmless.
"""

from __future__ import annotations

from peft.utils import PeftType

SEFT_NAME = "SEFT"


def _add_enum_member(enum_cls: type, name: str) -> object:
    if name in enum_cls._member_map_:
        return enum_cls._member_map_[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member.__init__(name)
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13
        enum_cls._add_member_(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_map_[name] = member
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[name] = member
    if hasattr(enum_cls, "_hashable_values_"):
        enum_cls._hashable_values_.append(name)
    return member


SEFT_PEFT_TYPE = _add_enum_member(PeftType, SEFT_NAME)


def register_seft(config_cls: type, model_cls: type, prefix: str) -> None:
    """Register SEFT's config and tuner with PEFT's mappings (no-op when already registered)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if SEFT_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        # A reload creates new classes: point the registry at them so isinstance checks keep working.
        PEFT_TYPE_TO_CONFIG_MAPPING[SEFT_PEFT_TYPE] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[SEFT_PEFT_TYPE] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[SEFT_PEFT_TYPE] = prefix
        return
    register_peft_method(name=SEFT_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
