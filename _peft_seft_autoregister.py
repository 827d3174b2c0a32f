"""Register SEFT with PEFT whenever ``peft`` is imported: a saved SEFT adapter loads without ``import peft_seft``.

peft has no plugin entry points: without registration every loading path (``PeftModel.from_pretrained``,
``AutoPeftModelFor*``, transformers' ``load_adapter``, tools that load adapters for you) fails with
``KeyError: 'SEFT'``. ``peft-seft-autoregister.pth``, installed next to this module, calls :func:`install` at
interpreter start. That only puts a finder on ``sys.meta_path`` (no import of torch or peft); the first
``import peft`` then imports peft_seft right after peft itself. ``PEFT_SEFT_NO_AUTOREGISTER=1`` turns it off.
This is a top-level module, not part of the package, because importing anything from peft_seft imports torch.
"""

from __future__ import annotations

import os
import sys

OFF_SWITCH = "PEFT_SEFT_NO_AUTOREGISTER"


class _PeftFinder:
    """A ``sys.meta_path`` finder: finds ``peft`` through the other finders, with a loader that registers SEFT once
    peft is loaded. (Not an importlib.abc subclass: importing that costs ~25 ms at every interpreter start.)"""

    _searching = False

    def find_spec(self, fullname, path, target=None):
        # Not one-shot: `importlib.util.find_spec("peft")` (transformers' is_peft_available) asks without importing.
        if fullname != "peft" or self._searching:
            return None
        import importlib.util

        self._searching = True
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        # peft is complete: give it back its own loader, then register (unless peft_seft is importing peft itself).
        module.__loader__ = module.__spec__.loader = self._loader
        if "peft_seft" not in sys.modules:
            _register()


def _register() -> None:
    try:
        import peft_seft  # noqa: F401  (registers SEFT)
    except Exception as error:  # a broken plugin must not break `import peft`
        import warnings

        warnings.warn(
            f"peft-seft could not register the PEFT method SEFT when peft was imported: {error!r}. "
            f"SEFT adapters will not load until `import peft_seft` works (set {OFF_SWITCH}=1 to silence this).",
            stacklevel=2,
        )


def install() -> None:
    """Arm the hook (called from the .pth file); no-op when turned off or already armed."""
    armed = any(isinstance(finder, _PeftFinder) for finder in sys.meta_path)
    if os.environ.get(OFF_SWITCH, "") in ("", "0") and not armed:
        sys.meta_path.insert(0, _PeftFinder())
