"""The selector protocol: :class:`Selector`, :class:`Decision`, the target's weights, and helpers."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.callbacks import Callback

from xright_pl.core.errors import ConfigError

OBJECTIVES = ("sft", "dpo")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """What one optimizer step does.

    Attributes:
        weights: objective name (``"sft"`` or ``"dpo"``) to the weight of its loss in the backward pass.
            Objectives not listed are not trained this step (and their batch is not consumed).
        reset_optimizer: re-create the optimizer and LR scheduler before this step (Sequential's switch).
        reset_reference: make the DPO reference a frozen copy of the current policy before this step.
    """

    weights: Mapping[str, float]
    reset_optimizer: bool = False
    reset_reference: bool = False

    @property
    def branch(self) -> str:
        """``"sft"``, ``"dpo"`` or ``"mix"``."""
        return next(iter(self.weights)) if len(self.weights) == 1 else "mix"


@dataclass
class StepContext:
    """What a selector may read about the run (filled in by the module at setup)."""

    max_steps: int = -1
    """Total optimizer steps of the run (-1: unknown)."""
    steps_per_epoch: dict[str, int] = field(default_factory=dict)
    """Optimizer steps one epoch of each objective's data takes when trained alone."""


class Selector(Callback):
    """Base class. Subclasses implement :meth:`decide` (and :meth:`needs`/:meth:`observe` if they use losses)."""

    name: str = "selector"

    def __init__(self) -> None:
        self.lam: float | None = None
        self._weights: dict[str, float] | None = None
        self.context = StepContext()

    # --- wiring ---------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return f"xright_pl.{type(self).__qualname__}"

    def bind(self, lam: float | Mapping[str, float], context: StepContext | None = None) -> Selector:
        """Give the selector the target's weights (and facts about the run). Returns ``self``.

        ``lam`` is either the DPO weight of the two-objective target ``lam * f_dpo + (1 - lam) * f_sft`` or, for
        any number of objectives, the weights ``{name: lambda_k}`` of ``sum_k lambda_k f_k`` (non-negative, summing
        to 1, in the data sets' order). ``lam`` and ``{"sft": 1 - lam, "dpo": lam}`` are the same target.
        """
        if isinstance(lam, Mapping):
            self._weights = check_weights(lam)
            self.lam = self._weights["dpo"] if set(self._weights) == set(OBJECTIVES) else None
        else:
            check_lam(lam)
            self.lam = float(lam)
            self._weights = {"sft": 1.0 - self.lam, "dpo": self.lam}
        if context is not None:
            self.context = context
        return self

    @property
    def weights(self) -> dict[str, float]:
        """The target's weight of each objective, ``{name: lambda_k}`` (``{"sft": 1 - lam, "dpo": lam}``)."""
        if self._weights is None:
            raise RuntimeError(f"{type(self).__name__} has no weights: call bind(lam) (the module does this).")
        return dict(self._weights)

    def objectives(self) -> tuple[str, ...]:
        """The objective names, in the target's order."""
        return tuple(self.weights)

    def _one_objective(self) -> str | None:
        """The only objective with a positive weight, if only one has (then every method trains only it)."""
        positive = [k for k, w in self.weights.items() if w > 0]
        return positive[0] if len(positive) == 1 else None

    def _lam(self) -> float:
        if self.lam is None:
            raise RuntimeError(f"{type(self).__name__} has no lam: call bind(lam) (the module does this).")
        return self.lam

    # --- protocol -------------------------------------------------------------------------------------
    def needs(self, step: int) -> tuple[str, ...]:
        """Objectives whose current-batch loss must be computed before :meth:`decide` at ``step``."""
        return ()

    def decide(self, step: int, losses: Mapping[str, float]) -> Decision:
        """Decide optimizer step ``step`` (0-based) given the losses asked for by :meth:`needs`."""
        raise NotImplementedError

    def observe(self, step: int, decision: Decision, losses: Mapping[str, float]) -> None:
        """Receive the pre-update loss of each objective trained at ``step``."""

    def final_step(self) -> int | None:
        """The number of optimizer steps after which the algorithm is done (the run stops there, or at the
        Trainer's ``max_steps`` if sooner); ``None``: run to ``max_steps``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    # A stateless selector (Mix, Single) stores no callback state: the selector's name is stored on its own, so
    # that resuming with another one is refused instead of silently starting the other's state from scratch.
    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.state_key

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:  # older checkpoints: the state of a stateful selector names it
            found = [k for k in checkpoint.get("callbacks", {}) if k in _STATEFUL_KEYS]
            saved = found[0] if len(found) == 1 else None
        if saved is not None and saved != self.state_key:
            raise ConfigError(
                f"The checkpoint was trained with the selector {saved}, this run uses {self.state_key}: the"
                f" {saved} state (its generator, tracked losses or stage) would not be loaded, and the run would"
                f" not continue the checkpoint's. Resume with the {saved} config (--model.selector {saved}), or"
                " start a new run in another --trainer.default_root_dir."
            )

    def describe(self) -> str:
        """One line for summaries and logs."""
        return type(self).__name__.lower()

    def given_optimum(self) -> Any:
        """The optima this selector was configured with (an ``Optimum`` or ``OptimumK`` of
        :mod:`xright_pl.core.optimum`), else None: what :attr:`XRightModule.optimum <xright_pl.XRightModule.optimum>`
        falls back to."""
        return None


def selector_of(pl_module: Any) -> Selector | None:
    """The selector of a module (its public ``selector``), or None when it has none (another module, or no
    selector configured): what callbacks read instead of scanning ``trainer.callbacks``."""
    try:
        selector = getattr(pl_module, "selector", None)
    except (ConfigError, RuntimeError):  # XRightModule without a selector
        return None
    return selector if isinstance(selector, Selector) else None


CHECKPOINT_KEY = "xright_pl_selector"
_STATEFUL_KEYS = ("xright_pl.Alright", "xright_pl.Maxright", "xright_pl.Sequential")


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The weights ``{name: lambda_k}`` as floats, or a :class:`ConfigError` naming what is wrong."""
    problems = []
    if len(weights) < 1:
        problems.append("no objectives")
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            problems.append(f"{name}: {w!r} (must be a number >= 0)")
    if not problems and abs(sum(weights.values()) - 1.0) > 1e-6:
        problems.append(f"they sum to {sum(weights.values()):g}, not 1")
    if problems:
        raise ConfigError("objective weights: " + "; ".join(problems) + ". Give each data set a weight; they sum to 1.")
    return {str(k): float(w) for k, w in weights.items()}


def draw(weights: Mapping[str, float], u: float) -> str:
    """The objective whose interval holds ``u`` in [0, 1), intervals of lengths ``weights`` laid out from the last
    objective to the first (``{"sft": 1 - lam, "dpo": lam}``: DPO when ``u < lam``). Zero weights are never drawn."""
    names = [k for k in reversed(list(weights)) if weights[k] > 0]
    total = 0.0
    for name in names:
        total += weights[name]
        if u < total:
            return name
    return names[-1]  # u within rounding of 1


def check_lam(lam: float) -> None:
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not (0.0 <= float(lam) <= 1.0):
        raise ConfigError(
            f"lam must be a number in [0, 1] (the weight of the DPO objective, and ALRIGHT's probability of a"
            f" DPO step), got {lam!r}. Set it with --model.lam 0.5."
        )
