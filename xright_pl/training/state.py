"""What a checkpoint keeps of the module beyond its weights, and the checks when one is resumed.

The module's ``on_save_checkpoint`` / ``on_load_checkpoint`` hooks call :func:`save_state`,
:func:`drop_rebuilt_reference` and :func:`load_state`: the step and token counts per objective, where the reference
came from, the training RNG, the non-finite guard, the weights of the last step, the run's folders, objectives and
target weights. Resuming refuses a checkpoint trained on other objectives and warns about every changed setting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from xright_pl.core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["save_state", "drop_rebuilt_reference", "load_state", "check_resumed_objectives"]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a plain equality (tensors, ...)
        return repr(a) == repr(b)


def save_state(module: Any, run: dict[str, str] | None) -> dict[str, Any]:
    """``checkpoint["xright_pl"]``: the module's training state (``run``: the run's folders, see ``run_folders``)."""
    return {
        "steps": dict(module.steps),
        "tokens": dict(module.tokens),
        "reference_is_initial": module.reference_is_initial,
        "reference_reset": module._reference_reset,
        "rng": module.training_rng.state,
        "nonfinite_skips": module.nonfinite_guard.skips,
        "nonfinite_in_a_row": module.nonfinite_guard.in_a_row,
        "reevaluated_forwards": module.reevaluated_forwards,
        "last_weights": dict(module.accumulator.last_weights),
        "evaluations_untrained": dict(module.evaluations_untrained),
        "run": run,
        "objectives": {name: o.kind for name, o in module.objectives.items()},
        "weights": module.target(),
    }


def drop_rebuilt_reference(module: Any, state_dict: dict[str, Any]) -> None:
    """Leave the reference out of a checkpoint's ``state_dict`` when it is rebuilt from its source (the seeded config
    or the checkpoint path) on resume: stored only once it was reset to the policy (Sequential's stage start)."""
    if not module._reference_reset and (module.reference_is_initial or module.hparams.reference is not None):
        for key in [k for k in state_dict if k.startswith("reference.")]:
            del state_dict[key]


def check_resumed_objectives(module: Any, state: Mapping[str, Any]) -> None:
    """Refuse a checkpoint trained on other objectives; warn when the target's weights changed."""
    saved = list(state.get("objectives") or state.get("steps") or {})
    if saved and set(saved) != set(module.objectives):
        raise ConfigError(
            f"The checkpoint was trained on the objectives {', '.join(saved)}; this run has"
            f" {', '.join(module.objectives)}. Resume with the checkpoint's data sets (data.datasets / data.sft and"
            " data.preference), or start a new run in another --trainer.default_root_dir."
        )
    weights = state.get("weights")
    if isinstance(weights, dict) and module._trainer is not None and not _same(weights, module.target()):
        log.warning(
            "resuming with the target weights %r; the checkpoint was trained with %r. The run continues with the"
            " new weights, so it is no longer the run the checkpoint started.",
            module.target(), weights,
        )  # fmt: skip


def load_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """Restore what :func:`save_state` kept, warning about every ``model.*`` setting that differs from the
    checkpoint's; a reference left out of the checkpoint is the module's rebuilt one."""
    saved = checkpoint.get("hyper_parameters") or {}
    changed = [k for k in module.hparams if k in saved and not _same(saved[k], module.hparams[k])]
    for key in changed:
        log.warning(
            "resuming with model.%s = %r; the checkpoint was trained with %r. The run continues with the new"
            " value, so it is no longer the run the checkpoint started.",
            key, module.hparams[key], saved[key],
        )  # fmt: skip
    state = checkpoint.get("xright_pl", {})
    check_resumed_objectives(module, state)
    module.steps = dict(state.get("steps", module.steps))
    module.tokens = dict(state.get("tokens", module.tokens))
    module.reference_is_initial = state.get("reference_is_initial", module.reference_is_initial)
    module._reference_reset = state.get("reference_reset", module._reference_reset)
    module.training_rng.state = state.get("rng", module.training_rng.state)
    module.nonfinite_guard.skips = state.get("nonfinite_skips", 0)
    module.nonfinite_guard.in_a_row = state.get("nonfinite_in_a_row", 0)
    module.reevaluated_forwards = state.get("reevaluated_forwards", 0)
    module.accumulator.last_weights = dict(state.get("last_weights", {}))
    module.evaluations_untrained = dict(state.get("evaluations_untrained", {}))
    sd = checkpoint["state_dict"]
    if module.reference is not None and not any(k.startswith("reference.") for k in sd):
        sd.update({f"reference.{k}": v for k, v in module.reference.state_dict().items()})
