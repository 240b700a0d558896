"""SIGTERM / SIGINT (Ctrl-C) during ``fit``: save ``last.ckpt`` at the next optimizer-step boundary, then stop.

Two parts, usable together or apart:

- :func:`stop_on_signals`, a context installed by ``python -m xright_pl fit`` around the whole command: from the
  first moment (configuration, model and data loading, tokenization) a SIGTERM or SIGINT raises
  :class:`Interrupted` at once (a clean stop with one message, exit status ``128 + signum``: 143 for SIGTERM, 130
  for SIGINT), instead of Lightning's flag that nothing reads before training.
- :class:`StopOnSignal`, a callback (the CLI adds it; add it to a plain ``Trainer`` yourself): while training, a
  signal is only recorded; at the end of the optimizer step in progress (never in the middle of gradient
  accumulation) ``last.ckpt`` is written atomically where ``--ckpt_path last`` finds it, then the run stops with
  :class:`Interrupted`, whose message names the file and the command that resumes. During a validation a signal
  stops at once (the validation's work is not kept; the last checkpoint is named). A second Ctrl-C while the step
  finishes stops at once without saving.

Under SLURM with auto-requeue (Lightning's ``SLURMEnvironment(auto_requeue=True)``, requeue signal SIGUSR1 unless
set otherwise) the requeue signal is deferred the same way: at the step boundary ``last.ckpt`` is written, then
Lightning's own requeue handler writes its ``hpc_ckpt_N.ckpt`` (which the requeued job resumes from) and runs
``scontrol requeue``; the run then stops. Outside training the requeue signal is left to Lightning.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from xright_pl.core.commandline import resume_command
from xright_pl.core.lightning_private import (
    cluster_environment,
    forget_sigterm,
    original_signal_handlers,
    save_last_checkpoint,
    should_accumulate,
    slurm_requeue,
)

#: Signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """The run was stopped by a signal. ``code`` (the exit status) is ``128 + signum``; ``str()`` is the message."""

    def __init__(self, signum: int, message: str, checkpoint: str | None = None) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        return self.message


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _State:
    """What the process-wide handler needs to know (one fit at a time per process)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pid: int | None = None  # the process that installed the handlers (forked workers keep them)
        self.previous: dict[int, Any] = {}
        self.deferring = False  # inside the training loop, outside validation: wait for the step boundary
        self.pending: int | None = None
        self.finishing = False  # the last optimizer step is done: the end-of-run hooks are running
        self.trainer: pl.Trainer | None = None
        self.phase = "start-up (configuration, model and data loading)"
        self.resume_command: Callable[[str], str] | None = None
        self.context = False  # stop_on_signals() is active (it prints the message)
        self.forwarded: set[int] = set()


_STATE = _State()


def _handler(signum: int, frame: Any) -> None:
    st = _STATE
    if st.pid != os.getpid():  # a forked worker (data loader, tokenization pool)
        if signum == signal.SIGINT:
            return  # Ctrl-C reaches the whole process group: the main process decides, and ends its workers
        signal.signal(signum, signal.SIG_DFL)  # SIGTERM: as without us
        os.kill(os.getpid(), signum)
        return
    if st.deferring and not (signum == signal.SIGINT and st.pending == signal.SIGINT):
        if st.pending is None:
            again = " (Ctrl-C again stops at once, without saving)" if signum == 2 else ""
            if st.finishing:
                text = "training is complete: finishing the end-of-run hooks (final checkpoint, summary), then exiting"
            else:
                text = "finishing the current optimizer step, then saving last.ckpt and stopping"
            # os.write, not print: the main thread may be inside a write to stderr (progress bar) right now.
            os.write(2, f"\nxright_pl: received {signal_name(signum)}: {text}{again}.\n".encode())
        st.pending = max(st.pending or 0, int(signum))
        _forward(signum)
        forget_sigterm(st.trainer)  # Lightning would stop after this micro-batch, mid-accumulation
        return
    _forward(signum)
    raise Interrupted(signum, _immediate_message(signum))


def _forward(signum: int) -> None:
    """Pass the signal on to the processes Lightning launched (DDP ranks started by this one), as Lightning does."""
    launcher = getattr(getattr(_STATE.trainer, "strategy", None), "launcher", None)
    if launcher is not None and signum not in _STATE.forwarded:
        _STATE.forwarded.add(signum)
        launcher.kill(signum)


def _immediate_message(signum: int) -> str:
    st = _STATE
    name = signal_name(signum)
    if st.deferring:  # second Ctrl-C
        return f"stopped by a second {name} during {st.phase}, without saving. " + _last_checkpoint_note()
    return f"stopped by {name} during {st.phase}. " + _last_checkpoint_note()


def _last_checkpoint_note() -> str:
    if _STATE.trainer is None:
        return "Nothing was saved (training had not started)."
    path = _existing_last(_STATE.trainer)
    if path is None:
        return "No checkpoint of this run was written: nothing to resume from."
    return f"Nothing after the last checkpoint {str(path)!r} was kept; resume from it with:\n  " + _resume_hint(path)


def _resume_hint(path: str | os.PathLike) -> str:
    st = _STATE
    if st.resume_command is not None:
        return st.resume_command(str(path))
    return f"trainer.fit(..., ckpt_path={str(path)!r})"


def _install(signums: Sequence[int]) -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signums:
        if s not in _STATE.previous:
            _STATE.previous[s] = signal.getsignal(s)
            signal.signal(s, _handler)
    _STATE.pid = os.getpid()


def _restore() -> None:
    if threading.current_thread() is threading.main_thread():
        for s, h in _STATE.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    _STATE.reset()


@contextmanager
def stop_on_signals(argv: Sequence[str] | None = None) -> Iterator[None]:
    """Stop on SIGTERM/SIGINT with :class:`Interrupted` from now on; print its message on stderr when it ends the
    block. ``argv``: the command's arguments, for the resume command in the message."""
    if _STATE.pid is not None:  # nested (a fit inside a fit's process): the outer one handles it
        yield
        return
    _install(STOP_SIGNALS)
    _STATE.context = True
    if argv is not None:
        _STATE.resume_command = lambda path: resume_command(argv)
    try:
        yield
    except Interrupted as e:
        print(f"xright_pl: {e.message}", file=sys.stderr, flush=True)
        raise
    finally:
        _restore()


def _checkpoint_callback(trainer: pl.Trainer | None):
    from xright_pl.callbacks.checkpoint import XRightCheckpoint

    if trainer is None:
        return None
    # Lightning's public list of checkpoint callbacks (XRightCheckpoint even behind a plain ModelCheckpoint)
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, XRightCheckpoint)), None)


def _last_path(trainer: pl.Trainer) -> str:
    cb = _checkpoint_callback(trainer)
    if cb is not None and cb.dirpath is not None:
        return os.path.join(cb.dirpath, "last.ckpt")
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


def _existing_last(trainer: pl.Trainer | None) -> str | None:
    if trainer is None:
        return None
    cb = _checkpoint_callback(trainer)
    candidates = [getattr(cb, "last_model_path", "") or "", _last_path(trainer)]
    return next((p for p in candidates if p and os.path.isfile(p)), None)


class StopOnSignal(Callback):
    """Save ``last.ckpt`` at the next optimizer-step boundary on SIGTERM/SIGINT (and SLURM's requeue signal), then
    stop with :class:`Interrupted` (exit status ``128 + signum``). See the module docstring.

    The checkpoint goes to the :class:`~xright_pl.XRightCheckpoint`'s folder (as its ``last.ckpt``, so
    ``--ckpt_path last`` resumes from it), or to ``<default_root_dir>/checkpoints/last.ckpt`` when the run has
    none, always through the atomic writer.
    """

    def __init__(self) -> None:
        self._installed_here = False
        self._requeue_signal: int | None = None
        self._requeue_requested = False

    # ------------------------------------------------------------------ phases
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if _STATE.pid is None:
            _install(STOP_SIGNALS)  # a plain Trainer without stop_on_signals()
            self._installed_here = True
        _STATE.trainer = trainer
        _STATE.phase = "setup"
        env = cluster_environment(trainer)
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            # Installed before Lightning registers its own: Lightning then leaves this signal to us.
            self._requeue_signal = int(env.requeue_signal)
            if threading.current_thread() is threading.main_thread():
                _STATE.previous.setdefault(self._requeue_signal, signal.getsignal(self._requeue_signal))
                signal.signal(self._requeue_signal, self._on_requeue_signal)
        from xright_pl.callbacks.checkpoint import AtomicCheckpointIO, TorchCheckpointIO

        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _STATE.phase = "the sanity-check validation (before training)"
        _take_back_from_lightning()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _STATE.phase = f"training (step {trainer.global_step})"
        _STATE.deferring = True
        _take_back_from_lightning()

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _STATE.phase = "setup"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or _STATE.trainer is not trainer or _STATE.finishing:
            return  # (the last step's validation is part of the end of the run: a signal waits for its end)
        _STATE.deferring = False
        _STATE.phase = f"the validation at step {trainer.global_step}"
        if _STATE.pending is not None:  # arrived after the step's end, before the validation: stop before it
            raise Interrupted(_STATE.pending, _immediate_message(_STATE.pending))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or _STATE.trainer is not trainer or _STATE.finishing:
            return
        _STATE.deferring = True
        _STATE.phase = f"training (step {trainer.global_step})"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _STATE.deferring = _STATE.finishing  # after the last step: the end-of-run hooks finish (see above)
        _STATE.phase = "the end of training"

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, Interrupted) and not _STATE.context:
            print(f"xright_pl: {exception.message}", file=sys.stderr, flush=True)
        self._release(trainer)

    def _release(self, trainer: pl.Trainer) -> None:
        # Lightning's teardown (after on_exception) puts back the handlers it found, ours: make it put back ours'.
        originals = original_signal_handlers(trainer)
        mine = {self._requeue_signal} if self._requeue_signal is not None else set()
        mine |= set(STOP_SIGNALS) if self._installed_here else set()
        for s in mine:
            if s in originals and s in _STATE.previous:
                originals[s] = _STATE.previous[s] if _STATE.previous[s] is not None else signal.SIG_DFL
        self._requeue_requested = False
        _STATE.deferring = False
        _STATE.finishing = False
        _STATE.pending = None
        if self._requeue_signal is not None and threading.current_thread() is threading.main_thread():
            previous = _STATE.previous.pop(self._requeue_signal, None)
            signal.signal(self._requeue_signal, previous if previous is not None else signal.SIG_DFL)
            self._requeue_signal = None
        if self._installed_here:
            self._installed_here = False
            _restore()
        else:
            _STATE.trainer = None
            _STATE.phase = "the end of the run"

    # ------------------------------------------------------------------ the step boundary
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _at_step_boundary(trainer, pl_module):
            return
        signum, requeue = _agree(trainer, _STATE.pending or 0, self._requeue_requested)
        _STATE.phase = f"training (step {trainer.global_step})"
        if signum:
            self._save_and_stop(trainer, signum, requeue)
        if trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step:
            # The last step (max_steps, or the module's own end, e.g. Sequential's last stage, which every rank
            # reaches at the same step): a signal from now on lets the end-of-run hooks (the final checkpoint, the
            # summary, the export: collectives some of them) finish on every rank; stopping one rank inside them
            # would leave the others waiting in a collective. The run then exits normally: its steps are all done.
            _STATE.finishing = True
            _STATE.phase = "the end of training"

    def _save_and_stop(self, trainer: pl.Trainer, signum: int, requeue: bool = False) -> None:
        _STATE.phase = f"the checkpoint at step {trainer.global_step}"
        path = save_last(trainer)  # still deferring: another SIGTERM does not cut the write (a 2nd Ctrl-C does)
        _STATE.deferring = False
        extra = ""
        if requeue:
            # Lightning's own handler, now at a step boundary: hpc_ckpt_N.ckpt (resumed by the requeued job) and
            # `scontrol requeue`.
            slurm_requeue(trainer, signum)
            extra = " The SLURM job was requeued; it resumes from the hpc checkpoint in default_root_dir."
        message = (
            f"stopped by {signal_name(signum)} at step {trainer.global_step}, after the last complete optimizer step;"
            f" saved {path!r}.{extra} Resume with:\n  {_resume_hint(path)}"
        )
        raise Interrupted(signum, message, checkpoint=path)

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        if _STATE.pid == os.getpid() and _STATE.deferring:
            self._requeue_requested = True
            _handler(signum, frame)
        elif _STATE.trainer is not None:  # outside training: what Lightning does (checkpoint now, requeue)
            slurm_requeue(_STATE.trainer, signum, frame)


def _take_back_from_lightning() -> None:
    """Replace Lightning's SIGTERM handler (registered at the start of the run; it calls ours after its own, which
    sets the flag that stops after the current micro-batch and broadcasts from inside the handler) by ours alone.
    Lightning puts back ours at its teardown, as the handler it found."""
    if _STATE.pid == os.getpid() and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            if s in _STATE.previous:
                signal.signal(s, _handler)


def _at_step_boundary(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    if hasattr(pl_module, "_micro") and not pl_module.automatic_optimization:
        return pl_module._micro == 0  # xright_pl: 0 right after an optimizer step (or a skipped non-finite one)
    return not should_accumulate(trainer)


def _agree(trainer: pl.Trainer, signum: int, requeue: bool) -> tuple[int, bool]:
    """Every process stops at the same step: the largest pending signal number over the processes, and whether
    any of them was asked to requeue (one tiny all-reduce per optimizer step, only with several processes)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([signum, int(requeue)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t[0].item()), bool(t[1].item())
    return signum, requeue


def save_last(trainer: pl.Trainer) -> str:
    """Write ``last.ckpt`` now (all processes call this), where ``--ckpt_path last`` finds it; returns its path."""
    cb = _checkpoint_callback(trainer)
    if cb is not None and cb.save_last:
        save_last_checkpoint(cb, trainer)
        return str(cb.last_model_path)
    path = _last_path(trainer)
    trainer.save_checkpoint(path)
    return path
