"""What is wrong with the settings of :class:`~xright_pl.XRightModule`, checked once in its constructor.

Every problem is collected before anything is built, so a config with several mistakes gets them all in one
message, each naming its option (``--model.beta``, ``--model.optimizer.init_args.lr``, ...), and a setting torch
would refuse only later (a negative learning rate) is found at start instead of as a traceback from
``configure_optimizers``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from xright_pl.core.errors import ConfigError
from xright_pl.objectives.losses import PREFERENCE_LOSSES
from xright_pl.selectors import Selector, check_lam

__all__ = ["check_settings", "optimizer_problems"]


def check_settings(
    *,
    lam: Any,
    beta: Any,
    accumulate_grad_batches: Any,
    gradient_clip_val: Any,
    model: Any,
    model_config: Any,
    selector: Any,
    lora: Any,
    max_consecutive_nonfinite: Any,
    loss_type: Any,
    label_smoothing: Any,
    simpo_gamma: Any,
    precompute_reference_logps: bool,
    optimizer: Any,
) -> None:
    """Raise one :class:`~xright_pl.core.errors.ConfigError` listing every invalid setting (one line for one)."""
    problems = []
    try:
        check_lam(lam)
    except ConfigError as e:
        problems.append(str(e))
    if not (isinstance(beta, (int, float)) and beta > 0):
        problems.append(f"beta must be > 0, got {beta!r}")
    if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
        problems.append(f"accumulate_grad_batches must be an integer >= 1, got {accumulate_grad_batches!r}")
    if gradient_clip_val is not None and not gradient_clip_val > 0:
        problems.append(f"gradient_clip_val must be > 0 or null, got {gradient_clip_val!r}")
    if (model is None) == (model_config is None):
        problems.append("give exactly one of --model.model (hub name or path) and --model.model_config")
    if selector is not None and not isinstance(selector, Selector):
        problems.append(f"selector must be an xright_pl Selector, got {type(selector).__name__}")
    if lora is not None:
        problems.extend(lora.problems())
    if not isinstance(max_consecutive_nonfinite, int) or max_consecutive_nonfinite < 1:
        problems.append(f"max_consecutive_nonfinite must be an integer >= 1, got {max_consecutive_nonfinite!r}")
    problems.extend(_preference_loss_problems(loss_type, label_smoothing, simpo_gamma, precompute_reference_logps))
    problems.extend(optimizer_problems(optimizer))
    if len(problems) == 1:
        raise ConfigError(f"invalid XRightModule setting: {problems[0]}")
    if problems:
        raise ConfigError("Invalid XRightModule settings:\n  - " + "\n  - ".join(problems))


#: Words of torch's optimizer errors -> the argument they are about.
_OPTIMIZER_ARGS = (
    ("learning rate", "lr"), ("epsilon", "eps"), ("beta", "betas"), ("weight_decay", "weight_decay"),
    ("momentum", "momentum"), ("dampening", "dampening"), ("alpha", "alpha"), ("lr_decay", "lr_decay"),
)  # fmt: skip


def optimizer_problems(optimizer: Any) -> list[str]:
    """Build the optimizer once on a dummy parameter, so that a setting torch refuses (``lr: -1``) is reported
    at start, naming its option, instead of a traceback from ``configure_optimizers`` after the run began."""
    if not callable(optimizer):
        return [f"optimizer must be an optimizer class or factory, got {optimizer!r} (--model.optimizer)"]
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as e:
        message = str(e).strip().rstrip(".")
        arg = next((a for words, a in _OPTIMIZER_ARGS if words in message.lower()), None)
        if arg is None:
            return []  # not about a setting (e.g. Muon takes 2-D parameters only): checked when the run builds it
        return [f"--model.optimizer.init_args.{arg}: the optimizer ({_class_name(optimizer)}) refuses it: {message}"]
    except Exception:  # an optimizer that cannot be built on a dummy parameter: it is checked when the run builds it
        return []
    return []


def _class_name(factory: Any) -> str:
    """``torch.optim.AdamW`` for the class or for the partial of it that jsonargparse gives."""
    for candidate in (factory, getattr(factory, "func", None), *getattr(factory, "args", ())[:2]):
        if isinstance(candidate, type):
            return f"{candidate.__module__}.{candidate.__qualname__}"
    return type(factory).__name__


def _preference_loss_problems(
    loss_type: Any, label_smoothing: Any, simpo_gamma: Any, precompute_reference_logps: bool
) -> list[str]:
    """What is wrong with the preference-loss settings (``loss_type``, ``label_smoothing``, ``simpo_gamma``)."""
    problems = []
    spec = PREFERENCE_LOSSES.get(loss_type) if isinstance(loss_type, str) else None
    if spec is None:
        problems.append(
            f"loss_type must be one of {', '.join(PREFERENCE_LOSSES)}; got {loss_type!r} (set --model.loss_type)"
        )
    if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 0.5):
        problems.append(
            f"label_smoothing must be a number in [0, 0.5), got {label_smoothing!r} (--model.label_smoothing)"
        )
    elif spec is not None and label_smoothing and not spec.uses_label_smoothing:
        users = ", ".join(k for k, v in PREFERENCE_LOSSES.items() if v.uses_label_smoothing)
        problems.append(
            f"label_smoothing={label_smoothing} has no effect with loss_type {loss_type!r}: set"
            f" --model.label_smoothing 0, or use one of {users}"
        )
    if not (isinstance(simpo_gamma, (int, float)) and math.isfinite(simpo_gamma) and simpo_gamma >= 0):
        problems.append(f"simpo_gamma must be a finite number >= 0, got {simpo_gamma!r} (--model.simpo_gamma)")
    if spec is not None and precompute_reference_logps and not spec.needs_reference:
        problems.append(
            f"precompute_reference_logps needs a reference model, but loss_type {loss_type!r} is reference-free:"
            " there is nothing to precompute; set --model.precompute_reference_logps false"
        )
    return problems
