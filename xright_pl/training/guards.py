"""Guards against non-finite training: skip a step whose loss or gradient is NaN/inf, stop after too many in a
row, and never write non-finite weights to a checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from xright_pl.core.errors import XRightError

log = logging.getLogger(__name__)

__all__ = ["TrainingError", "NonFiniteGuard", "check_finite_weights"]


class TrainingError(XRightError):
    """Training cannot go on (e.g. too many consecutive non-finite losses or gradients)."""


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient, and stops training after ``limit`` in a row.

    Args:
        limit: how many skipped steps in a row raise :class:`TrainingError`.

    Attributes:
        skips: steps skipped in all (checkpointed, logged as ``train/nonfinite_skips``).
        in_a_row: steps skipped since the last finite one (checkpointed).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.skips = 0
        self.in_a_row = 0

    def check(self, step: int, branch: str, values: Mapping[str, Tensor]) -> bool:
        """True when every value (a step's losses, its gradient norm) is finite; else count, log and return False
        (the caller skips the update), or raise :class:`TrainingError` at ``limit`` skips in a row.

        With several processes the values must already be the same on every process (averaged), so that every
        process takes the same decision.
        """
        finite = torch.isfinite(torch.stack(list(values.values()))).tolist() if values else []
        if all(finite):
            self.in_a_row = 0
            return True
        self.skips += 1
        self.in_a_row += 1
        bad = ", ".join(f"{k}={float(v):g}" for (k, v), ok in zip(values.items(), finite) if not ok)
        log.warning(
            "step %d (%s branch): non-finite %s; update skipped (%d in a row, %d in all; stop after %d in a row)",
            step, branch, bad, self.in_a_row, self.skips, self.limit,
        )  # fmt: skip
        if self.in_a_row >= self.limit:
            raise TrainingError(
                f"Training stopped at optimizer step {step}: {self.limit} consecutive steps had a non-finite loss or"
                f" gradient (last: {branch} branch, {bad}); each was skipped without an update, and"
                " no checkpoint holds non-finite weights. Lower the learning rate or enable gradient clipping"
                " (--model.gradient_clip_val), check the data for degenerate rows, use bf16 instead of fp16, or"
                " allow more with --model.max_consecutive_nonfinite; then resume with --ckpt_path last."
            )
        return False


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Raise :class:`TrainingError` when a parameter of ``model`` holds NaN or inf (before writing a checkpoint)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise TrainingError(
            f"Refusing to write a checkpoint at step {step}: {len(bad)} policy tensors hold NaN or"
            f" inf (first: {bad[0]}). The previous checkpoint is kept; resume from it with a lower learning rate."
        )
