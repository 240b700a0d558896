"""Sequential: the objectives one after the other, in stages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from xright_pl.core.errors import ConfigError
from xright_pl.selectors.base import OBJECTIVES, Decision, Selector, StepContext

log = logging.getLogger(__name__)


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
        if self.stages is None and set(self.weights) != set(OBJECTIVES):
            raise ConfigError(
                f"Sequential without stages orders the SFT/DPO pair (first: sft or dpo); this run's objectives are"
                f" {', '.join(self.weights)}: give their order, e.g. --model.selector.init_args.stages"
                f" '[{', '.join(self.weights)}]'"
            )
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
