"""The training RNG stream: the random draws of training (dropout) in a generator state of their own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["RngStream"]


class RngStream:
    """A random stream kept apart from the global one, saved in checkpoints.

    Validation, data loaders and user code also draw from the global generator; keeping the training draws in a
    stream of their own makes a resumed run draw exactly what an uninterrupted one draws.

    Attributes:
        state: ``{"cpu": ..., "cuda": ...}`` generator states where the stream stands (``None`` before its first
            use: it starts from the global state of that moment).
    """

    def __init__(self) -> None:
        self.state: dict[str, Tensor | None] | None = None

    @contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        """Draw from this stream inside the block (the CPU generator, and ``device``'s when it is a GPU); the
        global generators are as they were after it."""
        cuda = device.type == "cuda"
        outer = torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
        if self.state is not None:
            torch.set_rng_state(self.state["cpu"])
            if cuda and self.state.get("cuda") is not None:
                torch.cuda.set_rng_state(self.state["cuda"], device)
        try:
            yield
        finally:
            self.state = {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if cuda else None,
            }
            torch.set_rng_state(outer[0])
            if cuda:
                torch.cuda.set_rng_state(outer[1], device)
