"""Resumable per-objective batch streams that advance only when their batch is trained on.

Joint training draws a batch from one objective at a time (or both, for Mix). A plain zip of two data
loaders would fetch a batch of each at every step and throw one away. Instead each objective owns a
:class:`BatchStream`: an endless sequence of epochs, each a seeded permutation of its dataset, read in order.
:meth:`BatchStream.peek` fetches the next batch (and keeps returning it), :meth:`BatchStream.consume` marks it
trained. A batch that was looked at but not trained (MAXRIGHT's evaluation of the objective it then does
not train) is therefore the next one that objective trains on: each dataset is consumed in order, nothing is
skipped, and the two datasets need not have equal length.

The stream's position (epoch, batches consumed) is all the state needed to resume exactly: the batch order
is a function of ``(seed, epoch)``. Under data parallelism every process reads its own slice of each global
batch; epochs whose length is not a multiple of the world size are padded by wrapping around (as
:class:`torch.utils.data.DistributedSampler` does), so no example is dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from xright_pl.core.errors import ConfigError

log = logging.getLogger(__name__)


def row_lengths(dataset: Any, columns: Sequence[str]) -> list[int]:
    """Per-row token length of ``dataset``: the longest of the list columns ``columns`` in each row.

    Reads list lengths from the Arrow table of a ``datasets.Dataset`` without decoding the token ids;
    any other map-style dataset of dict rows is read row by row.
    """
    if hasattr(dataset, "with_format"):  # a datasets.Dataset: an Arrow table (honouring any index mapping)
        import pyarrow.compute as pc

        table = dataset.with_format("arrow", columns=list(columns))[:]
        per_column = [pc.list_value_length(table.column(c)).to_pylist() for c in columns]
    else:
        rows = [dataset[i] for i in range(len(dataset))]
        per_column = [[len(r[c]) for r in rows] for c in columns]
    return [max(v) for v in zip(*per_column)]


def length_grouped_order(
    lengths: Sequence[int],
    global_batch: int,
    group_batches: int,
    generator: torch.Generator,
    shuffle: bool = True,
) -> list[int]:
    """An epoch order whose consecutive ``global_batch``-sized chunks hold rows of similar length.

    The (seeded) permutation is cut into mega-batches of ``group_batches`` global batches; each mega-batch
    is sorted by length (longest first) and cut into batches. The full batches are then shuffled (so the
    length does not trend through the epoch), the batch holding the longest row goes first (an
    out-of-memory error shows at the first step, not hours in), and a last partial batch stays last, so
    :class:`_EpochBatchSampler`'s chunks are exactly these batches. The result is a permutation of
    ``range(len(lengths))`` that depends only on ``lengths``, the sizes and the generator's state.

    Args:
        lengths: token length of each row (for a pair, the longer of its two sequences).
        global_batch: rows per optimizer micro-batch over all processes (batch size x world size).
        group_batches: batches per mega-batch (sorting window); 1 sorts within each batch only.
        generator: source of randomness (seeded per epoch by the stream).
        shuffle: start from a random permutation and shuffle the batches (else dataset order, batches
            in mega-batch order).
    """
    if global_batch < 1 or group_batches < 1:
        raise ValueError(f"global_batch and group_batches must be >= 1, got {global_batch}, {group_batches}")
    n = len(lengths)
    base = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    mega = global_batch * group_batches
    batches: list[list[int]] = []
    for start in range(0, n, mega):
        chunk = sorted(base[start : start + mega], key=lambda i: -lengths[i])  # stable: ties stay random
        batches.extend(chunk[j : j + global_batch] for j in range(0, len(chunk), global_batch))
    tail = [batches.pop()] if batches and len(batches[-1]) < global_batch else []
    if shuffle and batches:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
        batches.insert(0, batches.pop(longest))
    return [i for b in batches + tail for i in b]


def short_data_message(name: str, rows: int, batch_size: int, world_size: int = 1) -> str | None:
    """A warning for a training set smaller than one global batch (else None): every batch then holds the same
    rows, so training silently repeats them."""
    global_batch = batch_size * world_size
    if rows >= global_batch:
        return None
    return (
        f"the {name} training set has {rows} row(s), fewer than one batch ({name}_batch_size={batch_size} x "
        f"{world_size} process(es) = {global_batch}): every {name} batch holds the same {rows} row(s), so each "
        f"{name} step trains on them again (an epoch is one step). Add data, or lower batching.{name}_batch_size."
    )


class _EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices of one epoch of one process, starting at batch ``start``."""

    def __init__(self, order: list[int], batch_size: int, rank: int, world_size: int, start: int) -> None:
        self.order, self.batch_size, self.rank, self.world_size, self.start = (
            order,
            batch_size,
            rank,
            world_size,
            start,
        )
        self.global_batch = batch_size * world_size

    def __len__(self) -> int:
        return max(0, math.ceil(len(self.order) / self.global_batch) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.order)
        for b in range(self.start, math.ceil(n / self.global_batch)):
            chunk = self.order[b * self.global_batch : (b + 1) * self.global_batch]
            if len(chunk) < self.global_batch and self.world_size > 1:
                # Last global batch: split evenly, wrapping around so every process has the same size.
                per_rank = math.ceil(len(chunk) / self.world_size)
                chunk = (chunk * self.world_size)[: per_rank * self.world_size]
                yield chunk[self.rank * per_rank : (self.rank + 1) * per_rank]
            else:
                yield chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


class BatchStream:
    """An endless, resumable stream of batches of one dataset.

    Args:
        name: objective name (``sft`` or ``dpo``), used in messages.
        dataset: a map-style dataset (e.g. a tokenized ``datasets.Dataset``).
        batch_size: examples per batch on each process.
        collate_fn: turns a list of rows into a batch.
        seed: seed of the per-epoch permutations (same on every process).
        shuffle: permute each epoch (else dataset order).
        rank, world_size: this process's slice of each global batch.
        num_workers: data loader worker processes.
        order_fn: optional ``(epoch, generator) -> list[int]`` overriding the epoch order (length grouping).
    """

    def __init__(
        self,
        name: str,
        dataset: Any,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        order_fn: Callable[[int, torch.Generator], Sequence[int]] | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise ValueError(f"the {name} training set is empty")
        self.name = name
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.order_fn = order_fn
        self.epoch = 0
        self.position = 0  # batches consumed in the current epoch
        self.consumed_batches = 0
        self.consumed_examples = 0
        self._iter: Iterator[Any] | None = None
        self._buffer: list[Any] = []  # fetched, not yet consumed batches, in order
        self._read = (0, 0)  # (epoch, batch) where the open iterator reads next

    def __len__(self) -> int:
        """Batches per epoch on this process."""
        return math.ceil(len(self.dataset) / (self.batch_size * self.world_size))

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.order_fn is not None:
            return list(self.order_fn(epoch, g))
        if not self.shuffle:
            return list(range(len(self.dataset)))
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _open(self, epoch: int, start: int) -> Iterator[Any]:
        sampler = _EpochBatchSampler(self._order(epoch), self.batch_size, self.rank, self.world_size, start)
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=False,
            # Its own generator: opening the loader (e.g. on resume) must not draw from the global RNG that
            # the training step's dropout uses, or a resumed run would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        return iter(loader)

    def _fetch(self) -> Any:
        """Read one more batch after the buffered ones (crossing into the next epoch when needed)."""
        while True:
            if self._iter is None:
                if not self._buffer:  # reading resumes right after the consumed batches
                    self._read = (self.epoch, self.position)
                self._iter = self._open(*self._read)
            epoch, index = self._read
            try:
                batch = next(self._iter)
            except StopIteration:  # the epoch's sampler ran out
                self._iter, self._read = None, (epoch + 1, 0)
                continue
            if index + 1 < len(self):
                self._read = (epoch, index + 1)
            else:  # the epoch's last batch: the next read opens the next epoch
                self._iter, self._read = None, (epoch + 1, 0)
            return batch

    def peek(self, offset: int = 0) -> Any:
        """The untrained batch ``offset`` places ahead (``0``: the next one; the same until :meth:`consume`).

        Looking ahead (e.g. to count the response tokens of all micro-batches of an optimizer step) fetches
        the batches once; they are trained on later in this order.
        """
        while len(self._buffer) <= offset:
            self._buffer.append(self._fetch())
        return self._buffer[offset]

    def consume(self, num_examples: int) -> None:
        """Mark the next batch (the one :meth:`peek` returns) as trained on."""
        if not self._buffer:
            raise RuntimeError(f"consume() on the {self.name} stream without a peeked batch")
        self._buffer.pop(0)
        self.position += 1
        self.consumed_batches += 1
        self.consumed_examples += num_examples
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def replace_dataset(self, dataset: Any) -> None:
        """Read from ``dataset`` (same rows, e.g. with added columns) from the current position on; a peeked
        but unconsumed batch is fetched again from the new dataset."""
        if len(dataset) != len(self.dataset):
            raise ValueError(f"the {self.name} stream has {len(self.dataset)} rows, the new dataset {len(dataset)}")
        self.dataset = dataset
        self._iter, self._buffer = None, []

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed."""
        return self.epoch + self.position / max(1, len(self))

    def state(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "consumed_batches": self.consumed_batches,
            "consumed_examples": self.consumed_examples,
            "seed": self.seed,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "rows": len(self.dataset),
        }

    def restore(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (from :meth:`state`). The data must be the same rows; a different batch size
        continues at the same example (rounded down to a whole batch: at most one batch is seen again)."""
        if state.get("world_size", self.world_size) != self.world_size:
            raise ConfigError(
                f"cannot resume the {self.name} data position: the checkpoint was written with"
                f" {state['world_size']} processes, this run has {self.world_size}. Resume with the same"
                " --trainer.devices and --trainer.num_nodes."
            )
        rows = state.get("rows", len(self.dataset))
        if rows != len(self.dataset):
            raise ConfigError(
                f"cannot resume the {self.name} data position: the checkpoint was written with {rows} training rows,"
                f" this run has {len(self.dataset)}. Resume with the same data file, limit, max_length and"
                " val_fraction, or start a new run from the exported weights."
            )
        position = state["position"]
        old_batch = state.get("batch_size", self.batch_size)
        if old_batch != self.batch_size:
            examples = position * old_batch * self.world_size
            position = examples // (self.batch_size * self.world_size)
            log.warning(
                "%s batch size changed from %d to %d on resume: continuing at example %d of epoch %d (batch %d).",
                self.name, old_batch, self.batch_size, position * self.batch_size * self.world_size,
                state["epoch"], position,
            )  # fmt: skip
        self.epoch = state["epoch"]
        self.position = position
        self.consumed_batches = state["consumed_batches"]
        self.consumed_examples = state["consumed_examples"]
        self.seed = state.get("seed", self.seed)
        self._iter, self._buffer = None, []


class StreamTicket:
    """What the training loader yields per objective: a handle on the stream, not a batch.

    The module asks the stream for the batch only if the selector chose that objective.
    """

    __slots__ = ("stream",)

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream


class TicketIterable:
    """An endless iterable of :class:`StreamTicket` of a given length per epoch, for a ``CombinedLoader``."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[StreamTicket]:
        while True:
            yield StreamTicket(self.stream)
