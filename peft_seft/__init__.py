"""peft-seft: SEFT (Sparsity Evolution Fine-Tuning) as a Hugging Face PEFT method.

``import peft_seft`` registers the PEFT type ``SEFT``; afterwards ``get_peft_model(model, SEFTConfig(...))``,
``PeftModel.from_pretrained`` and TRL's ``SFTTrainer(peft_config=SEFTConfig(...))`` work as for LoRA, and
the mask evolves during training in any loop that calls ``optimizer.step()``.
"""

from . import compat  # noqa: F401  (before anything from peft: fails early, naming the supported peft range)
from .callbacks import SEFTCallback, install_default_callback
from .config import SEFTConfig
from .layer import SEFTLayer, SEFTLinear
from .model import SEFTModel
from .registration import SEFT_PEFT_TYPE, register_seft

__version__ = "0.2.0.dev0"

register_seft(SEFTConfig, SEFTModel, prefix=SEFTModel.prefix)
install_default_callback()

__all__ = ["SEFT_PEFT_TYPE", "SEFTCallback", "SEFTConfig", "SEFTLayer", "SEFTLinear", "SEFTModel"]
