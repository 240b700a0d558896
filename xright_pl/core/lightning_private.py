"""Every use of a private (underscore) member of Lightning, in one place.

Lightning gives no public way to do these few things; each function here names what it relies on, and
``tests/core/test_lightning_private.py`` checks every member listed in :data:`PRIVATE_MEMBERS` against the installed
Lightning, so an upgrade that renames or removes one fails that test, not a user's run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

#: ``(owner, member)`` pairs of every private Lightning member this package touches (owners as import paths).
PRIVATE_MEMBERS: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.strategies.Strategy", "_lightning_optimizers"),
    ("lightning.pytorch.core.optimizer.LightningOptimizer", "_on_before_step"),
    ("lightning.pytorch.core.optimizer.LightningOptimizer", "_on_after_step"),
    ("lightning.pytorch.Trainer", "_signal_connector"),
    ("lightning.pytorch.Trainer", "_accelerator_connector"),
    ("lightning.pytorch.trainer.connectors.signal_connector._SignalConnector", "_original_handlers"),
    ("lightning.pytorch.trainer.connectors.signal_connector._SignalConnector", "_slurm_sigusr_handler_fn"),
    ("lightning.pytorch.trainer.connectors.signal_connector._SignalConnector", "received_sigterm"),
    ("lightning.pytorch.loops.training_epoch_loop._TrainingEpochLoop", "_should_accumulate"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_topk_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_should_skip_saving_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_find_last_checkpoints"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_every_n_train_steps"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_defer_save_until_validation"),
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path"),
    ("lightning.pytorch.cli.LightningCLI", "_parser"),
    ("lightning.pytorch.cli.LightningCLI", "_get"),
    ("lightning.pytorch.loggers.TensorBoardLogger", "_version"),
    ("lightning.pytorch.loggers.CSVLogger", "_version"),
    ("lightning.pytorch.strategies.DDPStrategy", "_start_method"),
    ("lightning.pytorch.strategies.launchers.subprocess_script._SubprocessScriptLauncher", "procs"),
    ("lightning.pytorch.cli.LightningCLI", "_run_subcommand"),
)


def replace_optimizers(trainer: pl.Trainer) -> None:
    """Re-create the module's optimizers and schedulers (``configure_optimizers`` again) in the middle of a fit.

    The manual-optimization loop counts optimizer steps through hooks it set on the old ``LightningOptimizer``
    wrappers (``_on_before_step``/``_on_after_step``); they are moved to the new wrappers.
    """
    strategy = trainer.strategy
    old = strategy._lightning_optimizers
    strategy.setup_optimizers(trainer)
    for new, prev in zip(strategy._lightning_optimizers, old):
        new._on_before_step, new._on_after_step = prev._on_before_step, prev._on_after_step


def cluster_environment(trainer: pl.Trainer) -> Any:
    """The trainer's cluster environment (``SLURMEnvironment``, ...)."""
    return trainer._accelerator_connector.cluster_environment


def forget_sigterm(trainer: pl.Trainer | None) -> None:
    """Clear Lightning's SIGTERM flag (it would stop the run after the current micro-batch, mid-accumulation)."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:
        connector.received_sigterm = False


def original_signal_handlers(trainer: pl.Trainer) -> dict:
    """The handlers Lightning found when the run started and puts back at teardown (a mutable mapping)."""
    return getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", {})


def slurm_requeue(trainer: pl.Trainer, signum: int, frame: Any = None) -> None:
    """Lightning's own SLURM requeue handler: ``hpc_ckpt_N.ckpt`` in ``default_root_dir``, ``scontrol requeue``."""
    trainer._signal_connector._slurm_sigusr_handler_fn(signum, frame)


def should_accumulate(trainer: pl.Trainer) -> bool:
    """Automatic optimization: True inside gradient accumulation (no optimizer step at this batch)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def save_last_checkpoint(callback: Any, trainer: pl.Trainer) -> None:
    """``ModelCheckpoint``'s own ``last.ckpt`` save, now (with its usual monitor candidates)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def logger_version(logger: Any) -> int | str | None:
    """The version a TensorBoard or CSV logger was given (None: it picks the next free one when first asked)."""
    return logger._version


def set_logger_version(logger: Any, version: int | str) -> None:
    """Give a TensorBoard or CSV logger its version (its folder ``version_N``) after construction."""
    logger._version = version


def spawns_processes(trainer: pl.Trainer) -> bool:
    """True for a DDP strategy that starts its processes with ``spawn``/``forkserver`` (``ddp_spawn``), which
    pickles the module and its callbacks into the new processes."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    return isinstance(strategy, DDPStrategy) and getattr(strategy, "_start_method", None) in ("spawn", "forkserver")


def launched_processes(trainer: pl.Trainer) -> list:
    """The processes (``subprocess.Popen``) this process's DDP launcher started (``ddp``: ranks > 0); [] for none.
    (The launcher class is private; its ``procs`` list is what Lightning itself kills on Ctrl-C.)"""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return list(getattr(launcher, "procs", None) or [])
