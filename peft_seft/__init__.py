"""peft-seft: SEFT (Sparsity Evolution Fine-Tuning) as a Hugging Face PEFT method.

``import peft_seft`` (and, once the package is installed, any ``import peft``) registers the PEFT type ``SEFT``;
then ``get_peft_model(model, SEFTConfig(...))``, ``PeftModel.from_pretrained`` and TRL's
``SFTTrainer(peft_config=SEFTConfig(...))`` work as for LoRA, and the mask evolves during training in any loop that
calls ``optimizer.step()``.
"""

from .utils import compat  # noqa: F401  (before anything from peft: fails early, naming the supported peft range)

# isort: split
from .tuner.cards import install_model_card_hook
from .tuner.config import SEFTConfig
from .tuner.layer import SEFTLayer, SEFTLinear
from .tuner.model import SEFTModel
from .tuner.registration import SEFT_PEFT_TYPE, register_seft

__version__ = "0.2.0.dev0"

register_seft(SEFTConfig, SEFTModel, prefix=SEFTModel.prefix)
install_model_card_hook()


def __getattr__(name: str) -> type:
    # SEFTCallback is imported on first use: transformers' trainer modules import peft while they are half-initialised,
    # and when that import of peft registers SEFT (see _peft_seft_autoregister), importing them here would be circular.
    if name == "SEFTCallback":
        from .tuner.callbacks import SEFTCallback

        return SEFTCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SEFT_PEFT_TYPE", "SEFTCallback", "SEFTConfig", "SEFTLayer", "SEFTLinear", "SEFTModel"]
