"""Progress in optimizer steps, readable on a terminal and in a log file.

Lightning's default bars count batches per epoch; the training streams here are endless and one optimizer step
can be several micro-batches, so they show ``Epoch 0/-2 40/40`` and, outside a terminal, nothing until the end.
:class:`StepProgress` shows what a run is made of instead, on one line::

    step 120/600 (20%) | sft 58 dpo 62 | train/sft_loss 0.512 train/dpo_loss 0.231 | 2.8 steps/s, eta 0:02:51

On a terminal the line is redrawn in place; when the output is not a terminal (a log file, SLURM, ``nohup``) a new
line is printed every ``every_n_steps`` optimizer steps. Each validation prints its results on a line of its own,
and the last line is finished before the run summary is printed.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

TRAIN_KEYS = ("train/sft_loss", "train/dpo_loss")


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


class StepProgress(ProgressBar):
    """One line of progress in optimizer steps (``--progress.*``; ``--trainer.enable_progress_bar false`` hides it).

    Args:
        every_n_steps: outside a terminal, print a progress line every this many optimizer steps (and at the
            last step); on a terminal the line is redrawn at every step.
        tty: force the terminal (``true``) or the log (``false``) behaviour; ``null`` detects it from stdout.
    """

    def __init__(self, every_n_steps: int = 20, tty: bool | None = None) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            from xright_pl.core.errors import ConfigError

            raise ConfigError(f"progress every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.tty = tty
        self.stream: TextIO | None = None  # None: sys.stdout at print time (tests may set a buffer)
        self._enabled = True
        self._open_line = False  # a terminal line is drawn and not yet finished
        self._shown_step = -1
        self._t0 = 0.0
        self._step0 = 0

    # --- ProgressBar protocol ------------------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._finish_line()
        print(*args, file=self._out(), flush=True, **kwargs)

    # --- output --------------------------------------------------------------------------------------
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        isatty = getattr(self._out(), "isatty", None)
        return bool(isatty and isatty())

    def _write(self, text: str, redraw: bool) -> None:
        out = self._out()
        if redraw:
            out.write("\r\033[2K" + text)
            self._open_line = True
        else:
            self._finish_line()
            out.write(text + "\n")
        out.flush()

    def _finish_line(self) -> None:
        if self._open_line:
            self._out().write("\n")
            self._out().flush()
            self._open_line = False

    # --- what is shown -------------------------------------------------------------------------------
    @staticmethod
    def _total(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        totals = [trainer.max_steps] if trainer.max_steps and trainer.max_steps > 0 else []
        try:
            selector = pl_module.selector
        except Exception:  # noqa: BLE001 - not an XRightModule, or no selector: no final step to show
            selector = None
        final = selector.final_step() if selector is not None and selector.lam is not None else None
        if final is not None:
            totals.append(final)
        return min(totals) if totals else None

    def step_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """``step N/T (P%) | sft a dpo b | train losses | speed, eta`` for the optimizer step just finished."""
        step = trainer.global_step
        total = self._total(trainer, pl_module)
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        steps = getattr(pl_module, "steps", None)
        if steps:
            parts.append(" ".join(f"{k} {v}" for k, v in steps.items()))
        metrics = trainer.callback_metrics
        keys = [f"train/{name}_loss" for name in steps] if steps else TRAIN_KEYS  # one per objective
        losses = [f"{k} {_fmt(metrics[k])}" for k in keys if k in metrics]
        if losses:
            parts.append(" ".join(losses))
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            speed = f"{rate:.2f} steps/s" if rate >= 0.1 else f"{elapsed / done:.1f} s/step"
            if total:
                speed += f", eta {timedelta(seconds=round(max(total - step, 0) / rate))}"
            parts.append(speed)
        return " | ".join(parts)

    @staticmethod
    def validation_line(trainer: pl.Trainer) -> str:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        return f"validation at step {trainer.global_step}: " + "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())

    # --- hooks ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._step0 = self._shown_step = trainer.global_step
        if self._enabled and trainer.is_global_zero:
            total = self._total(trainer, pl_module)
            self._write(f"training from step {trainer.global_step}" + (f" to {total}" if total else ""), redraw=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self._enabled or not trainer.is_global_zero or step == self._shown_step:
            return  # inside gradient accumulation, or nothing new
        self._shown_step = step
        last = step == self._total(trainer, pl_module) or trainer.should_stop
        if self._is_tty():
            self._write(self.step_line(trainer, pl_module), redraw=True)
        elif step % self.every_n_steps == 0 or last:
            self._write(self.step_line(trainer, pl_module), redraw=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            self._write(self.validation_line(trainer), redraw=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            if self._is_tty() and self._shown_step != trainer.global_step:
                self._write(self.step_line(trainer, pl_module), redraw=True)
            self._finish_line()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish_line()
