"""Selectors unit-tested without a Trainer."""

import logging
import math

import pytest

from xright_pl import Alright, Maxright, Mix, Sequential, Single
from xright_pl.selectors import StepContext


def _branches(sel, n, losses=None):
    return [sel.decide(i, losses or {}).branch for i in range(n)]


@pytest.mark.parametrize("lam", [0.1, 0.25, 0.5, 0.9])
def test_alright_frequency_within_binomial_bounds(lam):
    """Over n = 2000 draws the DPO count is Binomial(n, lam): mean n*lam, sd sqrt(n*lam*(1-lam)).

    For lam = 0.5: mean 1000, sd 22.4; we accept mean +- 4 sd (a false alarm about once in 16,000 runs,
    and the seed is fixed, so the test is deterministic anyway).
    """
    n = 2000
    sel = Alright(seed=123).bind(lam)
    k = _branches(sel, n).count("dpo")
    sd = math.sqrt(n * lam * (1 - lam))
    assert abs(k - n * lam) <= 4 * sd


def test_alright_same_seed_same_sequence_and_state_roundtrip():
    a = _branches(Alright(seed=7).bind(0.5), 300)
    b = _branches(Alright(seed=7).bind(0.5), 300)
    c = _branches(Alright(seed=8).bind(0.5), 300)
    assert a == b
    assert a != c
    # Resuming from a state_dict continues the same sequence.
    sel = Alright(seed=7).bind(0.5)
    first = _branches(sel, 100)
    state = sel.state_dict()
    fresh = Alright(seed=0).bind(0.5)
    fresh.load_state_dict(state)
    assert first + [fresh.decide(i, {}).branch for i in range(100, 300)] == a


@pytest.mark.parametrize("lam,expected", [(0.0, "sft"), (1.0, "dpo")])
def test_alright_extremes(lam, expected):
    assert set(_branches(Alright(seed=1).bind(lam), 200)) == {expected}


def test_lam_outside_unit_interval_rejected():
    with pytest.raises(ValueError, match=r"lam must be a number in \[0, 1\]"):
        Alright().bind(1.5)
    with pytest.raises(ValueError, match="lam"):
        Mix().bind(-0.1)


def test_maxright_picks_larger_weighted_gap():
    """lam = 0.25, f* = (sft 1.0, dpo 0.1).

    losses (sft 1.2, dpo 0.5): g_sft = 0.75 * 0.2 = 0.15, g_dpo = 0.25 * 0.4 = 0.10 -> SFT.
    losses (sft 1.1, dpo 0.5): g_sft = 0.075 < 0.10 -> DPO.
    Tie (g equal) goes to DPO (the rule is >=): sft 1.0 + 0.1/0.75, dpo 0.5 -> g_sft = 0.1 = g_dpo.
    """
    sel = Maxright(f_sft_star=1.0, f_dpo_star=0.1, eval_every=1).bind(0.25)
    assert sel.needs(0) == ("sft", "dpo")
    assert sel.decide(0, {"sft": 1.2, "dpo": 0.5}).branch == "sft"
    assert sel.gaps() == pytest.approx({"sft": 0.15, "dpo": 0.10})
    assert sel.decide(1, {"sft": 1.1, "dpo": 0.5}).branch == "dpo"
    sel2 = Maxright(f_sft_star=1.0, f_dpo_star=0.0, eval_every=1).bind(0.5)
    assert sel2.decide(0, {"sft": 1.25, "dpo": 0.25}).branch == "dpo"  # 0.125 >= 0.125


def test_maxright_refreshes_only_trained_objective_and_reevaluates_every_k():
    k = 3
    sel = Maxright(f_sft_star=0.0, f_dpo_star=0.0, eval_every=k).bind(0.5)
    assert sel.needs(1) == ("sft", "dpo")  # nothing tracked yet: evaluate first, whatever the step
    d = sel.decide(0, {"sft": 2.0, "dpo": 1.0})  # g_sft 1.0 > g_dpo 0.5 -> SFT
    assert [s for s in range(10) if sel.needs(s)] == [0, 3, 6, 9]
    assert d.branch == "sft"
    sel.observe(0, d, {"sft": 0.4})  # SFT's own pre-update loss refreshes only SFT
    assert sel.values == {"sft": 0.4, "dpo": 1.0}
    d = sel.decide(1, {})  # no evaluation: g_sft 0.2 < g_dpo 0.5 -> DPO on the tracked values
    assert d.branch == "dpo"
    sel.observe(1, d, {"dpo": 0.3})
    assert sel.values == {"sft": 0.4, "dpo": 0.3}
    d = sel.decide(2, {})
    assert d.branch == "sft"
    before = sel.evaluations
    sel.decide(3, {"sft": 9.0, "dpo": 9.5})  # evaluation step: both replaced
    assert sel.values == {"sft": 9.0, "dpo": 9.5}
    assert sel.evaluations == before + 1
    state = sel.state_dict()
    other = Maxright(f_sft_star=0.0, f_dpo_star=0.0, eval_every=k).bind(0.5)
    other.load_state_dict(state)
    assert other.values == sel.values and other.needs(4) == ()


@pytest.mark.parametrize(("lam", "only"), [(0.0, "sft"), (1.0, "dpo")])
def test_maxright_at_the_ends_trains_only_the_weighted_objective(lam, only):
    """At lam 0 (1) the target is f_sft (f_dpo) alone. The raw gaps would pick the other objective here: the
    weighted gap of the objective with weight 0 is 0, and the tracked loss of the other is below its optimum."""
    sel = Maxright(f_sft_star=1.0, f_dpo_star=0.1, eval_every=1).bind(lam)
    assert sel.needs(0) == ()  # nothing to evaluate
    losses = {"sft": 0.9, "dpo": 0.05}
    for step in range(5):
        assert sel.decide(step, losses).branch == only


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"f_sft_star": None, "f_dpo_star": 0.1}, "needs both optima"),
        (
            {"f_sft_star": 1.0, "f_dpo_star": 0.1, "eval_every": 0},
            r"eval_every \(k\) must be an integer >= 1",
        ),
        ({"f_sft_star": float("nan"), "f_dpo_star": 0.1}, "finite"),
    ],
)
def test_maxright_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Maxright(**kwargs)


def test_sequential_switches_exactly_at_boundary():
    sel = Sequential(first="sft", switch_step=5).bind(0.5)
    ds = [sel.decide(i, {}) for i in range(10)]
    assert [d.branch for d in ds] == ["sft"] * 5 + ["dpo"] * 5
    assert [i for i, d in enumerate(ds) if d.reset_optimizer] == [5]
    assert not any(d.reset_reference for d in ds)
    sel = Sequential(first="sft", switch_step=5, reference="stage_start").bind(0.5)
    assert [i for i in range(10) if sel.decide(i, {}).reset_reference] == [5]


def test_sequential_split_follows_lam_and_epochs():
    """lam = T_dpo / (T_sft + T_dpo): lam 0.25 over 400 steps, SFT first -> 300 SFT then 100 DPO."""
    sel = Sequential(first="sft").bind(0.25, StepContext(max_steps=400))
    assert sel.boundary() == 300
    sel = Sequential(first="dpo").bind(0.25, StepContext(max_steps=400))
    assert sel.boundary() == 100
    sel = Sequential(first="dpo", switch_epochs=1.5).bind(0.5, StepContext(max_steps=400, steps_per_epoch={"dpo": 20}))
    assert sel.boundary() == 30
    with pytest.raises(ValueError, match="stage length"):
        Sequential().bind(0.5).boundary()


def test_sequential_second_stage_in_epochs_ends_the_run():
    ctx = StepContext(max_steps=-1, steps_per_epoch={"dpo": 20, "sft": 7})
    sel = Sequential(first="dpo", switch_epochs=1.5, second_epochs=2).bind(0.5, ctx)
    assert (sel.boundary(), sel.final_step()) == (30, 30 + 14)
    assert "end at step 44" in sel.describe()
    assert Sequential(first="dpo", switch_step=5).bind(0.5, ctx).final_step() is None


def test_sequential_epochs_without_the_data_is_a_config_error():
    from xright_pl.core.errors import ConfigError

    sel = Sequential(switch_epochs=1.0).bind(0.5)  # no steps per epoch yet: binding does not fail
    with pytest.raises(ConfigError, match="steps per epoch"):
        sel.boundary()


def test_sequential_warns_when_the_second_stage_gets_no_step(caplog):
    with caplog.at_level("WARNING", logger="xright_pl.selectors"):
        Sequential(first="dpo", switch_step=500).bind(0.5, StepContext(max_steps=400))
    assert "the sft stage gets no step" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xright_pl.selectors"):
        Sequential(first="dpo", switch_step=100).bind(0.5, StepContext(max_steps=400))
    assert caplog.text == ""


def test_sequential_bad_settings():
    with pytest.raises(ValueError, match="first must be"):
        Sequential(first="ppo")
    with pytest.raises(ValueError, match="switch_step must be an integer >= 0"):
        Sequential(switch_step=-3)


def test_mix_weights_and_zero_weight_skipped():
    assert dict(Mix().bind(0.25).decide(0, {}).weights) == {"sft": 0.75, "dpo": 0.25}
    assert dict(Mix().bind(0.0).decide(0, {}).weights) == {"sft": 1.0}
    assert dict(Mix().bind(1.0).decide(0, {}).weights) == {"dpo": 1.0}
    assert Mix().bind(0.5).decide(0, {}).branch == "mix"


def test_single():
    assert set(_branches(Single("dpo").bind(0.5), 5)) == {"dpo"}
    with pytest.raises(ValueError, match="no such objective.*sft, dpo"):  # names are known once bound to a target
        Single("x").bind(0.5)
    with pytest.raises(ValueError):
        Single("")


def test_maxright_eval_every_not_below_max_steps_warns(tmp_path, caplog):
    """eval_every >= max_steps: both losses are evaluated at step 0 only; the run says so (and still trains)."""
    from helpers import demo_data, tiny_module, trainer

    from xright_pl import Maxright

    def fit(eval_every: int) -> list[str]:
        caplog.clear()
        selector = Maxright(eval_every=eval_every, optimum_file="builtin:demo/optimum.json")
        with caplog.at_level(logging.WARNING, logger="xright_pl.selectors"):
            trainer(tmp_path, max_steps=3).fit(tiny_module(selector), datamodule=demo_data(limit=32))
        return [r.getMessage() for r in caplog.records if "eval_every" in r.getMessage()]

    warned = fit(10)
    assert len(warned) == 1 and "eval_every=10 is not smaller than max_steps=3" in warned[0]
    assert fit(2) == []


# ---------------------------------------------------------------------------------------------- K objectives
THREE = {"alpaca": 0.3, "dolly": 0.2, "hh": 0.5}


def test_weights_are_checked_and_lam_is_the_pair():
    from xright_pl.selectors import check_weights

    sel = Mix().bind({"sft": 0.75, "dpo": 0.25})
    assert sel.lam == 0.25 and sel.weights == Mix().bind(0.25).weights == {"sft": 0.75, "dpo": 0.25}
    assert Mix().bind(THREE).lam is None
    with pytest.raises(ValueError, match="sum to 0.9"):
        check_weights({"a": 0.5, "b": 0.4})
    with pytest.raises(ValueError, match="b: -0.1"):
        check_weights({"a": 1.1, "b": -0.1})


def test_alright_pair_draws_are_the_old_rule():
    """For the pair, the K-way draw is exactly ``u < lam`` -> DPO (the same generator, the same branches)."""
    import torch

    for lam in (0.0, 0.3, 1.0):
        g = torch.Generator().manual_seed(5)
        expected = ["dpo" if torch.rand((), generator=g).item() < lam else "sft" for _ in range(500)]
        assert _branches(Alright(seed=5).bind(lam), 500) == expected


def test_alright_three_objectives_shares_within_binomial_bounds():
    """n = 6000 draws; objective k's count is Binomial(n, lambda_k): accept +- 4 sd."""
    n = 6000
    counts = {k: 0 for k in THREE}
    for b in _branches(Alright(seed=11).bind(THREE), n):
        counts[b] += 1
    for k, w in THREE.items():
        assert abs(counts[k] - n * w) <= 4 * math.sqrt(n * w * (1 - w)), counts
    zero = _branches(Alright(seed=1).bind({"a": 0.5, "b": 0.0, "c": 0.5}), 2000)
    assert "b" not in zero


def test_maxright_three_objectives_picks_the_largest_weighted_gap():
    """Weighted gaps with f* = 1 for all: alpaca 0.3 * (2 - 1) = 0.3, dolly 0.2 * (3 - 1) = 0.4, hh 0.5 * (1.6 - 1)
    = 0.3: dolly. After dolly is refreshed to 2 (gap 0.2), alpaca and hh tie at 0.3: the later one, hh."""
    sel = Maxright(f_star={"alpaca": 1.0, "dolly": 1.0, "hh": 1.0}, eval_every=10).bind(THREE)
    assert sel.needs(0) == ("alpaca", "dolly", "hh")
    assert sel.decide(0, {"alpaca": 2.0, "dolly": 3.0, "hh": 1.6}).weights == {"dolly": 1.0}
    sel.observe(0, sel.decide(0, {}), {"dolly": 2.0})
    assert sel.gaps() == pytest.approx({"alpaca": 0.3, "dolly": 0.2, "hh": 0.3})
    assert sel.needs(1) == ()
    assert sel.decide(1, {}).weights == {"hh": 1.0}
    assert Maxright(f_star={"a": 0.0, "b": 0.0}).bind({"a": 1.0, "b": 0.0}).needs(0) == ()  # one objective


def test_mix_and_single_with_three_objectives():
    assert Mix().bind(THREE).decide(0, {}).weights == THREE
    assert Mix().bind({"a": 0.5, "b": 0.0, "c": 0.5}).decide(0, {}).weights == {"a": 0.5, "c": 0.5}
    assert set(_branches(Single("dolly").bind(THREE), 4)) == {"dolly"}


def test_sequential_stages_split_max_steps_by_weight_and_resume():
    """Stages hh, alpaca, dolly with weights 0.5, 0.3, 0.2 of 100 steps: switches at 50 and 80; the optimizer is
    re-created at each switch. A resumed selector keeps the switches that happened."""
    sel = Sequential(stages=["hh", "alpaca", "dolly"]).bind(THREE, StepContext(max_steps=100))
    assert sel.stage_boundaries() == [50, 80]
    decisions = [sel.decide(i, {}) for i in range(100)]
    assert [d.branch for d in decisions].count("hh") == 50
    assert [d.branch for d in decisions].count("alpaca") == 30
    assert [i for i, d in enumerate(decisions) if d.reset_optimizer] == [50, 80]
    assert not any(d.reset_reference for d in decisions)
    half = Sequential(stages=["hh", "alpaca", "dolly"]).bind(THREE, StepContext(max_steps=100))
    for i in range(60):
        half.decide(i, {})
    resumed = Sequential(stages=["hh", "alpaca", "dolly"]).bind(THREE, StepContext(max_steps=200))
    resumed.load_state_dict(half.state_dict())
    assert resumed.stage_boundaries() == [50, 160]  # the switch at 50 happened; the next follows the new budget
    fixed = Sequential(stages=["dolly", "hh"], stage_steps=[7]).bind(THREE, StepContext(max_steps=100))
    assert [fixed.decide(i, {}).branch for i in (6, 7)] == ["dolly", "hh"]
    with pytest.raises(ValueError, match="no such objective"):
        Sequential(stages=["hh", "x"]).bind(THREE)
    with pytest.raises(ValueError, match="stage_steps must be 2 integers"):
        Sequential(stages=["a", "b", "c"], stage_steps=[3])


def test_maxright_nan_gap_picks_sft_as_before():
    """The old rule ``dpo if g_dpo >= g_sft else sft`` sends any NaN gap to SFT; the K-way rule keeps that."""
    for losses in ({"sft": float("nan"), "dpo": 1.0}, {"sft": 1.0, "dpo": float("nan")}):
        sel = Maxright(f_sft_star=0.0, f_dpo_star=0.0, eval_every=1).bind(0.5)
        assert sel.decide(0, losses).weights == {"sft": 1.0}
