"""Helpers every other layer may use: the supported peft range, weight orientation and N:M patterns, and which
modules are adapted (and pruned) by default. Nothing here imports from the rest of peft_seft.

Keep this ``__init__`` empty: ``peft_seft/__init__.py`` imports ``utils.compat`` before anything from peft.
"""
