"""The step accumulator (:mod:`xright_pl.training.steps`) on its own: no Trainer, no model, hand-made outputs."""

from __future__ import annotations

import ast

import pytest
import torch
from helpers import REPO

from xright_pl import Decision
from xright_pl.data.streams import StreamTicket
from xright_pl.objectives.plugins import ObjectiveOutput
from xright_pl.training.steps import StepAccumulator, lookahead_units, step_mean


def _out(loss: float, tokens: int = 0, metrics: dict[str, float] | None = None, grad: bool = False) -> ObjectiveOutput:
    value = torch.tensor(loss, requires_grad=grad)
    extra = {k: torch.tensor(v) for k, v in (metrics or {}).items()}
    return ObjectiveOutput(loss=value * 1.0, num_tokens=torch.tensor(tokens), num_examples=1, metrics=extra)


class _Units:
    def __init__(self, units: int) -> None:
        self.units = units

    def loss_units(self) -> torch.Tensor:
        return torch.tensor(self.units)


class _Stream:
    """A stream whose upcoming batches average over ``units[i]`` (scored tokens or pairs)."""

    def __init__(self, units: list[int]) -> None:
        self.units = units

    def peek(self, offset: int = 0) -> _Units:
        return _Units(self.units[offset])


def test_module_file_imports_no_lightning():
    tree = ast.parse((REPO / "xright_pl" / "training" / "steps.py").read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert names and not [n for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]


# ------------------------------------------------------------------------------------------------ step_mean
def test_step_mean_weighs_micro_batches_by_their_units():
    """Micro-batch means 1.0 over 3 tokens and 4.0 over 1 token: the step's token mean is (3*1 + 1*4) / 4 = 1.75
    (the plain mean of the two means would be 2.5)."""
    assert step_mean([torch.tensor(1.0), torch.tensor(4.0)], [3, 1]).item() == pytest.approx(1.75, abs=1e-7)


@pytest.mark.parametrize("units", [[3, None], [0, 0]])
def test_step_mean_without_usable_units_is_the_mean_of_means(units):
    """Unknown units (a batch not from a stream) or none at all: (1.0 + 4.0) / 2 = 2.5."""
    assert step_mean([torch.tensor(1.0), torch.tensor(4.0)], units).item() == pytest.approx(2.5, abs=1e-7)


# ------------------------------------------------------------------------------------------------ loss scale
def _scaled_sum(token_losses: list[torch.Tensor], accumulate: int) -> float:
    """``sum_i scale_i * mean(micro-batch i)`` over one step of ``accumulate`` micro-batches."""
    acc = StepAccumulator(accumulate)
    acc.choose(Decision({"sft": 1.0}), ())
    acc.start({"sft": [len(t) for t in token_losses]})
    total = 0.0
    for tokens in token_losses:
        out = _out(tokens.mean().item())
        total += acc.loss_scale("sft", 1.0, out) * out.loss.item()
        assert out.units == len(tokens)
        acc.record("sft", out)
        acc.end_micro_batch()
    return total


def test_loss_scale_makes_8x1_equal_1x8():
    """Eight rows of 1..8 scored tokens: one micro-batch of all 36 tokens, or eight micro-batches of one row, both
    give the mean over the 36 tokens (a mean of micro-batch means would overweight the short rows)."""
    torch.manual_seed(0)
    rows = [torch.rand(n) for n in range(1, 9)]
    token_mean = torch.cat(rows).mean().item()
    assert _scaled_sum([torch.cat(rows)], accumulate=1) == pytest.approx(token_mean, rel=1e-6)
    assert _scaled_sum(rows, accumulate=8) == pytest.approx(token_mean, rel=1e-6)
    assert sum(r.mean().item() for r in rows) / 8 != pytest.approx(token_mean, rel=1e-3)


def test_loss_scale_with_several_processes():
    """Two micro-batches of 3 and 1 tokens here, 4 more tokens on the other process: W * units / total, i.e.
    2 * 3 / 8 = 0.75 and 2 * 1 / 8 = 0.25 (the data-parallel average then halves the sum of both processes)."""
    acc = StepAccumulator(2)
    acc.choose(Decision({"sft": 1.0}), ())
    acc.start({"sft": [3, 1]}, world_size=2, sum_over_processes=lambda local: local + 4)
    scales = []
    for _ in range(2):
        out = _out(1.0)
        scales.append(float(acc.loss_scale("sft", 1.0, out)))
        acc.record("sft", out)
        acc.end_micro_batch()
    assert scales == [0.75, 0.25]


def test_loss_scale_without_stream_counts_is_the_mean_of_micro_batch_means():
    """An objective whose batches carry no counts: weight / accumulate = 0.5 / 4 = 0.125, and no units."""
    acc = StepAccumulator(4)
    acc.choose(Decision({"sft": 0.5}), ())
    acc.start({})
    out = _out(1.0)
    assert acc.loss_scale("sft", 0.5, out) == 0.125 and out.units is None


def test_lookahead_units_counts_only_stream_batches():
    batch = {"sft": StreamTicket(_Stream([5, 2, 7])), "dpo": "a plain batch"}
    assert lookahead_units(batch, ["sft", "dpo"], accumulate=2) == {"sft": [5, 2]}
    assert lookahead_units(batch, ["dpo"], accumulate=2) == {}


# ------------------------------------------------------------------------------------------------ the step
def test_micro_batches_run_to_the_step_boundary():
    acc = StepAccumulator(3)
    seen = []
    for _ in range(3):
        seen.append((acc.at_boundary, acc.last_micro))
        closed = acc.end_micro_batch()
    assert seen == [(True, False), (False, False), (False, True)] and closed
    acc.finish()
    assert acc.at_boundary and acc.micro == 0


def test_finish_gives_each_objective_its_step_mean_tokens_and_metrics():
    """SFT: 2.0 over 1 token and 5.0 over 2 tokens: (2 + 10) / 3 = 4.0; DPO: pairs 1 and 1: (0.5 + 0.7) / 2."""
    acc = StepAccumulator(2)
    acc.choose(Decision({"sft": 0.5, "dpo": 0.5}), ())
    acc.start({"sft": [1, 2], "dpo": [1, 1]})
    for sft, dpo, tokens, margin in [(2.0, 0.5, 7, 1.0), (5.0, 0.7, 9, 3.0)]:
        for name, out in [("sft", _out(sft, tokens)), ("dpo", _out(dpo, 2 * tokens, {"rewards/margins": margin}))]:
            acc.loss_scale(name, 0.5, out)
            acc.record(name, out)
        acc.end_micro_batch()
    assert {k: v.item() for k, v in acc.loss_means().items()} == pytest.approx({"sft": 3.5, "dpo": 0.6})
    done = acc.finish()
    assert list(done) == ["sft", "dpo"]
    assert done["sft"].loss.item() == pytest.approx(4.0) and done["sft"].tokens == 16 and done["sft"].metrics == {}
    assert done["dpo"].loss.item() == pytest.approx(0.6) and done["dpo"].tokens == 32
    assert done["dpo"].metrics["rewards/margins"].item() == 2.0
    assert acc.finish() == {}  # the outputs are gone with the step


def test_recorded_losses_are_detached():
    acc = StepAccumulator(1)
    acc.choose(Decision({"sft": 1.0}), ())
    acc.start({})
    out = _out(1.0, grad=True)
    acc.record("sft", out)
    assert not out.loss.requires_grad


def test_skipped_step_resets_the_state():
    """A step skipped for a non-finite value: back at a boundary, and its outputs never reach the next step."""
    acc = StepAccumulator(2)
    acc.choose(Decision({"sft": 1.0}), ())
    acc.start({"sft": [1, 1]})
    for loss in (float("nan"), 1.0):
        out = _out(loss)
        acc.loss_scale("sft", 1.0, out)
        acc.record("sft", out)
        acc.end_micro_batch()
    acc.skip()
    assert acc.at_boundary and acc.loss_means() == {} and acc.finish() == {}
    acc.choose(Decision({"sft": 1.0}), ())
    acc.start({"sft": [1]})
    acc.record("sft", _out(3.0))
    assert acc.finish()["sft"].loss.item() == 3.0


# ------------------------------------------------------------------------------------------------ evaluation
def _evaluate(acc: StepAccumulator, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list]:
    calls = []

    def run(name: str) -> ObjectiveOutput:
        calls.append((name, torch.is_grad_enabled()))
        return _out({"sft": 1.0, "dpo": 2.0}[name], grad=True)

    return acc.evaluate(names, run), calls


def test_evaluation_keeps_a_graph_for_the_last_trained_objective_only():
    """The objective trained last (dpo) is the likely choice: the other runs first, without a graph."""
    acc = StepAccumulator(1)
    acc.last_weights = {"dpo": 1.0}
    values, calls = _evaluate(acc, ("sft", "dpo"))
    assert calls == [("sft", False), ("dpo", True)]
    assert {k: v.item() for k, v in values.items()} == {"sft": 1.0, "dpo": 2.0}
    assert not any(v.requires_grad for v in values.values())
    assert acc.choose(Decision({"dpo": 1.0}), values) == 0  # chosen with its graph: no second forward
    kept = acc.take_evaluated("dpo")
    assert kept is not None and kept.loss.requires_grad
    assert acc.take_evaluated("dpo") is None  # used once


def test_evaluated_but_not_chosen_output_is_dropped():
    """Before any step the first name is the likely one (sft); the selector picks dpo: sft's graph is freed and
    dpo, evaluated without a graph, runs its forward again (counted once)."""
    acc = StepAccumulator(1)
    values, calls = _evaluate(acc, ("sft", "dpo"))
    assert calls == [("dpo", False), ("sft", True)]
    assert acc.choose(Decision({"dpo": 1.0}), values) == 1
    assert acc.take_evaluated("sft") is None and acc.take_evaluated("dpo") is None
    assert acc.last_weights == {"dpo": 1.0}


def test_evaluated_output_lives_one_micro_batch():
    """Chosen with a graph but not taken in its micro-batch: gone at its end (its batch is trained next time)."""
    acc = StepAccumulator(2)
    values, _ = _evaluate(acc, ("sft",))
    acc.choose(Decision({"sft": 0.5, "dpo": 0.5}), values)
    acc.end_micro_batch()
    assert acc.take_evaluated("sft") is None


def test_nothing_to_evaluate():
    acc = StepAccumulator(1)
    acc.last_weights = {"sft": 1.0}
    assert _evaluate(acc, ()) == ({}, [])
    assert acc.choose(Decision({"sft": 1.0}), {}) == 0
