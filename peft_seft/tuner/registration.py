"""Make "SEFT" a PEFT method from outside the peft package.

PEFT only registers names that are members of its `PeftType` enum, and `adapter_config.json` is looked
up with the plain string, so the member's name and value must both be "SEFT". Enums cannot be
subclassed; `aenum.extend_enum` (maintained by the author of the stdlib enum) adds the member without
touching the enum's internal tables ourselves, which differ between Python versions (only 3.11 is tested
here). Everything here is idempotent: importing or reloading peft_seft twice is harmless.
"""

from __future__ import annotations

from aenum import extend_enum
from peft.utils import PeftType

SEFT_NAME = "SEFT"


def _add_enum_member(enum_cls: type, name: str) -> object:
    if name not in enum_cls.__members__:  # extend_enum refuses a name it already added
        extend_enum(enum_cls, name, name)
    return enum_cls[name]


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
