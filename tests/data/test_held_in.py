"""``data.held_in``: validation on a fixed sample of the training rows beside the held-out rows (the paper measures
its losses on training rows), with its own metrics (``held_in/...``), summary fields and trajectory."""

from __future__ import annotations

import json

import pytest
from helpers import demo_data, tiny_module, trainer

from xright_pl import Alright, Sequential, TrajectoryPlot
from xright_pl.callbacks.trajectory import evaluate_losses
from xright_pl.core.errors import ConfigError
from xright_pl.data.encoding import SOURCE_ROW_COLUMN


def test_held_in_sample_is_a_fixed_seeded_draw_of_the_training_rows():
    dm = demo_data(limit=64, held_in=8)
    dm.load()
    assert dm.val_names == ["sft", "dpo", "sft", "dpo"]
    assert dm.val_prefixes == ["val", "val", "held_in", "held_in"]
    assert len(dm.val_dataloader()) == 4
    train_rows = {k: set(ds[SOURCE_ROW_COLUMN]) for k, ds in dm.train_sets.items()}
    for name, rows in dm.held_in_rows.items():
        assert len(rows) == 8 and rows == sorted(set(rows)) and max(rows) < len(dm.train_sets[name])
        held = dm.train_sets[name].select(rows)[SOURCE_ROW_COLUMN]
        assert set(held) <= train_rows[name]
    again = demo_data(limit=64, held_in=8)
    again.load()
    assert again.held_in_rows == dm.held_in_rows  # the same rows at every validation and in every process
    other = demo_data(limit=64, held_in=8)
    other.seed = 1
    other.load()
    assert other.held_in_rows != dm.held_in_rows
    small = demo_data(limit=6, held_in=100)  # fewer rows than asked: all of them
    small.load()
    assert small.held_in_rows["sft"] == list(range(len(small.train_sets["sft"])))
    plain = demo_data(limit=64)
    plain.load()
    assert plain.val_prefixes == ["val", "val"] and plain.held_in_rows == {}
    with pytest.raises(ConfigError, match="data.held_in must be an integer >= 0"):
        demo_data(held_in=-1)


def test_held_in_metrics_reach_the_summary_and_the_trajectory(tmp_path):
    traj = TrajectoryPlot(log_figure=False)
    t = trainer(tmp_path, 2, callbacks=[traj], val_check_interval=1)
    module = tiny_module(Alright(seed=0))
    t.fit(module, datamodule=demo_data(limit=64, held_in=8))
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    for key in ("sft_loss", "dpo_loss", "rewards_accuracies"):
        assert f"held_in/{key}" in summary and f"val/{key}" in summary
    assert summary["held_in/sft_loss"] != summary["val/sft_loss"]
    held, out = summary["trajectory_held_in"], summary["trajectory"]
    assert [p[0] for p in held] == [0, 1, 2] and [p[0] for p in out] == [0, 1, 2]
    assert held[-1][1:] == pytest.approx([summary["held_in/sft_loss"], summary["held_in/dpo_loss"]])
    assert out[-1][1:] == pytest.approx([summary["val/sft_loss"], summary["val/dpo_loss"]])
    # The start point of each evaluation is computed like its validation (and only on its own loaders).
    logged = {k: v for d in t.validate(module, datamodule=t.datamodule, verbose=False) for k, v in d.items()}
    for prefix in ("val", "held_in"):
        ours = evaluate_losses(t, module, prefix)
        assert ours["sft"] == pytest.approx(logged[f"{prefix}/sft_loss"], rel=1e-6)
        assert ours["dpo"] == pytest.approx(logged[f"{prefix}/dpo_loss"], rel=1e-6)


def test_without_held_in_nothing_changes(tmp_path):
    traj = TrajectoryPlot(log_figure=False)
    t = trainer(tmp_path, 2, callbacks=[traj])
    t.fit(tiny_module(Alright(seed=0)), datamodule=demo_data(limit=64))
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert not [k for k in summary if k.startswith("held_in")] and "trajectory_held_in" not in summary


def test_held_in_pairs_carry_the_cached_reference_logps(tmp_path):
    """With precompute_reference_logps the reference model is released: the held-in sample must be taken from the
    training set with its cached columns (else validating it would need the reference)."""
    t = trainer(tmp_path, 4, val_check_interval=2)
    module = tiny_module(Sequential(first="sft", switch_step=2), precompute_reference_logps=True)
    t.fit(module, datamodule=demo_data(limit=64, held_in=8))
    assert module.reference_released
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert summary["held_in/dpo_loss"] > 0 and summary["optimizer_steps"] == 4
