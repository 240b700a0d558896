"""Every private Lightning member the package uses (:data:`xright_pl.core.lightning_private.PRIVATE_MEMBERS`) exists in
the installed Lightning, with the parameters we call it with: a Lightning upgrade that changes one fails here."""

from __future__ import annotations

import importlib
import inspect

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from xright_pl.core.lightning_private import PRIVATE_MEMBERS

#: The parameters (after ``self``) of the private methods we call or override.
SIGNATURES = {
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint"): ["trainer", "monitor_candidates"],
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_topk_checkpoint"): ["trainer", "monitor_candidates"],
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates"): ["trainer"],
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_should_skip_saving_checkpoint"): ["trainer"],
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_find_last_checkpoints"): ["trainer"],
    ("lightning.pytorch.trainer.connectors.signal_connector._SignalConnector", "_slurm_sigusr_handler_fn"): [
        "signum",
        "_",
    ],
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_should_accumulate"): [],
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path"): [],
    ("lightning.pytorch.cli.LightningCLI", "_parser"): ["subcommand"],
    ("lightning.pytorch.cli.LightningCLI", "_get"): ["config", "key", "default"],
    ("lightning.pytorch.cli.LightningCLI", "_run_subcommand"): ["subcommand"],
}


def _owner(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> dict[str, object]:
    """Instances of the owners whose private members are set in ``__init__`` (instance attributes)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path_factory.mktemp("t"),
    )
    return {
        "lightning.pytorch.Trainer": trainer,
        "lightning.pytorch.strategies.Strategy": trainer.strategy,
        "lightning.pytorch.core.optimizer.LightningOptimizer": LightningOptimizer(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        ),
        "lightning.pytorch.trainer.connectors.signal_connector._SignalConnector": _SignalConnector(trainer),
        "lightning.pytorch.callbacks.ModelCheckpoint": ModelCheckpoint(),
        "lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop": trainer.fit_loop.epoch_loop,
        "lightning.pytorch.loggers.TensorBoardLogger": TensorBoardLogger(tmp_path_factory.mktemp("tb")),
        "lightning.pytorch.loggers.CSVLogger": CSVLogger(tmp_path_factory.mktemp("csv")),
        "lightning.pytorch.strategies.DDPStrategy": DDPStrategy(start_method="spawn"),
        "lightning.pytorch.strategies.launchers.subprocess_script._SubprocessScriptLauncher": (
            _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
        ),
    }


def test_logger_version_and_spawn_detection(tmp_path):
    """``set_logger_version`` names the folder the logger writes to; ``spawns_processes`` tells ddp_spawn apart."""
    from xright_pl.core.lightning_private import logger_version, set_logger_version, spawns_processes

    for logger in (TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "csv")):
        assert logger_version(logger) is None
        set_logger_version(logger, 7)
        assert logger.version == 7 and logger.log_dir.endswith("version_7")
    spawned = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    launched = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert spawns_processes(spawned) and not spawns_processes(launched)


@pytest.mark.parametrize(
    ("owner", "member"), PRIVATE_MEMBERS, ids=[f"{o.rpartition('.')[2]}.{m}" for o, m in PRIVATE_MEMBERS]
)
def test_private_member_exists(owner, member, instances):
    cls = _owner(owner)
    target = instances.get(owner, cls)
    assert hasattr(target, member) or hasattr(cls, member), f"Lightning {pl.__version__}: {owner}.{member} is gone"
    expected = SIGNATURES.get((owner, member))
    if expected is not None:
        params = list(inspect.signature(getattr(cls, member)).parameters)[1:]
        assert params[: len(expected)] == expected, f"{owner}.{member}{params}: we call it with {expected}"


def test_the_list_is_complete():
    """No private Lightning member is reached outside ``lightning_private`` except the ones listed (overrides in the
    checkpoint callback and the CLI, which must be methods of those subclasses)."""
    import re
    from pathlib import Path

    import xright_pl

    names = {m for _, m in PRIVATE_MEMBERS}
    pattern = re.compile(r"(?:trainer|strategy|connector|fit_loop\.epoch_loop|cb|callback)\._([a-z]\w*)")
    for path in Path(xright_pl.__file__).parent.rglob("*.py"):
        if path.name == "lightning_private.py":
            continue
        for name in pattern.findall(path.read_text(encoding="utf-8")):
            assert f"_{name}" in names, f"{path.name}: private Lightning member _{name} used outside lightning_private"
