"""Selectors: the algorithms that decide which objective each optimizer step trains.

A selector is a small :class:`~lightning.pytorch.callbacks.Callback` with its own seeded state and a
``state_dict``, so a resumed run continues the exact same sequence of decisions. The module asks it at
the first micro-batch of every optimizer step (see :meth:`xright_pl.module.XRightModule.training_step`):

1. :meth:`Selector.needs` names the objectives whose loss on the current batches it wants to see before
   deciding (MAXRIGHT on its evaluation steps; nothing for the others);
2. :meth:`Selector.decide` returns a :class:`Decision`: the weight of each objective in this step's
   backward pass (``{"dpo": 1.0}`` for a DPO step, ``{"sft": 1 - lam, "dpo": lam}`` for Mix) and whether
   the optimizer (and the DPO reference) must be re-created first;
3. after the optimizer step, :meth:`Selector.observe` receives the pre-update loss of each trained objective.

Every input to a decision is identical on every process (a generator seeded the same everywhere; losses
averaged across processes by the module before they reach the selector), so all ranks take the same branch
by construction. A new algorithm is a new subclass; the module does not change.

``lam`` is the weight of the DPO objective in the target ``lam * f_dpo + (1 - lam) * f_sft``. It belongs to
the module (``--model.lam``), which hands it to its selector with :meth:`Selector.bind`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback

from xright_pl.errors import ConfigError
from xright_pl.optimum import Optimum, load_optimum

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


class Alright(Selector):
    """ALRIGHT: each optimizer step trains DPO with probability ``lam``, else SFT; with K objectives, objective k
    with probability ``lambda_k``.

    One uniform draw ``u`` per step: the objectives' intervals of lengths ``lambda_k`` are laid out from the last
    objective to the first, so for the pair ``u < lam`` is a DPO step, as it always was.

    The draw comes from a generator owned by this callback and seeded with ``seed``; every process holds
    the same generator, so every process takes the same branch, and the generator's state is saved in
    checkpoints.

    Args:
        seed: seed of the Bernoulli draws (same on every process).
    """

    name = "alright"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def decide(self, step: int, losses: Mapping[str, float]) -> Decision:
        u = torch.rand((), generator=self.generator).item()
        return Decision({draw(self.weights, u): 1.0})

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.generator.set_state(state_dict["generator"])

    def describe(self) -> str:
        return f"alright(seed={self.seed})"


class Maxright(Selector):
    """MAXRIGHT: train the objective with the larger weighted gap to its optimum.

    DPO is trained when ``lam * (f_dpo - f_dpo_star) >= (1 - lam) * (f_sft - f_sft_star)``, else SFT; with K
    objectives, the one with the largest ``lambda_k (f_k - f_k*)`` (ties: the later objective). The
    losses ``f`` are tracked values: every ``eval_every`` optimizer steps (and at step 0) both objectives are
    evaluated on their current batches; in between, only the objective just trained is refreshed, from its
    own pre-update batch loss. ``eval_every=1`` is exact MAXRIGHT; the paper's runs use 10. With gradient
    accumulation an evaluation looks at the step's first micro-batch of each objective, and the refresh at the
    step's token-weighted mean over all of them. At ``lam`` 0 or 1 the target is one objective, and MAXRIGHT
    trains only that one (as ALRIGHT, Mix and Sequential do), whatever the gaps.

    Memory: on an evaluation step the module evaluates the objective trained at the previous step with its
    graph and the other one without (``no_grad``), so the peak is one graph, as on any other step. Only when
    the decision switches to the other objective is its forward run again with a graph (counted in
    ``summary.json`` as ``reevaluated_forwards``).

    The optima must use exactly the loss normalisation of training (token-mean NLL for SFT, pair-mean sigmoid
    DPO loss), e.g. the final validation losses of SFT-only and DPO-only runs from the same start: give them
    as ``optimum_file`` (written by ``python -m xright_pl optimum``) or as ``f_sft_star`` and ``f_dpo_star``.

    With neither, the optima are estimated online: ``f_i* = (1 - online_margin) * min_v val_i(v)``, the running
    minimum of this run's validation loss ``val/sft_loss`` resp. ``val/dpo_loss`` over the validations so far
    (sanity checks excluded), lowered by the relative margin; before the first validation ``f_i* = 0``, a
    valid lower bound of both losses (so the first decisions compare ``lam * f_dpo`` with
    ``(1 - lam) * f_sft``). The estimate changes only at validations, which are identical on every process.

    Args:
        f_sft_star: optimum (lowest reachable) SFT loss.
        f_dpo_star: optimum (lowest reachable) DPO loss.
        eval_every: re-evaluate both losses every this many optimizer steps (k >= 1).
        optimum_file: JSON file with ``f_sft_star`` and ``f_dpo_star`` (instead of the two numbers).
        online_margin: relative margin of the online estimate (used only without given optima), in [0, 1).
        f_star: the optima of any number of objectives, ``{name: f_k*}`` (instead of the pair's numbers).
    """

    name = "maxright"

    def __init__(
        self,
        f_sft_star: float | None = None,
        f_dpo_star: float | None = None,
        eval_every: int = 10,
        optimum_file: str | None = None,
        online_margin: float = 0.1,
        f_star: dict[str, float] | None = None,
    ):
        super().__init__()
        problems = []
        given = (f_sft_star is not None, f_dpo_star is not None)
        if f_star is not None and (any(given) or optimum_file is not None):
            problems.append("give f_star or f_sft_star/f_dpo_star/optimum_file, not both")
        for nm, v in (f_star or {}).items():
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                problems.append(f"f_star[{nm!r}] must be a finite number, got {v!r}")
        if any(given) and not all(given):
            problems.append(
                "MAXRIGHT needs both optima: set --model.selector.init_args.f_sft_star and f_dpo_star"
                " (the final validation losses of an SFT-only and a DPO-only run from the same start), or"
                " optimum_file, or neither for the online estimate"
            )
        if any(given) and optimum_file is not None:
            problems.append("give optimum_file or f_sft_star/f_dpo_star, not both")
        for nm, v in (("f_sft_star", f_sft_star), ("f_dpo_star", f_dpo_star)):
            if v is not None and not math.isfinite(float(v)):
                problems.append(f"{nm} must be a finite number, got {v!r}")
        if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1:
            problems.append(f"eval_every (k) must be an integer >= 1, got {eval_every!r}")
        if not isinstance(online_margin, (int, float)) or not (0.0 <= online_margin < 1.0):
            problems.append(f"online_margin must be in [0, 1), got {online_margin!r}")
        if problems:
            raise ConfigError("Invalid MAXRIGHT settings: " + "; ".join(problems) + ".")
        self.optimum = load_optimum(optimum_file) if optimum_file is not None else None
        if all(given):
            self.optimum = Optimum(float(f_sft_star), float(f_dpo_star))
        self.given_star = {str(k): float(v) for k, v in f_star.items()} if f_star else None
        self.optimum_file = optimum_file
        self.online_margin = float(online_margin)
        self.val_min: dict[str, float] = {}
        self.eval_every = eval_every
        self.values: dict[str, float] = {}
        self.evaluations = 0

    @property
    def online(self) -> bool:
        """True when the optima are estimated online (none were given)."""
        return self.optimum is None and self.given_star is None

    @property
    def f_star(self) -> dict[str, float]:
        """The optima in use: the given ones, or the online estimate (see the class docstring)."""
        if self.optimum is not None:
            return {"sft": self.optimum.f_sft, "dpo": self.optimum.f_dpo}
        if self.given_star is not None:
            return dict(self.given_star)
        names = self.objectives() if self._weights is not None else OBJECTIVES
        return {k: (1.0 - self.online_margin) * self.val_min[k] if k in self.val_min else 0.0 for k in names}

    def observe_validation(self, losses: Mapping[str, float]) -> None:
        """Feed the online estimate one validation's losses (``{"sft": ..., "dpo": ...}``)."""
        names = self.objectives() if self._weights is not None else OBJECTIVES
        for k, v in losses.items():
            if k in names and math.isfinite(float(v)):
                self.val_min[k] = min(self.val_min.get(k, math.inf), float(v))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.optimum is not None and hasattr(pl_module, "beta"):
            self.optimum.check_beta(pl_module.beta)
        max_steps = trainer.max_steps
        if self._weights is not None and self.given_star is not None:
            missing = [k for k in self.objectives() if k not in self.given_star]
            if missing:
                raise ConfigError(f"Maxright f_star has no optimum for {', '.join(missing)}: give one per objective")
        several = self._weights is None or self._one_objective() is None
        if max_steps is not None and 0 < max_steps <= self.eval_every and several:
            log.warning(
                "Maxright: eval_every=%d is not smaller than max_steps=%d, so both losses are evaluated only at"
                " step 0; after that each tracked loss is refreshed only from its own training steps (a stale value"
                " for the objective not trained). Lower eval_every (1 = exact MAXRIGHT, the paper uses 10).",
                self.eval_every, max_steps,
            )  # fmt: skip

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.online and not trainer.sanity_checking:
            m = trainer.callback_metrics
            names = self.objectives() if self._weights is not None else OBJECTIVES
            self.observe_validation({k: float(m[f"val/{k}_loss"]) for k in names if f"val/{k}_loss" in m})

    def gaps(self) -> dict[str, float]:
        """Weighted gaps ``{name: lambda_k (f_k - f_k*)}`` of the tracked values (the pair:
        ``{"sft": (1-lam)(f_sft - f*), "dpo": lam (f_dpo - f*)}``)."""
        f_star = self.f_star
        return {k: w * (self.values[k] - f_star[k]) for k, w in self.weights.items() if w > 0}

    def needs(self, step: int) -> tuple[str, ...]:
        if self._one_objective() is not None:
            return ()  # one objective has all the weight: nothing to compare
        names = tuple(k for k, w in self.weights.items() if w > 0)
        if step % self.eval_every == 0 or any(k not in self.values for k in names):
            return names
        return ()

    def decide(self, step: int, losses: Mapping[str, float]) -> Decision:
        only = self._one_objective()
        if only is not None:  # the target is one objective (as for ALRIGHT, Mix and Sequential at the ends)
            return Decision({only: 1.0})
        if losses:
            self.values.update({k: float(v) for k, v in losses.items()})
            self.evaluations += 1
        g = self.gaps()
        best = None
        for name in reversed(list(g)):  # the later objective wins a tie (the pair: DPO when the gaps are equal)
            if best is None or g[name] > g[best]:
                best = name
        return Decision({best: 1.0})

    def observe(self, step: int, decision: Decision, losses: Mapping[str, float]) -> None:
        self.values.update({k: float(v) for k, v in losses.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values), "evaluations": self.evaluations, "val_min": dict(self.val_min)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.values = dict(state_dict["values"])
        self.evaluations = state_dict["evaluations"]
        self.val_min = dict(state_dict.get("val_min", {}))

    def describe(self) -> str:
        if self.online:
            return f"maxright(k={self.eval_every}, f* online: running min of val losses, margin {self.online_margin})"
        if self.given_star is not None:
            stars = ", ".join(f"{k}*={v:.4g}" for k, v in self.given_star.items())
            return f"maxright(k={self.eval_every}, {stars})"
        return f"maxright(k={self.eval_every}, f_sft*={self.f_star['sft']:.4g}, f_dpo*={self.f_star['dpo']:.4g})"


class Sequential(Selector):
    """Sequential baseline: all steps of one objective, then all of the other.

    The switch step is ``switch_step`` if given, else ``switch_epochs`` epochs of the first objective's data,
    else the split that matches ``lam = T_dpo / (T_sft + T_dpo)`` of the run's ``max_steps``. At the switch
    the optimizer and LR scheduler are re-created, and the DPO reference is either kept (``initial``, the
    paper's choice) or replaced by the policy as it stands (``stage_start``, common SFT -> DPO practice).

    Args:
        first: objective trained first, ``sft`` or ``dpo``.
        switch_step: optimizer step at which the second stage starts.
        switch_epochs: length of the first stage in epochs of its own data (used when switch_step is None).
        second_epochs: length of the second stage in epochs of its own data; the run ends there (or at
            ``max_steps`` if sooner). None: the second stage runs until ``max_steps``.
        reference: DPO reference in the second stage: ``initial`` or ``stage_start``.
        stages: with any number of objectives: the objective names in the order they are trained, one stage
            each (instead of ``first``). Stage k lasts ``lambda_k / sum(stage weights)`` of ``max_steps`` (rounded
            at the cumulative boundaries), or ``stage_steps[k]`` steps. The optimizer is re-created at every
            switch; the reference stays the initial model.
        stage_steps: with ``stages``: the lengths in optimizer steps of every stage but the last.
    """

    name = "sequential"

    def __init__(
        self,
        first: Literal["sft", "dpo"] = "sft",
        switch_step: int | None = None,
        switch_epochs: float | None = None,
        reference: Literal["initial", "stage_start"] = "initial",
        second_epochs: float | None = None,
        stages: list[str] | None = None,
        stage_steps: list[int] | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if stages is not None:
            if len(stages) < 1 or len(set(stages)) != len(stages) or not all(isinstance(x, str) for x in stages):
                problems.append(f"stages must be distinct objective names, got {stages!r}")
            if switch_step is not None or switch_epochs is not None or second_epochs is not None:
                problems.append("with stages, give the stage lengths as stage_steps (not switch_step/…_epochs)")
            if reference != "initial":
                problems.append("with stages, the reference stays the initial model (reference: initial)")
            n = len(stages) - 1
            if stage_steps is not None and (
                len(stage_steps) != n or not all(isinstance(x, int) and x >= 0 for x in stage_steps)
            ):
                problems.append(f"stage_steps must be {n} integers >= 0 (all stages but the last), got {stage_steps!r}")
        elif stage_steps is not None:
            problems.append("stage_steps needs stages")
        if first not in OBJECTIVES:
            problems.append(f"first must be 'sft' or 'dpo', got {first!r}")
        if switch_step is not None and (not isinstance(switch_step, int) or switch_step < 0):
            problems.append(f"switch_step must be an integer >= 0, got {switch_step!r}")
        if switch_epochs is not None and not (switch_epochs >= 0):
            problems.append(f"switch_epochs must be >= 0, got {switch_epochs!r}")
        if second_epochs is not None and not (second_epochs >= 0):
            problems.append(f"second_epochs must be >= 0, got {second_epochs!r}")
        if reference not in ("initial", "stage_start"):
            problems.append(f"reference must be 'initial' or 'stage_start', got {reference!r}")
        if problems:
            raise ConfigError("Invalid Sequential settings: " + "; ".join(problems) + ".")
        self.first = first
        self.second = "dpo" if first == "sft" else "sft"
        self.switch_step = switch_step
        self.switch_epochs = switch_epochs
        self.second_epochs = second_epochs
        self.reference = reference
        self.stages = list(stages) if stages is not None else None
        self.stage_steps = list(stage_steps) if stage_steps is not None else None
        self.stage_starts: list[int] = []  # with stages: the steps stages 2, 3, ... started (kept across resumes)
        self.switched_at: int | None = None  # the step the second stage started (kept across resumes)
        self._saved_boundary: int | None = None  # the switch step planned when the checkpoint was written

    def _epochs_to_steps(self, objective: str, epochs: float, arg: str) -> int:
        per_epoch = self.context.steps_per_epoch.get(objective)
        if not per_epoch:
            raise ConfigError(
                f"Sequential({arg}=...) needs the {objective} data's steps per epoch, which the module learns from"
                " its JointDataModule when training starts; with other data give the stage length in steps"
                " (switch_step, and --trainer.max_steps for the end)."
            )
        return round(epochs * per_epoch)

    def bind(self, lam: float | Mapping[str, float], context: StepContext | None = None) -> Selector:
        super().bind(lam, context)
        if self.stages is not None:
            unknown = [k for k in self.stages if k not in self.weights]
            if unknown:
                raise ConfigError(
                    f"Sequential stages {', '.join(unknown)}: the run has no such objective (it has"
                    f" {', '.join(self.weights)})"
                )
            return self
        known = self.context.steps_per_epoch or (self.switch_epochs is None and self.second_epochs is None)
        if known and self.switched_at is None and self._saved_boundary not in (None, self.boundary()):
            log.warning(
                "Sequential: the switch to %s moves from step %d (when the checkpoint was written) to step %d"
                " (from the resumed run's settings: max_steps, lam or the stage lengths).",
                self.second, self._saved_boundary, self.boundary(),
            )  # fmt: skip
        max_steps = self.context.max_steps
        if known and max_steps is not None and max_steps > 0 and self.boundary() >= max_steps:
            log.warning(
                "Sequential: the %s stage lasts %d optimizer steps, and the run has max_steps=%d: the %s stage"
                " gets no step. Shorten the first stage (switch_step / switch_epochs) or raise --trainer.max_steps.",
                self.first, self.boundary(), max_steps, self.second,
            )  # fmt: skip
        return self

    def stage_boundaries(self) -> list[int]:
        """With ``stages``: the optimizer steps at which stages 2, 3, ... start (started ones as they happened)."""
        if self.stage_steps is not None:
            planned = [sum(self.stage_steps[: i + 1]) for i in range(len(self.stage_steps))]
        else:
            max_steps = self.context.max_steps
            if max_steps is None or max_steps < 0:
                raise ConfigError("Sequential(stages=...) needs --trainer.max_steps or stage_steps (the stage lengths)")
            w = [self.weights[k] for k in self.stages]
            total = sum(w) or 1.0
            planned = [round(sum(w[: i + 1]) / total * max_steps) for i in range(len(w) - 1)]
        return self.stage_starts + planned[len(self.stage_starts) :]

    def _decide_stages(self, step: int) -> Decision:
        bounds = self.stage_boundaries()
        index = sum(1 for b in bounds if step >= b)
        switch = index > 0 and step == bounds[index - 1] and bounds[index - 1] > 0
        while len(self.stage_starts) < index:
            self.stage_starts.append(bounds[len(self.stage_starts)])
        return Decision({self.stages[index]: 1.0}, reset_optimizer=switch)

    def final_step(self) -> int | None:
        if self.stages is not None:
            return None
        if self.second_epochs is None:
            return None
        return self.boundary() + self._epochs_to_steps(self.second, self.second_epochs, "second_epochs")

    def boundary(self) -> int:
        """The optimizer step at which the second objective starts (once it started, that step: a resumed run
        with a larger ``max_steps`` does not move a switch that already happened)."""
        if self.switched_at is not None:
            return self.switched_at
        if self.switch_step is not None:
            return self.switch_step
        if self.switch_epochs is not None:
            return self._epochs_to_steps(self.first, self.switch_epochs, "switch_epochs")
        if self.context.max_steps is None or self.context.max_steps < 0:
            raise ConfigError(
                "Sequential needs the stage length: set switch_step or switch_epochs, or --trainer.max_steps"
                " so that the split can follow lam = T_dpo / (T_sft + T_dpo)."
            )
        share_first = self._lam() if self.first == "dpo" else 1.0 - self._lam()
        return round(share_first * self.context.max_steps)

    def decide(self, step: int, losses: Mapping[str, float]) -> Decision:
        if self.stages is not None:
            return self._decide_stages(step)
        b = self.boundary()
        if step < b:
            return Decision({self.first: 1.0})
        if self.switched_at is None:
            self.switched_at = b
        switch = step == b and b > 0
        return Decision(
            {self.second: 1.0},
            reset_optimizer=switch,
            reset_reference=switch and self.reference == "stage_start" and self.second == "dpo",
        )

    def state_dict(self) -> dict[str, Any]:
        if self.stages is not None:
            return {"stage_starts": list(self.stage_starts)}
        planned = None
        try:
            planned = self.boundary()
        except ConfigError:  # the steps per epoch are not known yet
            pass
        return {"switched_at": self.switched_at, "boundary": planned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage_starts = list(state_dict.get("stage_starts", []))
        self.switched_at = state_dict.get("switched_at")
        self._saved_boundary = state_dict.get("boundary")

    def describe(self) -> str:
        if self.stages is not None:
            try:
                at = f", switches at steps {self.stage_boundaries()}"
            except ConfigError:
                at = ""
            return f"sequential({'->'.join(self.stages)}{at})"
        end = self.final_step()
        until = f", end at step {end}" if end is not None else ""
        return f"sequential({self.first}->{self.second}, switch at step {self.boundary()}{until})"


class Mix(Selector):
    """Mix baseline: every step trains ``lam * f_dpo + (1 - lam) * f_sft`` on one batch of each (with K objectives,
    ``sum_k lambda_k f_k`` on one batch of every objective).

    The module runs the two objectives as two forward/backward passes into the same gradients, so peak
    memory is that of the larger graph, not the sum. A zero weight skips that objective entirely.
    """

    name = "mix"

    def decide(self, step: int, losses: Mapping[str, float]) -> Decision:
        return Decision({k: w for k, w in self.weights.items() if w > 0})


class Single(Selector):
    """One objective only (SFT-only or DPO-only runs, e.g. to measure the optima ``f*``).

    Args:
        objective: the objective's name (``sft`` or ``dpo``, or a data set's name).
    """

    name = "single"

    def __init__(self, objective: str = "sft") -> None:
        super().__init__()
        if not isinstance(objective, str) or not objective:
            raise ConfigError(f"objective must be an objective's name ('sft', 'dpo', a data set's), got {objective!r}")
        self.objective = objective

    def bind(self, lam: float | Mapping[str, float], context: StepContext | None = None) -> Selector:
        super().bind(lam, context)
        if self.objective not in self.weights:
            raise ConfigError(
                f"Single(objective={self.objective!r}): the run has no such objective; it has {', '.join(self.weights)}"
            )
        return self

    def decide(self, step: int, losses: Mapping[str, float]) -> Decision:
        return Decision({self.objective: 1.0})

    def describe(self) -> str:
        return f"{self.objective}_only"
