"""One optimizer step over its micro-batches: what the training step carries from one micro-batch to the next.

Lightning calls ``training_step`` once per micro-batch; an optimizer step spans ``accumulate`` of them. A
:class:`StepAccumulator` holds what lives between those calls (the micro-batch index, the selector's decision,
the loss evaluated with its graph for the selector, each trained objective's outputs and loss units) and
computes the factor on each micro-batch's loss and the step's mean losses. No Lightning here: the module calls
it from its hooks, and ``tests/training/test_steps.py`` runs it without a Trainer.

One step, as the module drives it (``run(name)``: objective ``name``'s output on its micro-batch)::

    if acc.at_boundary:  values = acc.evaluate(selector.needs(step), run)   # what the selector looks at
                         acc.choose(selector.decide(step, values), values)
                         acc.start(lookahead_units(batch, acc.decision.weights, acc.accumulate), world_size, ...)
    for each chosen name: out = acc.take_evaluated(name) or run(name)
                         backward(out.loss * acc.loss_scale(name, weight, out)); acc.record(name, out)
    if acc.end_micro_batch(): optimizer step, then acc.finish() (per-objective means); or acc.skip() (non-finite)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from xright_pl.data.streams import StreamTicket
from xright_pl.objectives.plugins import ObjectiveOutput

if TYPE_CHECKING:
    from xright_pl.selectors import Decision

__all__ = ["StepAccumulator", "ObjectiveStep", "step_mean", "lookahead_units"]


def step_mean(losses: list[Tensor], units: list[int | None]) -> Tensor:
    """The step's mean loss from its micro-batch means: weighted by what each averages over when known."""
    stacked = torch.stack(losses)
    if any(u is None for u in units) or sum(units) == 0:
        return stacked.mean()
    return (stacked * torch.tensor(units, dtype=stacked.dtype, device=stacked.device)).sum() / sum(units)


def lookahead_units(batch: Mapping[str, Any], names: Iterable[str], accumulate: int) -> dict[str, list[int]]:
    """What each objective's loss averages over in each of the step's ``accumulate`` micro-batches on this process
    (scored SFT tokens, DPO pairs).

    Counted on the host copies of the upcoming micro-batches (a look-ahead in the objective's stream), so it
    never synchronises with the device. Objectives whose batches do not come from a stream are absent.
    """
    names = [k for k in names if isinstance(batch.get(k), StreamTicket)]
    return {k: [int(batch[k].stream.peek(i).loss_units()) for i in range(accumulate)] for k in names}


@dataclass
class ObjectiveStep:
    """What one objective did in a finished optimizer step.

    Attributes:
        loss: the step's mean loss (see :func:`step_mean`), detached.
        tokens: non-padding tokens processed over the step's micro-batches.
        metrics: each training metric averaged over the micro-batches.
    """

    loss: Tensor
    tokens: int
    metrics: dict[str, Tensor]


class StepAccumulator:
    """The state of the optimizer step in progress, across its micro-batches.

    Args:
        accumulate: micro-batches per optimizer step.

    Attributes:
        micro: index of the next micro-batch of the step (0: at a step boundary).
        decision: the selector's decision for the step in progress (``None`` before the first step).
        last_weights: the objectives trained at the latest step and their weights (checkpointed): the objective
            an evaluation step keeps a graph for.
    """

    def __init__(self, accumulate: int) -> None:
        self.accumulate = accumulate
        self.micro = 0
        self.decision: Decision | None = None
        self.last_weights: Mapping[str, float] = {}
        self._evaluated: dict[str, ObjectiveOutput] = {}  # evaluated with its graph, for its backward if chosen
        self._outputs: dict[str, list[ObjectiveOutput]] = {}  # per objective, one per micro-batch trained
        self._units: dict[str, tuple[list[int], Tensor | int]] = {}  # per micro-batch, and total over the step
        self._world_size = 1

    @property
    def at_boundary(self) -> bool:
        """Whether the next micro-batch starts an optimizer step (no gradient accumulated in between)."""
        return self.micro == 0

    @property
    def last_micro(self) -> bool:
        """Whether the micro-batch in progress is the step's last (its backward synchronises the gradients)."""
        return self.micro == self.accumulate - 1

    # ------------------------------------------------------------------ start of a step
    def evaluate(
        self, names: tuple[str, ...], run: Callable[[str], ObjectiveOutput], ahead: tuple[str, ...] = ()
    ) -> dict[str, Tensor]:
        """The losses of ``names`` for the selector (MAXRIGHT's evaluation steps), by ``run(name)``.

        Only one graph is kept: the objective trained at the previous step (the likely choice) is evaluated with
        its graph, kept for the backward if it is chosen; the others run without a graph, first, so their
        activations are gone before the graph is built. Peak memory stays that of one objective. ``ahead``: the
        objectives evaluated on a batch other than the one they would train on (never kept with a graph).
        """
        self._evaluated = {}
        if not names:
            return {}
        candidates = [k for k in names if k not in ahead]
        likely = next((k for k in candidates if k in self.last_weights), candidates[0] if candidates else None)
        values = {}
        with torch.no_grad():
            for name in names:
                if name != likely:
                    values[name] = run(name).loss
        if likely is not None:
            self._evaluated[likely] = run(likely)
            values[likely] = self._evaluated[likely].loss.detach()
        return {k: values[k] for k in names}

    def choose(self, decision: Decision, evaluated: Iterable[str]) -> int:
        """Take the selector's ``decision`` for this step. The graph of an evaluated objective that is not chosen
        is freed (before the chosen objective's backward). Returns how many chosen objectives were ``evaluated``
        without a graph: their forward runs again, with one."""
        self.decision = decision
        for name in [k for k in self._evaluated if k not in decision.weights]:
            del self._evaluated[name]
        self.last_weights = decision.weights
        return sum(1 for k in evaluated if k in decision.weights and k not in self._evaluated)

    def start(
        self,
        units: Mapping[str, list[int]],
        world_size: int = 1,
        sum_over_processes: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Start accumulating: ``units`` (from :func:`lookahead_units`) says what each objective's loss averages
        over in each micro-batch on this process; with ``world_size`` > 1, ``sum_over_processes`` adds up the
        processes' totals (one small all-reduce)."""
        totals: dict[str, Tensor | int] = {k: max(sum(v), 1) for k, v in units.items()}
        if world_size > 1 and totals:
            names = list(units)
            local = torch.tensor([float(sum(units[k])) for k in names], dtype=torch.float64)
            summed = sum_over_processes(local).clamp(min=1)
            totals = {k: summed[i] for i, k in enumerate(names)}
        self._units = {k: (list(units[k]), totals[k]) for k in units}
        self._world_size = world_size
        self._outputs = {}

    # ------------------------------------------------------------------ each micro-batch
    def take_evaluated(self, name: str) -> ObjectiveOutput | None:
        """The output of ``name`` evaluated with its graph at the start of the step (once), else ``None``."""
        return self._evaluated.pop(name, None)

    def loss_scale(self, name: str, weight: float, out: ObjectiveOutput) -> Any:
        """The factor on this micro-batch's mean loss that makes the step's gradient the gradient of the
        objective's mean over the whole step (all micro-batches, all processes), times its weight. Sets
        ``out.units``.

        SFT is a token mean: micro-batches with more response tokens weigh more, so 1 micro-batch of 8 rows and
        8 micro-batches of 1 row give the same update whatever the lengths. Data-parallel gradients are averaged
        over the ``W`` processes, hence the factor ``W``. Without stream counts: the mean of micro-batch means.
        """
        if name not in self._units:
            return weight / self.accumulate
        per_micro, total = self._units[name]
        out.units = per_micro[self.micro]
        return out.units * weight * self._world_size / total

    def record(self, name: str, out: ObjectiveOutput) -> None:
        """Keep a trained micro-batch's output (its loss detached) for the step's means."""
        out.loss = out.loss.detach()
        self._outputs.setdefault(name, []).append(out)

    def end_micro_batch(self) -> bool:
        """Close the micro-batch; True when it was the step's last (time for the optimizer step)."""
        self._evaluated.clear()  # an evaluated objective that was not chosen keeps its batch for its next step
        self.micro += 1
        return self.micro == self.accumulate

    # ------------------------------------------------------------------ end of a step
    def loss_means(self) -> dict[str, Tensor]:
        """Each trained objective's plain mean of its micro-batch losses (a non-finite one shows in it)."""
        return {name: torch.stack([o.loss for o in outs]).mean() for name, outs in self._outputs.items()}

    def finish(self) -> dict[str, ObjectiveStep]:
        """End the step after its update: what each trained objective did, and back to a step boundary."""
        self.micro = 0
        done = {
            name: ObjectiveStep(
                loss=step_mean([o.loss for o in outs], [o.units for o in outs]),
                tokens=int(sum(int(o.num_tokens) for o in outs)),
                metrics={key: torch.stack([o.metrics[key] for o in outs]).mean() for key in outs[0].metrics},
            )
            for name, outs in self._outputs.items()
        }
        self._outputs = {}
        return done

    def skip(self) -> None:
        """End the step without an update (a non-finite loss or gradient): its outputs are dropped."""
        self.micro, self._outputs = 0, {}
