"""The peft versions peft-seft works with; importing this module fails early on any other."""

from __future__ import annotations

import peft
from packaging.specifiers import SpecifierSet

# Equal to the peft requirement in pyproject.toml (a test checks it). The upper bound: SEFTModel overrides PEFT's
# private hooks `_get_adapter_state_dict` and `_remap_adapter_state_dict_for_load` (the base fingerprint check and the
# saved gradient windows). They exist from 0.21 on, are not public API, and a new minor may rename or drop them, so an
# older peft would load an adapter onto the wrong base silently and a newer one is untested.
SUPPORTED_PEFT = ">=0.21.0,<0.22"


def check_peft_version(installed: str) -> None:
    """Raise ImportError naming the supported range when ``installed`` (a peft version) is outside it."""
    if not SpecifierSet(SUPPORTED_PEFT).contains(installed, prereleases=True):
        raise ImportError(
            f"peft-seft supports peft{SUPPORTED_PEFT}, but peft {installed} is installed. "
            f"Install a supported peft: pip install 'peft{SUPPORTED_PEFT}'"
        )


check_peft_version(peft.__version__)
