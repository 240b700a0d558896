"""The non-finite guard (:mod:`xright_pl.training.guards`) and the training RNG stream (:mod:`xright_pl.training.rng`)
on their own, without a Trainer (the fits that skip a NaN step are in ``test_resume.py``)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from xright_pl.training.guards import NonFiniteGuard, TrainingError, check_finite_weights
from xright_pl.training.rng import RngStream


def _values(**kw: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in kw.items()}


def test_finite_values_pass_and_reset_the_run_of_skips(caplog):
    guard = NonFiniteGuard(limit=3)
    assert guard.check(0, "sft", {})  # nothing to check
    with caplog.at_level(logging.WARNING, logger="xright_pl.training.guards"):
        assert not guard.check(1, "sft", _values(sft=math.nan, gradient=2.0))
    assert (guard.skips, guard.in_a_row) == (1, 1)
    assert guard.check(2, "mix", _values(sft=1.0, dpo=0.5, gradient=2.0))
    assert (guard.skips, guard.in_a_row) == (1, 0)
    (record,) = caplog.records
    assert record.getMessage() == (
        "step 1 (sft branch): non-finite sft=nan; update skipped (1 in a row, 1 in all; stop after 3 in a row)"
    )


def test_limit_in_a_row_stops_training():
    guard = NonFiniteGuard(limit=2)
    assert not guard.check(4, "dpo", _values(dpo=1.0, gradient=math.inf))
    with pytest.raises(TrainingError, match=r"optimizer step 5: 2 consecutive steps had a non-finite loss") as e:
        guard.check(5, "dpo", _values(dpo=math.nan, gradient=math.inf))
    assert "(last: dpo branch, dpo=nan, gradient=inf)" in str(e.value)
    assert "--model.max_consecutive_nonfinite" in str(e.value) and guard.skips == 2


def test_nonfinite_weights_are_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite_weights(model, 3)
    with torch.no_grad():
        model[1].bias[0] = math.nan
    with pytest.raises(TrainingError, match=r"at step 3: 1 policy tensors hold NaN or inf \(first: 1.bias\)"):
        check_finite_weights(model, 3)


def test_rng_stream_is_apart_from_the_global_generator_and_resumes():
    """The stream starts where the global generator stands, its draws leave the global generator where it was, and
    a stream restored from its state draws what the original draws next."""
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    from_seed = torch.rand(3)
    torch.manual_seed(1)
    stream = RngStream()
    with stream.active(cpu):
        first = torch.rand(3)
    assert torch.equal(first, from_seed)
    assert torch.equal(torch.rand(3), from_seed)  # the global generator did not move
    resumed = RngStream()
    resumed.state = {k: None if v is None else v.clone() for k, v in stream.state.items()}
    torch.manual_seed(99)
    with stream.active(cpu):
        a = torch.rand(3)
    with resumed.active(cpu):
        b = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(a, first)
