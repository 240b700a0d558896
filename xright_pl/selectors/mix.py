"""Mix (the weighted sum every step) and Single (one objective): the stateless selectors."""

from __future__ import annotations

from collections.abc import Mapping

from xright_pl.core.errors import ConfigError
from xright_pl.selectors.base import Decision, Selector, StepContext


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
