"""What ``fit`` claims before the Trainer starts, and gives back when the start fails.

Two runs started at the same moment on one ``default_root_dir`` must not write into each other's folders, and a
run that fails its start-up checks must leave nothing behind. So, on rank 0, before Lightning writes anything
(``config.yaml``, ``hparams.yaml``, the event file):

1. the root (and the logger's folder) is created and probed for writing: a read-only mount, or a path below a
   regular file, is one clear :class:`~xright_pl.core.errors.ConfigError`, not a traceback from the logger;
2. each :class:`~xright_pl.XRightCheckpoint` takes its folder's lock (the second run is refused here,
   having written nothing);
3. the logger's ``version_N`` folder is picked atomically (``mkdir`` either creates it or fails because another
   run did: then ``N + 1``), and the logger is given that version. The other processes of a DDP run that
   Lightning starts from this one read it from ``XRIGHT_PL_RUN_VERSION`` (ranks started otherwise, by torchrun or
   SLURM, get the folder from rank 0 at ``setup``: :func:`xright_pl.training.distributed.agree_run_dir`).

If ``fit`` then fails before training starts (``on_train_start``: after the checkpoint was restored and the data
were loaded), :func:`release` removes the version folder's files that the start wrote and the folders this run
created, and gives the lock back. Nothing here is a collective: it runs on some ranks only. Remote roots
(``s3://...``) are left to Lightning.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from xright_pl.callbacks.checkpoint import XRightCheckpoint, missing_dirs
from xright_pl.core.errors import ConfigError
from xright_pl.core.lightning_private import launched_processes, logger_version, set_logger_version

#: ``<logger root>|<version>`` of the run being started, for the other processes of a DDP run.
VERSION_ENV = "XRIGHT_PL_RUN_VERSION"
#: What a run's start writes into its version folder (removed again when the start fails).
START_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", "events.out.tfevents.*")


@dataclass
class Claim:
    """What :func:`claim` took for one ``fit``: folders it created (deepest first), the version folder, the
    checkpoint callbacks whose lock it holds, and whether training started."""

    trainer: Any
    created: list[Path] = field(default_factory=list)
    version_dir: Path | None = None
    locked: list[XRightCheckpoint] = field(default_factory=list)
    started: bool = False


class _TrainingStarted(Callback):
    """Marks the claim once training starts: from then on a failure keeps the run's folder (its logs, its
    checkpoints) for diagnosis."""

    def __init__(self, taken: Claim) -> None:
        self.taken = taken

    def on_train_start(self, trainer, pl_module) -> None:
        self.taken.started = True


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(path))  # normalised (``..`` collapsed), the same on every rank


def _versioned_logger(trainer) -> Any | None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = trainer.loggers
    return loggers[0] if loggers and isinstance(loggers[0], (TensorBoardLogger, CSVLogger)) else None


def _writable(folder: Path, what: str) -> list[Path]:
    """Create ``folder`` (and its missing parents) and write a probe file in it; returns the folders created."""
    created = missing_dirs(folder)
    try:
        for attempt in range(3):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd, probe = tempfile.mkstemp(prefix=".xright_probe_", dir=folder)
                break
            except FileNotFoundError:  # a refused run removed the folder it had just created: create it again
                if attempt == 2:
                    raise
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _remove_empty(created)
        reason = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and os.fspath(e.filename) != str(folder) else ""
        raise ConfigError(
            f"{what} {str(folder)!r} cannot be written: {reason}{where}. Give a folder this user can create and"
            " write (e.g. --trainer.default_root_dir runs/my_run)."
        ) from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (another run, or files we keep) or gone


def _next_version(root: Path) -> int:
    versions = [int(p.name[8:]) for p in root.glob("version_*") if p.is_dir() and p.name[8:].isdigit()]
    return max(versions, default=-1) + 1


def claim(trainer) -> Claim:
    """Rank 0: probe the root, take the checkpoint locks, pick the version folder (see the module docstring).
    Other ranks: take the version rank 0 picked, when it was passed on. On an error, what was taken is given
    back before it propagates."""
    taken = Claim(trainer)
    trainer.callbacks.append(_TrainingStarted(taken))
    logger = _versioned_logger(trainer)
    if "://" in str(trainer.default_root_dir):
        return taken  # a remote root: Lightning's own handling
    if not trainer.is_global_zero:
        root, _, version = os.environ.get(VERSION_ENV, "").rpartition("|")
        if logger is not None and logger_version(logger) is None and version.isdigit():
            if str(_absolute(logger.root_dir)) == root:
                set_logger_version(logger, int(version))
        return taken
    try:
        taken.created += _writable(_absolute(trainer.default_root_dir), "--trainer.default_root_dir")
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, XRightCheckpoint):
                cb.lock_folder(trainer)
                taken.locked.append(cb)
        if logger is not None and logger_version(logger) is None and "://" not in str(logger.root_dir):
            root = _absolute(logger.root_dir)
            taken.created = _writable(root, "the logger's folder") + taken.created
            n = _next_version(root)
            while True:
                try:
                    (root / f"version_{n}").mkdir()
                    break
                except FileExistsError:
                    n += 1  # another run took it between the listing and the mkdir
            taken.version_dir = root / f"version_{n}"
            set_logger_version(logger, n)
            os.environ[VERSION_ENV] = f"{root}|{n}"
    except BaseException:
        release(taken, failed=True)
        raise
    return taken


def end_children(trainer, grace_s: float = 20.0) -> None:
    """After a failed ``fit`` on this process: end the DDP processes it started. Each gets ``grace_s`` seconds to
    end by itself (a SIGTERM stops every rank at the same step); one still running is then waiting in a collective
    that this process will never join, and is killed, instead of hanging until the backend's timeout."""
    deadline = time.monotonic() + grace_s
    for proc in launched_processes(trainer):
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except (subprocess.TimeoutExpired, KeyboardInterrupt, Exception):  # a 2nd Ctrl-C: no more waiting
            proc.kill()
            proc.wait()


def _remove_start_files(folder: Path) -> None:
    """The files a start writes, then the folder if that emptied it (anything else in it is kept)."""
    for pattern in START_FILES:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink()
    _remove_empty([folder])


def release(taken: Claim | None, failed: bool) -> None:
    """After ``fit``: on a failure before training started, remove what :func:`claim` and the start created;
    always give the locks back (Lightning's teardown has already done so when ``fit`` ran). Never interrupted
    half-way by a signal's exception."""
    if taken is None:
        return
    try:
        if failed:
            end_children(taken.trainer)
    finally:
        if taken.version_dir is not None:
            os.environ.pop(VERSION_ENV, None)
        for cb in taken.locked:
            cb.unlock()
        if failed and not taken.started:
            if taken.version_dir is not None:
                _remove_start_files(taken.version_dir)
            _remove_empty(taken.created)
