"""Building the policy and the frozen reference."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from xright_pl.core.errors import XRightError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


class ModelError(XRightError):
    """A model could not be built from the given name, path or config."""


def _looks_local(name: str) -> bool:
    """Hub names are ``name`` or ``org/name``; anything else is a filesystem path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def build_causal_lm(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A causal LM from a hub name / local folder (pretrained weights) or from a config (random init).

    Args:
        name_or_path: ``AutoModelForCausalLM.from_pretrained`` argument.
        config: keyword arguments of ``AutoConfig.for_model`` (must contain ``model_type``), for a model
            with random weights initialised under ``seed``.
        seed: seed of the random initialisation (independent of the global RNG).
        dtype: ``float32`` / ``bfloat16`` / ``float16`` weights (None: the checkpoint's or float32).
        attn_implementation: e.g. ``sdpa`` or ``eager``.
        trust_remote_code: allow custom model code from the hub.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (name_or_path is None) == (config is None):
        raise ModelError("give exactly one of model (a hub name or local path) and model_config")
    if dtype not in _DTYPES:
        raise ModelError(f"dtype must be one of {sorted(k for k in _DTYPES if k)}, got {dtype!r}")
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if not model_type:
            raise ModelError(f"model_config needs a 'model_type' (e.g. 'llama', 'gpt_neox'), got {config}")
        try:
            hf_config = AutoConfig.for_model(model_type, **cfg)
        except ValueError as e:
            raise ModelError(f"model_config: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        if dtype:
            model = model.to(_DTYPES[dtype])
        return model
    path = os.path.expanduser(name_or_path)
    if _looks_local(name_or_path) and not os.path.exists(path):
        raise ModelError(
            f"model path {name_or_path!r} does not exist. Give a local folder written by save_pretrained"
            " (or by `python -m xright_pl export`), or a hub model name such as 'EleutherAI/pythia-1b'."
        )
    if dtype:
        kwargs["dtype"] = _DTYPES[dtype]
    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        raise ModelError(f"could not load model {name_or_path!r}: {e}") from None


def setup_reference_model(model: nn.Module) -> nn.Module:
    """Freeze ``model`` as a DPO reference: eval mode (no dropout), no gradients. Returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` for use as the reference."""
    return setup_reference_model(copy.deepcopy(model))


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
