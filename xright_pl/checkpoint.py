"""Checkpoints that survive a kill at any moment, and resume to the exact same run.

:class:`XRightCheckpoint` is a :class:`~lightning.pytorch.callbacks.ModelCheckpoint` for this library's
manual-optimization loop. It saves ``last.ckpt`` every N optimizer steps, always between two optimizer
steps (never inside gradient accumulation), into ``<default_root_dir>/checkpoints`` unless told otherwise, so
that ``fit --ckpt_path last`` of the same command finds it whatever the logger's version folder. It writes
through :class:`AtomicCheckpointIO`: the file is written next to its final name, flushed to disk, then renamed
over the previous one, so a write killed half way (or a full disk) leaves the previous checkpoint intact and
loadable. A failed write is a :class:`CheckpointError` (one paragraph on the command line).

A resumed run continues with the same weights, optimizer and LR scheduler state, selector state (ALRIGHT's
generator, MAXRIGHT's tracked losses), data positions (including a batch looked at but not yet trained), the
module's training RNG stream and its step and token counters (see :meth:`XRightModule.on_save_checkpoint`).
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from xright_pl.errors import ConfigError, XRightError

log = logging.getLogger(__name__)


class CheckpointError(XRightError):
    """A checkpoint could not be written or read (disk full, permissions, corrupt file, ...)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The data goes to a temporary file in the same folder, is flushed and ``fsync``-ed, then renamed over
    ``path`` (an atomic replace on POSIX and Windows). On any failure the temporary file is removed and
    ``path`` keeps its previous content. Errors from the file system become :class:`CheckpointError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # created with the usual permissions (umask), unlike mkstemp's 0600
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise CheckpointError(_write_error(path, e)) from None
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, e: OSError) -> str:
    previous = f"The previous checkpoint {str(path)!r} is intact." if path.exists() else "No checkpoint was kept."
    if e.errno == errno.ENOSPC:
        cause = "the disk is full (No space left on device)"
        fix = "Free space or point the checkpoint dirpath (or --trainer.default_root_dir) at a larger disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = f"it may not be written ({e.strerror})"
        fix = "Check the folder's permissions or choose another --trainer.default_root_dir"
    else:
        cause = f"{type(e).__name__}: {e.strerror or e}"
        fix = "Check the folder, then resume with `fit --ckpt_path last`"
    return f"Could not write checkpoint {str(path)!r}: {cause}. {previous} {fix}; training stopped."


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_types() -> list[type]:
    """The library's plain dataclasses that may appear in a checkpoint's hyper-parameters.

    ``torch.load(weights_only=True)`` rebuilds only tensors, numbers, strings, containers and the types listed
    here (field values only: no code runs).
    """
    from xright_pl.data.module import Batching
    from xright_pl.data.sources import PreferenceData, SFTData

    types: list[type] = [Batching, PreferenceData, SFTData]
    try:
        from xright_pl.lora import LoraSettings
    except ImportError:  # pragma: no cover - optional dependency missing
        pass
    else:
        types.append(LoraSettings)
    return types


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and safe loading.

    Writes go through :func:`atomic_torch_save` (remote URLs fall back to Lightning's writer). Loads use
    ``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers, strings and containers only, so
    no code from the file is ever run.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"Checkpoint {str(path)!r} does not exist or is not a file. Pass an existing .ckpt file, or"
                " `--ckpt_path last` to resume from the newest last.ckpt of the run's checkpoint folder."
            )
        try:
            with torch.serialization.safe_globals(checkpoint_types()):
                return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file becomes one clear message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"Checkpoint {str(path)!r} could not be loaded ({type(e).__name__}: {first[:300]}). It is"
                " corrupt, or not a checkpoint written by xright_pl; resume from another one."
            ) from None


class XRightCheckpoint(ModelCheckpoint):
    """Save ``last.ckpt`` every N optimizer steps, atomically, where ``--ckpt_path last`` finds it.

    A ``ModelCheckpoint`` (all its options work) with these defaults and behaviours for xright_pl runs:

    - ``dirpath`` None means ``<trainer.default_root_dir>/checkpoints`` (not the logger's ``version_N``
      folder, which changes at every run), so ``python -m xright_pl fit ... --ckpt_path last`` resumes;
    - saves only between optimizer steps (never in the middle of gradient accumulation), with the state
      after the step: weights, optimizer, scheduler, selector, data position, RNG stream and counters;
    - installs :class:`AtomicCheckpointIO` when the strategy uses Lightning's default checkpoint writer.

    Args:
        dirpath: folder of the checkpoint files (None: ``<default_root_dir>/checkpoints``).
        filename: name pattern of the step checkpoints kept by ``save_top_k``.
        every_n_train_steps: save every this many optimizer steps (>= 1; 0 disables step-based saving).
        save_last: keep ``last.ckpt`` (the one ``--ckpt_path last`` resumes from).
        save_top_k: step checkpoints kept besides ``last.ckpt`` (0: only ``last.ckpt``; -1: all).
        monitor: metric ranking the kept step checkpoints (None: the most recent ones).
        mode: ``min`` or ``max`` for ``monitor``.
        train_time_interval: not supported with manual optimization (use every_n_train_steps).
        verbose: log every save.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = "step={step}",
        every_n_train_steps: int = 100,
        save_last: bool | Literal["link"] = True,
        save_top_k: int = 0,
        monitor: str | None = None,
        mode: str = "min",
        train_time_interval: timedelta | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(every_n_train_steps, int) or isinstance(every_n_train_steps, bool) or every_n_train_steps < 0:
            raise ConfigError(
                f"every_n_train_steps must be an integer >= 0 (optimizer steps between checkpoints; 0 disables"
                f" them), got {every_n_train_steps!r}. Set it in the trainer callbacks of the config."
            )
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ConfigError(f"save_top_k must be an integer >= -1, got {save_top_k!r}.")
        if train_time_interval is not None:
            raise ConfigError(
                "XRightCheckpoint saves between optimizer steps: use every_n_train_steps, not train_time_interval."
            )
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            mode=mode,
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps,
            save_on_train_epoch_end=False,  # the data are endless streams: an epoch is no save point here
        )
        self._explicit_dirpath = dirpath is not None

    # The folder must be known before `setup` (Lightning resolves `ckpt_path="last"` first).
    def _default_dir(self, trainer: pl.Trainer) -> str:
        return os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        if self.dirpath is None:
            self.dirpath = self._default_dir(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = self._default_dir(trainer)
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self._every_n_train_steps
        if n < 1 or trainer.global_step % n != 0 or getattr(pl_module, "_micro", 0) != 0:
            return  # not a save step, or inside gradient accumulation (gradients are not saved)
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "_micro", 0) != 0:
            return  # validation inside gradient accumulation: a deferred save waits for the step's end
        super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the final state too (``--ckpt_path last`` with a larger ``max_steps`` trains on)."""
        if self.save_last and self._every_n_train_steps >= 1 and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint file was written at (loaded with ``weights_only=True``)."""
    with torch.serialization.safe_globals(checkpoint_types()):
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
