"""MAXRIGHT: train the objective with the largest weighted gap to its optimum."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from xright_pl.core.errors import ConfigError
from xright_pl.core.optimum import Optimum, OptimumK, given_optimum, load_optimum
from xright_pl.selectors.base import OBJECTIVES, Decision, Selector

log = logging.getLogger(__name__)


class Maxright(Selector):
    """MAXRIGHT: train the objective with the larger weighted gap to its optimum.

    DPO is trained when ``lam * (f_dpo - f_dpo_star) >= (1 - lam) * (f_sft - f_sft_star)``, else SFT; with K
    objectives, the one with the largest ``lambda_k (f_k - f_k*)`` (ties: the later objective). The losses ``f`` are
    tracked values: every ``eval_every`` optimizer steps (and at step 0) both objectives are evaluated on their
    current batches; in between, only the objective just trained is refreshed, from its own pre-update batch loss.
    An objective evaluated and not trained keeps its batch for its next training step (no data is skipped); its next
    evaluation looks at a batch further ahead in its stream, not at that same batch again, so one easy batch cannot
    hold the decision (trained later, in order). ``eval_every=1`` is exact MAXRIGHT; the paper's runs use 10. With
    gradient accumulation an evaluation looks at the step's first micro-batch of each objective, and the refresh at
    the step's token-weighted mean over all of them. At ``lam`` 0 or 1 the target is one objective, and MAXRIGHT
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
        optimum_file: JSON file written by ``python -m xright_pl optimum``: the pair's ``f_sft_star`` and
            ``f_dpo_star`` (instead of the two numbers), or, from ``--datasets_config`` (``data.datasets``), every data
            set's ``f_star`` (instead of ``f_star``).
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
        loaded = load_optimum(optimum_file) if optimum_file is not None else None
        #: The pair's optima (numbers or a pair file); None otherwise.
        self.optimum: Optimum | None = loaded if isinstance(loaded, Optimum) else None
        #: A named objectives' optimum file (its ``f_star`` is ``given_star``); None otherwise.
        self.optimum_k: OptimumK | None = loaded if isinstance(loaded, OptimumK) else None
        if all(given):
            self.optimum = Optimum(float(f_sft_star), float(f_dpo_star))
        self.given_star = {str(k): float(v) for k, v in f_star.items()} if f_star else None
        if self.optimum_k is not None:
            self.given_star = dict(self.optimum_k.f_star)
        self.optimum_file = optimum_file
        self.online_margin = float(online_margin)
        self.val_min: dict[str, float] = {}
        self.eval_every = eval_every
        self.values: dict[str, float] = {}
        self.evaluations = 0

    def bind(self, lam: float | Mapping[str, float], context: Any = None) -> Maxright:
        """As :meth:`Selector.bind`; refuses optima that do not cover every objective with a positive weight."""
        super().bind(lam, context)
        needed = [k for k, w in self.weights.items() if w > 0]
        if self.optimum_k is not None:
            have = set(self.given_star)
            how = f"the optimum file {self.optimum_k.source} of {', '.join(self.given_star)}"
        elif self.given_star is not None:
            have, how = set(self.given_star), "f_star"
        elif self.optimum_file is not None:
            have, how = set(OBJECTIVES), f"the optimum file {self.optimum.source}, the SFT/DPO pair's optima"
        elif self.optimum is not None:
            have, how = set(OBJECTIVES), "f_sft_star/f_dpo_star, the SFT/DPO pair's optima"
        else:
            return self
        missing = [k for k in needed if k not in have]
        if missing:
            raise ConfigError(
                f"Maxright has no optimum for {', '.join(missing)}: it was given {how}, and this run trains"
                f" {', '.join(needed)}. Give f_star with one value per objective, e.g."
                f" --model.selector.init_args.f_star '{{{', '.join(f'{k}: ...' for k in needed)}}}', or an"
                " optimum_file measured for these objectives (`python -m xright_pl optimum --datasets_config CONFIG`"
                " runs a Single fit per data set of CONFIG's data.datasets)"
            )
        return self

    def given_optimum(self) -> Optimum | OptimumK | None:
        """The given optima (the pair's, or ``{name: f_k*}``); None for the online estimate."""
        return given_optimum(self.optimum, self.optimum_k, self.given_star)

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
        return {k: (1.0 - self.online_margin) * self.val_min[k] if k in self.val_min else 0.0 for k in self._names()}

    def _names(self) -> tuple[str, ...]:
        """The run's objectives once bound, else the SFT/DPO pair."""
        return self.objectives() if self._weights is not None else OBJECTIVES

    def observe_validation(self, losses: Mapping[str, float]) -> None:
        """Feed the online estimate one validation's losses (``{"sft": ..., "dpo": ...}``)."""
        names = self._names()
        for k, v in losses.items():
            if k in names and math.isfinite(float(v)):
                self.val_min[k] = min(self.val_min.get(k, math.inf), float(v))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        for measured in (self.optimum, self.optimum_k):
            if measured is not None and hasattr(pl_module, "beta"):
                measured.check_beta(pl_module.beta)
        max_steps = trainer.max_steps
        target = pl_module.target() if hasattr(pl_module, "target") else getattr(pl_module, "lam", self.lam)
        if isinstance(target, Mapping):
            several = sum(1 for w in target.values() if w > 0) > 1
        else:
            several = target not in (0.0, 1.0)
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
            self.observe_validation({k: float(m[f"val/{k}_loss"]) for k in self._names() if f"val/{k}_loss" in m})

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
        names = list(g)
        # The later objective wins a tie; the pair: DPO when g_dpo >= g_sft, else SFT (a NaN gap: SFT, as always).
        best = names[-1]
        for name in reversed(names[:-1]):
            if not g[best] >= g[name]:
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
