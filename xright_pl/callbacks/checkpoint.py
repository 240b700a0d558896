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
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from xright_pl.core.errors import ConfigError, XRightError
from xright_pl.core.lightning_private import save_last_checkpoint
from xright_pl.core.moved import old_names

log = logging.getLogger(__name__)


class CheckpointError(XRightError):
    """A checkpoint could not be written or read (disk full, permissions, corrupt file, ...)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The data goes to a temporary file in the same folder, is flushed and ``fsync``-ed, then renamed over
    ``path`` (an atomic replace on POSIX and Windows). On any failure the temporary file is removed and
    ``path`` keeps its previous content. Errors from the file system become :class:`CheckpointError`.
    ``keep_previous``: the file that ``path``'s previous content becomes (a hard link made before the replace,
    so that ``path`` exists at every moment; a copy where hard links are not supported).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # created with the usual permissions (umask), unlike mkstemp's 0600
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.is_file():
            _keep_copy(path, Path(keep_previous))
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


def _keep_copy(path: Path, keep: Path) -> None:
    """Make ``keep`` hold ``path``'s current content (atomically: a link or copy under a temporary name, renamed)."""
    tmp = keep.parent / f".{keep.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, keep)
    finally:
        if tmp.exists():
            os.unlink(tmp)


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


def checkpoint_types() -> list[type | tuple[type, str]]:
    """The library's plain dataclasses that may appear in a checkpoint's hyper-parameters.

    ``torch.load(weights_only=True)`` rebuilds only tensors, numbers, strings, containers and the types listed
    here (field values only: no code runs). A ``(type, "module.Name")`` pair lets a checkpoint written before
    the type moved name it by its old module (``SFTData``/``PreferenceData`` lived in ``xright_pl.data.sources``,
    ``LoraSettings`` in ``xright_pl.lora``: :func:`xright_pl.core.moved.old_names`).
    """
    from xright_pl.data.module import Batching
    from xright_pl.data.specs import PreferenceData, SFTData

    types: list[type | tuple[type, str]] = [Batching, PreferenceData, SFTData]
    types += [(cls, f"xright_pl.data.sources.{cls.__qualname__}") for cls in (PreferenceData, SFTData)]
    try:
        from xright_pl.models.lora import LoraSettings
    except ImportError:  # pragma: no cover - optional dependency missing
        pass
    else:
        types.append(LoraSettings)
    # A checkpoint written before the package's folders names a moved type by its old module.
    types += [(cls, name) for cls in list(types) if isinstance(cls, type) for name in old_names(cls)]
    return types


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and safe loading.

    Writes go through :func:`atomic_torch_save` (remote URLs fall back to Lightning's writer). Loads use
    ``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers, strings and containers only, so
    no code from the file is ever run. A checkpoint that cannot be loaded is a :class:`CheckpointError` naming
    the file and the other checkpoints of its folder to resume from instead.

    Args:
        keep_previous: when ``last.ckpt`` is replaced, keep its previous content as ``prev-last.ckpt`` (a good
            fallback if ``last.ckpt`` is ever damaged; the folder then holds two checkpoints).
    """

    def __init__(self, keep_previous: bool = False) -> None:
        super().__init__()
        self.keep_previous = keep_previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)
        keep = None
        if self.keep_previous and os.path.basename(path) == LAST:
            keep = os.path.join(os.path.dirname(path), PREVIOUS_LAST)
        atomic_torch_save(checkpoint, path, keep_previous=keep)

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
                f" corrupt (truncated?), or not a checkpoint written by xright_pl. {_fallbacks(Path(path))}"
            ) from None


LAST = "last.ckpt"
#: The previous ``last.ckpt`` (``keep_previous``); its name does not start with ``last`` so that ``--ckpt_path last``
#: never picks it.
PREVIOUS_LAST = "prev-last.ckpt"
LOCK = "xright.lock"


def _fallbacks(path: Path) -> str:
    """Name the other loadable checkpoints of ``path``'s folder, newest first, and how to resume from one."""
    others = sorted(
        (p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for other in others:
        try:
            step = checkpoint_step(other)
        except Exception:  # noqa: BLE001 - damaged too: try the next one
            continue
        return (
            f"The previous good checkpoint is {str(other)!r} (step {step}): resume from it with `--ckpt_path"
            f" {shlex.quote(str(other))}` (and move the damaged file away before the next `--ckpt_path last`)."
        )
    return "No other checkpoint is kept in its folder: start again, or resume from a copy of an earlier one."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(folder: str | os.PathLike) -> Path:
    """Create ``folder/xright.lock`` (pid, host, start time) or refuse if another live run holds it.

    Creating it is also the write probe: a folder that cannot be written is a :class:`CheckpointError` here, before
    any training. A lock left by a dead process on this host is taken over with a warning (one on another host
    cannot be checked: it is refused, with the file to delete if that run is gone).
    """
    folder = Path(folder)
    path = folder / LOCK
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read_lock(path)
                if other.get("host") == host and isinstance(other.get("pid"), int):
                    if other["pid"] == os.getpid() or not _pid_alive(other["pid"]):
                        if other["pid"] != os.getpid():
                            log.warning(
                                "Taking over the stale lock %s of process %d (no longer running) on %s.",
                                path, other["pid"], host,
                            )  # fmt: skip
                        os.unlink(path)
                        continue
                who = f"process {other.get('pid', '?')} on host {other.get('host', '?')}"
                since = f", started {other['started']}" if other.get("started") else ""
                raise CheckpointError(
                    f"Checkpoint folder {str(folder)!r} is in use by another run ({who}{since}; lock file"
                    f" {str(path)!r}). Two runs writing the same folder would overwrite each other's checkpoints:"
                    " wait for that run to end, or give this one another --trainer.default_root_dir (or checkpoint"
                    f" dirpath). If that run is gone (e.g. it ran on another host), delete {str(path)!r}."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            return path
        raise CheckpointError(f"Could not take the lock {str(path)!r}: another run keeps replacing it.")
    except OSError as e:
        raise CheckpointError(
            f"Checkpoint folder {str(folder)!r} cannot be written ({e.strerror or e}): checked before training, so"
            " that no work is lost at the first save. Check the folder's permissions and free space, or point"
            " --trainer.default_root_dir (or the checkpoint dirpath) at a writable folder."
        ) from None


def missing_dirs(folder: str | os.PathLike) -> list[Path]:
    """The folders of ``folder``'s path that do not exist yet, deepest first."""
    missing = []
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def release_lock(path: Path | None) -> None:
    if path is None:
        return
    if _read_lock(path).get("pid") == os.getpid():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class XRightCheckpoint(ModelCheckpoint):
    """Save ``last.ckpt`` every N optimizer steps, atomically, where ``--ckpt_path last`` finds it.

    A ``ModelCheckpoint`` (all its options work) with these defaults and behaviours for xright_pl runs:

    - ``dirpath`` None means ``<trainer.default_root_dir>/checkpoints`` (not the logger's ``version_N``
      folder, which changes at every run), so ``python -m xright_pl fit ... --ckpt_path last`` resumes;
    - saves only between optimizer steps (never in the middle of gradient accumulation), with the state
      after the step: weights, optimizer, scheduler, selector, data position, RNG stream and counters;
    - installs :class:`AtomicCheckpointIO` when the strategy uses Lightning's default checkpoint writer;
    - holds a lock file ``xright.lock`` (pid, host) in the folder during ``fit``: a second run writing the same
      folder is refused before training (a lock of a dead process on this host is taken over with a warning);
      taking it is also the write probe (a read-only folder fails before training, not at the first save).

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
        keep_previous: keep the replaced ``last.ckpt`` as ``prev-last.ckpt``, a fallback if ``last.ckpt`` is
            damaged (twice the disk space for the last checkpoint).
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
        keep_previous: bool = False,
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
        self.keep_previous = keep_previous
        self._lock: Path | None = None

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
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(keep_previous=self.keep_previous)
        elif isinstance(io, AtomicCheckpointIO) and self.keep_previous:
            io.keep_previous = True
        if stage == "fit" and trainer.is_global_zero:
            self.lock_folder(trainer)

    def lock_folder(self, trainer: pl.Trainer) -> None:
        """Take the checkpoint folder's lock (rank 0 of a ``fit``; no collective). ``fit`` through the CLI takes it
        before anything of the run is written (so a refused run writes nothing); ``setup`` takes it otherwise.
        A second call is a no-op."""
        if self.dirpath is None:
            self.dirpath = self._default_dir(trainer)
        if self._lock is None and "://" not in str(self.dirpath):
            self._new_dirs = missing_dirs(self.dirpath)
            self._lock = acquire_lock(self.dirpath)

    def unlock(self) -> None:
        """Give the folder back (see :meth:`lock_folder`)."""
        self._unlock()

    def _unlock(self) -> None:
        """Release the folder; folders the lock created and nothing else filled are removed again (a run that
        failed before its first checkpoint leaves no empty checkpoint folder behind)."""
        release_lock(self._lock)
        self._lock = None
        for folder in getattr(self, "_new_dirs", []):
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (a checkpoint was written) or already gone: keep it and the folders above
        self._new_dirs = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unlock()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unlock()

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
            save_last_checkpoint(self, trainer)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint file was written at (loaded with ``weights_only=True``)."""
    with torch.serialization.safe_globals(checkpoint_types()):
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
