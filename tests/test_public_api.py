"""The public names: ``from xright_pl import ...`` holds the selectors, the data and module classes and every callback
that configs name, so a config can say ``class_path: xright_pl.XRightCheckpoint``."""

from __future__ import annotations

import pytest
import yaml
from helpers import REPO

import xright_pl
from xright_pl.commands.cli import run

CALLBACKS = [
    "RunSummary",
    "XRightCheckpoint",
    "ExportOnFitEnd",
    "WinRateCallback",
    "TradeoffMetrics",
    "TrajectoryPlot",
    "StepProgress",
    "StopOnSignal",
]


def test_every_public_name_is_exported_and_the_callbacks_are_among_them():
    assert sorted(xright_pl.__all__) == xright_pl.__all__
    for name in xright_pl.__all__:
        assert getattr(xright_pl, name).__name__ == name
    assert set(CALLBACKS) <= set(xright_pl.__all__)
    from lightning.pytorch.callbacks import Callback

    for name in CALLBACKS:
        assert issubclass(getattr(xright_pl, name), Callback), name


def test_a_config_names_callbacks_by_their_public_name(capsys):
    args = ["fit", "--config", str(REPO / "configs/demo.yaml"), "--print_config"]
    args += ["--trainer.callbacks+=xright_pl.TrajectoryPlot", "--trainer.callbacks+=xright_pl.StopOnSignal"]
    with pytest.raises(SystemExit) as e:
        run(args)
    assert e.value.code == 0
    paths = [c["class_path"] for c in yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]]
    assert {"xright_pl.TrajectoryPlot", "xright_pl.StopOnSignal"} <= set(paths)
