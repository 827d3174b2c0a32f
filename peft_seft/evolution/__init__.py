"""SEFT's evolution as plain tensor code (no model, no peft): one round for one layer (``rounds``), its N:M variant
(``nm_rounds``) and the gradient statistics of the selection window (``window``).

The optimizer-step driver that runs these rounds on a model's SEFT layers, and the Trainer callback, belong to the
tuner (``peft_seft.tuner.training``, ``peft_seft.tuner.callbacks``): ``SEFTModel`` installs the driver and the driver
walks ``SEFTLayer``s, so they cannot sit below it. See ARCHITECTURE.md.
"""
