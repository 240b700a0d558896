"""Trade-off metrics (gaps, ideal distance) and the trajectory picture, on hand-worked values and tiny runs."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from helpers import demo_data, has_extra, three_datasets, tiny_module, trainer
from lightning.pytorch.callbacks import Callback

from xright_pl import Alright, Maxright, TradeoffMetrics, TrajectoryPlot
from xright_pl.callbacks.trajectory import evaluate_losses
from xright_pl.core.errors import ConfigError
from xright_pl.core.optimum import Optimum, write_optimum
from xright_pl.training.metrics import TradeoffGap, optimum_of, tradeoff_gaps


def test_tradeoff_gaps_hand_worked():
    """ALRIGHT lam=0.5 on the demo ends near (0.58, 0.21); the optima are (0.394, 0.175):
    sft_gap = 0.58 - 0.394 = 0.186, dpo_gap = 0.21 - 0.175 = 0.035,
    distance = sqrt(0.186^2 + 0.035^2) = sqrt(0.034596 + 0.001225) = sqrt(0.035821) = 0.189264."""
    g = tradeoff_gaps(0.58, 0.21, 0.394, 0.175)
    assert g["sft_gap"] == pytest.approx(0.186, abs=1e-12)
    assert g["dpo_gap"] == pytest.approx(0.035, abs=1e-12)
    assert g["ideal_distance"] == pytest.approx(0.189264, abs=1e-6)
    # At the ideal point the distance is 0; a point below an optimum has a negative gap but a positive distance.
    assert tradeoff_gaps(0.394, 0.175, 0.394, 0.175)["ideal_distance"] == 0.0
    below = tradeoff_gaps(0.3, 0.175, 0.4, 0.175)
    assert below["sft_gap"] == pytest.approx(-0.1) and below["ideal_distance"] == pytest.approx(0.1)


def test_tradeoff_gap_metric_weighted_means():
    """Two updates: SFT (1.0 x 3 tokens, 2.0 x 1 token) -> mean 5/4 = 1.25; DPO (0.5 x 1 pair, 0.7 x 3 pairs) ->
    (0.5 + 2.1) / 4 = 0.65. With f* = (1.0, 0.25): gaps 0.25 and 0.40, distance sqrt(0.0625 + 0.16) = 0.471699."""
    m = TradeoffGap(1.0, 0.25)
    m.update(torch.tensor(1.0), torch.tensor(0.5), sft_weight=3, dpo_weight=1)
    m.update(2.0, 0.7, sft_weight=1, dpo_weight=3)
    out = m.compute()
    assert float(out["sft_gap"]) == pytest.approx(0.25, abs=1e-6)
    assert float(out["dpo_gap"]) == pytest.approx(0.40, abs=1e-6)
    assert float(out["ideal_distance"]) == pytest.approx(math.sqrt(0.2225), abs=1e-6)
    m.reset()
    m.update(sft_loss=1.0)
    with pytest.raises(ValueError, match="at least one SFT and one DPO loss"):
        m.compute()
    with pytest.raises(ConfigError, match="finite"):
        TradeoffGap(float("nan"), 0.1)


def test_tradeoff_metrics_settings():
    with pytest.raises(ConfigError, match="both f_sft_star and f_dpo_star"):
        TradeoffMetrics(f_sft_star=1.0)
    with pytest.raises(ConfigError, match="not both"):
        TradeoffMetrics(optimum_file="x.json", f_sft_star=1.0, f_dpo_star=0.1)
    with pytest.raises(ConfigError, match="xright_pl optimum"):
        TradeoffMetrics(optimum_file="/nonexistent/optimum.json")


class ValRecorder(Callback):
    """Every non-sanity validation's (step, val/sft_loss, val/dpo_loss)."""

    def __init__(self):
        self.points = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            m = trainer.callback_metrics
            self.points.append((trainer.global_step, float(m["val/sft_loss"]), float(m["val/dpo_loss"])))


def test_gaps_trajectory_and_summary_in_a_run(tmp_path):
    """A 4-step ALRIGHT run validating at steps 2 and 4 with TensorBoard: the gaps equal loss - f* at every
    validation, reach summary.json, the trajectory holds the start and both validations, the figure is in the
    TensorBoard events and the PNG next to summary.json."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = ValRecorder()
    metrics = TradeoffMetrics(f_sft_star=1.5, f_dpo_star=0.3)
    traj = TrajectoryPlot()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    t = trainer(tmp_path, 4, callbacks=[metrics, traj, rec], logger=logger, val_check_interval=2)
    module = tiny_module(Alright(seed=0))
    t.fit(module, datamodule=demo_data(limit=64))
    assert [p[0] for p in rec.points] == [2, 4]
    step, f_sft, f_dpo = rec.points[-1]
    assert metrics.last["val/sft_gap"] == pytest.approx(f_sft - 1.5, abs=1e-6)
    assert metrics.last["val/dpo_gap"] == pytest.approx(f_dpo - 0.3, abs=1e-6)
    assert metrics.last["val/ideal_distance"] == pytest.approx(math.hypot(f_sft - 1.5, f_dpo - 0.3), abs=1e-6)
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["val/ideal_distance"] == pytest.approx(metrics.last["val/ideal_distance"], abs=1e-6)
    assert summary["f_sft_star"] == 1.5 and summary["f_dpo_star"] == 0.3
    assert 0 < summary["step_time_s"] <= summary["wall_time_s"]
    # Trajectory: the start (step 0, before any update) and the two validations, in order.
    assert [p[0] for p in traj.points] == [0, 2, 4]
    assert traj.points[1:] == [pytest.approx(p) for p in rec.points]
    assert traj.points[0][1] != pytest.approx(traj.points[1][1])  # training moved the SFT loss
    png = summary["trajectory_png"]
    drawn = has_extra("matplotlib")  # the plot extra; without it the points are recorded, nothing is drawn
    if drawn:
        assert png.endswith("trajectory.png") and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert png.rsplit("/", 1)[0] == str(next(tmp_path.rglob("summary.json")).parent)
    else:
        assert png is None and not list(tmp_path.rglob("*.png"))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    tagged = "tradeoff/trajectory" in events.Tags()["images"]
    images = events.Images("tradeoff/trajectory") if tagged else []
    assert [im.step for im in images] == ([2, 4] if drawn else [])
    scalars = {s.step: s.value for s in events.Scalars("val/ideal_distance")}
    # At the step index of Lightning's own validation scalars (0-based: the 4th optimizer step is step 3).
    assert {s.step for s in events.Scalars("val/sft_loss")} == {1, 3} == set(scalars)
    assert scalars[3] == pytest.approx(metrics.last["val/ideal_distance"], abs=1e-6)


def test_beating_f_star_is_warned_once(tmp_path, caplog):
    """Validation losses below the given f* (f* too high for this budget): one warning per objective."""
    metrics = TradeoffMetrics(f_sft_star=100.0, f_dpo_star=100.0)
    t = trainer(tmp_path, 4, callbacks=[metrics], val_check_interval=2)
    with caplog.at_level("WARNING", logger="xright_pl.training.metrics"):
        t.fit(tiny_module(Alright(seed=0)), datamodule=demo_data(limit=64))
    assert metrics.last["val/sft_gap"] < 0 and metrics.last["val/dpo_gap"] < 0
    warned = [r.getMessage() for r in caplog.records if "is not the optimum" in r.getMessage()]
    assert len(warned) == 2 and "val/sft_loss" in warned[0] and "val/dpo_loss" in warned[1]


def test_start_point_uses_the_validation_normalisation(tmp_path):
    """evaluate_losses (the trajectory's start point) gives exactly what validate() logs for the same weights."""
    t = trainer(tmp_path, 1, limit_val_batches=2)
    module = tiny_module(Alright(seed=0))
    data = demo_data(limit=64)
    logged = {k: v for per_loader in t.validate(module, datamodule=data, verbose=False) for k, v in per_loader.items()}
    ours = evaluate_losses(t, module)
    assert ours["sft"] == pytest.approx(logged["val/sft_loss"], rel=1e-6)
    assert ours["dpo"] == pytest.approx(logged["val/dpo_loss"], rel=1e-6)


def test_optimum_from_maxright_and_beta_check(tmp_path):
    path = write_optimum(Optimum(1.25, 0.5, beta=0.1), tmp_path / "opt.json")
    sel = Maxright(optimum_file=str(path), eval_every=1)
    metrics = TradeoffMetrics()  # no optima of its own: takes MAXRIGHT's
    rec = ValRecorder()
    t = trainer(tmp_path, 2, callbacks=[sel, metrics, rec])
    t.fit(tiny_module(), datamodule=demo_data(limit=64))
    assert metrics.optimum.f_sft == 1.25 and optimum_of(t).f_dpo == 0.5
    assert metrics.last["val/sft_gap"] == pytest.approx(rec.points[-1][1] - 1.25, abs=1e-6)
    # The file was measured at beta=0.1: a run at another beta is refused before training.
    t2 = trainer(tmp_path / "b", 2, callbacks=[Maxright(optimum_file=str(path))])
    with pytest.raises(ConfigError, match="beta"):
        t2.fit(tiny_module(beta=0.5), datamodule=demo_data(limit=64))


def test_online_maxright_gives_no_gaps(tmp_path):
    """An online estimate is not a known optimum: no gap metrics are logged."""
    metrics = TradeoffMetrics()
    t = trainer(tmp_path, 2, callbacks=[Maxright(), metrics])
    t.fit(tiny_module(), datamodule=demo_data(limit=64))
    assert metrics.optimum is None and "val/ideal_distance" not in t.callback_metrics


def test_trajectory_without_matplotlib(tmp_path, monkeypatch, caplog):
    """Without matplotlib the points are still recorded, nothing is drawn, and one note is logged."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    traj = TrajectoryPlot()
    t = trainer(tmp_path, 2, callbacks=[traj], val_check_interval=1)
    with caplog.at_level("INFO"):
        t.fit(tiny_module(Alright(seed=0)), datamodule=demo_data(limit=64))
    assert [p[0] for p in traj.points] == [0, 1, 2]
    assert traj.png_path is None and not list(tmp_path.rglob("*.png"))
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["trajectory_png"] is None
    assert sum("matplotlib is not installed" in r.getMessage() for r in caplog.records) == 1


def test_trajectory_axes_each_readable():
    """The demo's shape: f_sft falls from 4.3 to 0.4 (log axis), f_dpo stays within a decade (0.13-0.35: linear).
    Every axis shows at least two numbers inside the data's range."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from xright_pl.callbacks.trajectory import plot_trajectory
    from xright_pl.core.optimum import Optimum

    points = [(0, 4.3, 0.35), (200, 1.2, 0.2), (400, 0.6, 0.15), (600, 0.45, 0.13)]
    fig = plot_trajectory(points, Optimum(f_sft=0.4, f_dpo=0.12, source="test"))
    FigureCanvasAgg(fig).draw()
    (ax,) = fig.axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "linear")
    for axis, lo, hi in ((ax.xaxis, 0.4, 4.3), (ax.yaxis, 0.12, 0.35)):
        labels = [t for t in axis.get_majorticklabels() if t.get_text()]
        inside = [t for t in labels if lo <= t.get_position()[0 if axis is ax.xaxis else 1] <= hi]
        assert len(inside) >= 2, [t.get_text() for t in labels]


def test_the_module_owns_the_optimum(tmp_path):
    """One owner: the module's ``optimum`` is the selector's given optima, or those given to TradeoffMetrics for
    the run (which the plot then reads through optimum_of); nothing looks for a class among trainer.callbacks."""
    assert tiny_module(Maxright()).optimum is None  # online estimate: not a known optimum
    module = tiny_module(Maxright(f_sft_star=1.0, f_dpo_star=0.5))
    assert (module.optimum.f_sft, module.optimum.f_dpo) == (1.0, 0.5)
    assert tiny_module(Maxright(f_star={"sft": 1.0, "dpo": 0.25})).optimum.f_star == {"sft": 1.0, "dpo": 0.25}
    module = tiny_module(Alright(seed=0))
    assert module.optimum is None
    metrics = TradeoffMetrics(f_sft_star=2.0, f_dpo_star=0.75)
    t = trainer(tmp_path, 1, callbacks=[metrics], val_check_interval=1)
    t.fit(module, datamodule=demo_data(limit=64))
    assert optimum_of(t) is None  # teardown: a later fit without the callback does not keep its optima
    probe = TradeoffMetrics(f_sft_star=2.0, f_dpo_star=0.75)
    probe.setup(t, module, "fit")
    assert module.optimum is probe.optimum and optimum_of(t).f_dpo == 0.75


def test_beating_f_star_of_named_data_sets_is_warned_once(tmp_path, caplog):
    """The warning works for named data sets (``data.datasets``): one per data set whose loss went below f*."""
    metrics = TradeoffMetrics(f_star={"terse": 100.0, "polite": 100.0, "prefs": 100.0})
    t = trainer(tmp_path, 4, callbacks=[metrics], val_check_interval=2)
    with caplog.at_level("WARNING", logger="xright_pl.training.metrics"):
        t.fit(tiny_module(Alright(seed=0)), datamodule=three_datasets())
    warned = [r.getMessage() for r in caplog.records if "is not the optimum" in r.getMessage()]
    assert sorted(m.split()[0] for m in warned) == ["val/polite_loss", "val/prefs_loss", "val/terse_loss"]
    assert all("f_star" in m for m in warned)
