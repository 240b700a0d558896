"""Building the policy and the frozen reference (``build``), LoRA (``lora``). Imports ``core`` only.

The names of the former ``xright_pl.models`` module are re-exported here, so old paths such as
``xright_pl.models.ModelError`` keep working."""

from xright_pl.models.build import ModelError, build_causal_lm, disable_dropout, frozen_copy, setup_reference_model

__all__ = [
    "ModelError",
    "build_causal_lm",
    "disable_dropout",
    "frozen_copy",
    "setup_reference_model",
]
