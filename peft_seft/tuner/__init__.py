"""The SEFT PEFT method, laid out as PEFT lays out its tuners (``peft/tuners/lora/{config,layer,model}.py``).

- ``config``: ``SEFTConfig``; ``registration``: makes "SEFT" a PEFT type; ``trl_args``: its TRL script form;
- ``layer``: ``SEFTLayer``/``SEFTLinear``, with the linear operation in ``sparse_ops`` and ``value_grad``;
- ``model``: ``SEFTModel``, with ``fingerprint`` and ``validation`` guarding save and load;
- ``training``: the optimizer-step hook that runs the evolution rounds; ``callbacks``: the Trainer integration;
- ``cards``: the adapter's model card.

``callbacks`` is not imported here (see ``peft_seft.__getattr__``).
"""

from .config import SEFTConfig
from .layer import SEFTLayer, SEFTLinear
from .model import SEFTModel

__all__ = ["SEFTConfig", "SEFTLayer", "SEFTLinear", "SEFTModel"]
