"""The LightningModule (``module``: the Lightning hooks) and what it delegates to: the step accumulator,
the reference log-probs, the non-finite guard, the RNG stream, rank agreement, the trade-off metrics. Imports
``core`` and the four parts (``objectives``, ``selectors``, ``data``, ``models``)."""
