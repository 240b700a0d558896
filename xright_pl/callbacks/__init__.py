"""The Trainer callbacks the library ships (summary, checkpoint, trajectory, progress, signals, win rate).
They read the module's public attributes; they import ``inference`` and below.

The names of the former ``xright_pl.callbacks`` module are re-exported here, so old paths such as
``xright_pl.callbacks.weights_sha256`` keep working."""

from xright_pl.callbacks.summary import RunSummary, format_summary, peak_memory_mb, weights_sha256

__all__ = [
    "RunSummary",
    "format_summary",
    "peak_memory_mb",
    "weights_sha256",
]
