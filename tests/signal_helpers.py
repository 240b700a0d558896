"""Callbacks for the signal tests, importable by the CLI in a subprocess (``--trainer.callbacks+=signal_helpers.X``
with ``tests`` on ``PYTHONPATH``): they send a signal at an exact place of the run, never after a delay."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signum`` to this process at the start of optimizer step ``step``'s micro-batch ``micro``."""

    def __init__(self, step: int, micro: int = 0, signum: int = int(signal.SIGTERM)) -> None:
        self.step, self.micro, self.signum = step, micro, signum
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.sent and trainer.global_step == self.step and pl_module._micro == self.micro:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalDuringValidation(Callback):
    """Send SIGTERM at the first validation batch after training started; count the validation steps that ran."""

    def __init__(self) -> None:
        self.sent = False
        self.batches_after_signal = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.sent:
            self.batches_after_signal += 1
        elif not trainer.sanity_checking and trainer.global_step > 0:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
            self.batches_after_signal = 0  # reached only if the signal did not stop the validation


class SignalDuringDataLoad(Callback):
    """Send SIGTERM from inside the tokenization of the SFT data (``load_sft``), then write ``marker`` if the
    process went on (it must not)."""

    def __init__(self, marker: str) -> None:
        import xright_pl.data.module as data_module

        real = data_module.load_sft

        def load_sft(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            Path(marker).write_text("tokenization went on after SIGTERM")
            return real(*args, **kwargs)

        data_module.load_sft = load_sft


class WaitForSignalAt(Callback):
    """At the start of optimizer step ``step``: write ``marker``, then wait until a signal has been received (by
    xright_pl's handler or Lightning's), so that the test's external signal lands in that step (a condition, not a
    delay)."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or pl_module._micro != 0 or Path(self.marker).exists():
            return
        from xright_pl.callbacks.signals import _STATE

        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 600  # only a guard against hanging forever
        while _STATE.pending is None and not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.01)


class HoldAt(Callback):
    """At optimizer step ``step``: write ``marker``, then wait until the file ``release`` exists."""

    def __init__(self, step: int, marker: str, release: str) -> None:
        self.step, self.marker, self.release = step, marker, release

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or Path(self.marker).exists():
            return
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + 900
        while not Path(self.release).exists() and time.monotonic() < deadline:
            time.sleep(0.01)


class SignalAtTrainEnd(Callback):
    """Send SIGTERM to this process in ``on_train_end`` (after the last optimizer step, while the end-of-run hooks
    run)."""

    def on_train_end(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
