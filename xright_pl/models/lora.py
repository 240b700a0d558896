"""LoRA through ``peft``: the policy is the base model plus adapters; the reference is the same model with the
adapters disabled, so one base model is held in memory instead of two.

With LoRA, :class:`~xright_pl.XRightModule` keeps no separate reference module:
``reference_logps`` runs the policy under :func:`reference_mode` (adapters off, eval mode, no grad). At a
Sequential switch with ``reference="stage_start"``, :func:`fold_adapters` adds the adapters' update into the
base weights and restarts the adapters from zero, so stage two trains on top of stage one's changes and its
reference is the stage-one result (the paper's code chained adapters and lost stage one's update).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from xright_pl.core.errors import ConfigError


@dataclass
class LoraSettings:
    """Low-rank adapters on the policy (``peft.LoraConfig``)."""

    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: the update is ``(alpha / r) * B @ A``."""
    target_modules: list[str] | None = None
    """Names (suffixes) of the linear layers that get adapters, e.g. ``[q_proj, v_proj]`` (Llama) or
    ``[query_key_value]`` (GPT-NeoX); ``[all-linear]`` for every linear layer but the output head; None: peft's
    default for the architecture."""
    dropout: float = 0.0
    """Dropout on the adapter input (training only; the reference never uses adapters)."""
    bias: str = "none"
    """Which biases train: ``none``, ``all`` or ``lora_only``."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. ``[lm_head]``)."""

    def problems(self) -> list[str]:
        """Every invalid field, as messages naming the ``--model.lora.*`` option."""
        out = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            out.append(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha > 0:
            out.append(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            out.append(f"lora.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.target_modules is not None and not self.target_modules:
            out.append("lora.target_modules must name at least one module (or be null for peft's default)")
        return out


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model`` in a ``peft`` model with fresh adapters; only adapter (and ``modules_to_save``) weights
    train. Raises :class:`ConfigError` when the target modules do not exist in the model."""
    from peft import LoraConfig, get_peft_model

    problems = settings.problems()
    if problems:
        raise ConfigError("Invalid LoRA settings:\n  - " + "\n  - ".join(problems))
    targets = settings.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        target_modules=targets,
        lora_dropout=settings.dropout,
        bias=settings.bias,
        modules_to_save=list(settings.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"LoRA could not be applied ({e}). Set --model.lora.target_modules to names of linear layers of this"
            f" model; it has: {linear}."
        ) from None


def is_lora(model: nn.Module | None) -> bool:
    """Whether ``model`` is a ``peft`` model (adapters attached)."""
    return model is not None and hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The base model of a LoRA policy as the DPO reference: adapters off, eval mode (no dropout), no grad.
    The training mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of ``model``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def fold_adapters(model: nn.Module) -> int:
    """Add each active adapter's update ``(alpha / r) * B @ A`` into its base weight, then re-initialise the
    adapter (``B = 0``), so the model computes the same function and "adapters disabled" is now this model.
    Returns the number of layers folded."""
    layers = lora_layers(model)
    for layer in layers:
        base = layer.get_base_layer()
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            base.weight.add_(layer.get_delta_weight(name).to(base.weight.dtype))
            layer.reset_lora_parameters(name, True)
    return len(layers)


def merged_model(model: nn.Module) -> nn.Module:
    """A plain ``transformers`` model with the adapters merged into the weights (modifies ``model``)."""
    return model.merge_and_unload()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable": ..., "total": ...}`` parameter counts (each tensor counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return {
        "trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
        "total": sum(p.numel() for p in seen.values()),
    }
