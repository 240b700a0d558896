"""The composite data module: one tokenizer, an SFT part and a preference part.

Training batches are zipped by a Lightning ``CombinedLoader`` (``max_size_cycle``) over one
:class:`~xright_pl.data.streams.TicketIterable` per objective; the module turns a ticket into a batch only
for the objective the selector chose (see :mod:`xright_pl.data.streams`). Validation uses one plain loader
per objective.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from xright_pl.core.errors import ConfigError
from xright_pl.data.collate import collate_preference, collate_sft
from xright_pl.data.encoding import load_preference, load_sft, load_tokenizer
from xright_pl.data.specs import PreferenceData, SFTData
from xright_pl.data.streams import (
    BatchStream,
    TicketIterable,
    length_grouped_order,
    row_lengths,
    short_data_message,
)

log = logging.getLogger(__name__)

#: Columns of the preference sets holding precomputed reference log-probs ``s_ref(y_w)``, ``s_ref(y_l)``.
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: Token-id columns whose longest entry is a row's length (for length grouping).
LENGTH_COLUMNS = {"sft": ("input_ids",), "dpo": ("chosen_input_ids", "rejected_input_ids")}


def with_columns(dataset: Any, columns: dict[str, Sequence[float]]) -> Any:
    """``dataset`` with ``columns`` added (replacing same-named ones): a new ``datasets.Dataset``, or for a
    list of dict rows a new list of updated dicts."""
    n = len(dataset)
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values for {n} rows")
    if hasattr(dataset, "add_column"):
        present = [c for c in columns if c in dataset.column_names]
        if present:
            dataset = dataset.remove_columns(present)
        for name, values in columns.items():
            dataset = dataset.add_column(name, [float(v) for v in values])
        return dataset
    return [{**dataset[i], **{k: float(v[i]) for k, v in columns.items()}} for i in range(n)]


@dataclass
class Batching:
    """Batch sizes (per process) and loader settings."""

    sft_batch_size: int = 8
    """SFT sequences per micro-batch."""
    dpo_batch_size: int = 4
    """Preference pairs per micro-batch (each pair is two sequences)."""
    eval_batch_size: int = 16
    """Examples per validation batch."""
    pad_to_multiple_of: int = 8
    """Pad sequence length to a multiple of this (tensor-core friendly)."""
    num_workers: int = 0
    """Data loader worker processes."""
    shuffle: bool = True
    """Shuffle each epoch of the training data (seeded)."""
    group_by_length: bool = False
    """Batch rows of similar length together (less padding): each epoch's seeded permutation is cut into
    mega-batches of ``length_group_batches`` batches, each sorted by length; batches are then shuffled."""
    length_group_batches: int = 50
    """Batches per length-sorted mega-batch when ``group_by_length`` is on."""


@dataclass
class DataSet:
    """One named data set of a run with any number of objectives: its data, its objective and its weight.

    Give exactly one of ``sft`` (an SFT objective: token-mean NLL of the responses) and ``preference`` (a
    preference objective with the module's ``loss_type`` and ``beta``).
    """

    name: str
    """The objective's name: its metrics are ``train/{name}_loss``, ``val/{name}_loss``, ``steps/{name}``."""
    weight: float
    """``lambda_k`` in the target ``sum_k lambda_k f_k`` (the weights of all data sets sum to 1)."""
    sft: SFTData | None = None
    """SFT rows (as ``data.sft``)."""
    preference: PreferenceData | None = None
    """Preference pairs (as ``data.preference``)."""
    batch_size: int | None = None
    """Rows (SFT) or pairs (preference) per micro-batch; None: ``batching.sft_batch_size`` / ``dpo_batch_size``."""
    objective: str | None = None
    """The objective's registered kind (``xright_pl.objectives.plugins.OBJECTIVE_KINDS``) when it is not the default for
    its data (``sft`` for ``sft:`` rows, ``preference`` for ``preference:`` pairs), e.g. your own plugin."""

    @property
    def data_kind(self) -> str:
        """``sft`` or ``preference``: which rows the data set holds (and how its batches are collated)."""
        return "sft" if self.sft is not None else "preference"

    @property
    def kind(self) -> str:
        """The objective's kind: ``objective``, else the data's default (``sft`` or ``preference``)."""
        return self.objective or self.data_kind


def check_datasets(datasets: Sequence[DataSet]) -> None:
    """Raise a :class:`~xright_pl.core.errors.ConfigError` listing every problem of a ``datasets`` list."""
    problems = []
    names = [d.name for d in datasets]
    if len(datasets) < 2:
        problems.append(f"give at least 2 data sets (got {len(datasets)}); one objective needs no trade-off")
    for d in datasets:
        if not isinstance(d.name, str) or not d.name.isidentifier():
            problems.append(f"name {d.name!r}: use letters, digits and _ (it names metrics and config keys)")
        if (d.sft is None) == (d.preference is None):
            problems.append(f"{d.name}: give exactly one of sft and preference")
        if d.batch_size is not None and (not isinstance(d.batch_size, int) or d.batch_size < 1):
            problems.append(f"{d.name}: batch_size must be an integer >= 1, got {d.batch_size!r}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"names used twice: {', '.join(map(str, dupes))}")
    weights = [d.weight for d in datasets]
    numbers = all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)
    if not numbers or any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        problems.append(f"weights must be numbers >= 0 summing to 1, got {weights}")
    if problems:
        raise ConfigError("Invalid data.datasets:\n  - " + "\n  - ".join(problems))


DEMO_SFT = SFTData(path="builtin:demo/sft_train.jsonl", eval_path="builtin:demo/sft_eval.jsonl")
DEMO_PREFERENCE = PreferenceData(path="builtin:demo/pref_train.jsonl", eval_path="builtin:demo/pref_eval.jsonl")
DEFAULT_BATCHING = Batching()


class JointDataModule(pl.LightningDataModule):
    """SFT data and preference data for joint training, tokenized once with one tokenizer.

    Args:
        tokenizer: hub name or local folder of the tokenizer (``builtin:demo/tokenizer`` is the embedded one).
        sft: where the SFT rows come from and how they are formatted and truncated.
        preference: where the preference pairs come from and how they are formatted and truncated.
        batching: batch sizes and loader settings.
        seed: seed of the data order and of held-out splits.
        chat_template: Jinja chat template to use instead of the tokenizer's own (for conversational rows).
        trust_remote_code: allow a hub tokenizer's custom code (off unless you trust the source).
        datasets: any number of named data sets, each with its objective and weight, instead of ``sft`` and
            ``preference`` (which are then not read): the target is ``sum_k lambda_k f_k``, and the module
            takes its objectives and weights from here (``--model.lam`` is not used).
        held_in: also validate on a fixed sample of this many rows (SFT) or pairs (preference) of each
            objective's *training* set (a draw seeded by ``seed``, the same at every validation; all rows when the
            set is smaller), beside the held-out rows. Its metrics are the held-out ones with ``held_in/`` for
            ``val/`` (``held_in/sft_loss``, ``held_in/dpo_loss``, ``held_in/rewards_accuracies``); they reach
            ``summary.json``, and the trajectory records them as ``trajectory_held_in``. 0: held-out rows only.
    """

    def __init__(
        self,
        tokenizer: str = "builtin:demo/tokenizer",
        sft: SFTData = DEMO_SFT,
        preference: PreferenceData = DEMO_PREFERENCE,
        batching: Batching = DEFAULT_BATCHING,
        seed: int = 0,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        datasets: list[DataSet] | None = None,
        held_in: int = 0,
    ) -> None:
        super().__init__()
        if datasets is not None:
            check_datasets(datasets)
        if not isinstance(held_in, int) or isinstance(held_in, bool) or held_in < 0:
            raise ConfigError(f"data.held_in must be an integer >= 0 (rows per objective), got {held_in!r}")
        self.held_in = held_in
        self.held_in_rows: dict[str, list[int]] = {}
        self.datasets = [replace(d) for d in datasets] if datasets is not None else None
        self.tokenizer_name = tokenizer
        self.sft = replace(sft)
        self.preference = replace(preference)
        self.batching = replace(batching)
        self.seed = seed
        self.chat_template = chat_template
        self.trust_remote_code = trust_remote_code
        self.tokenizer = None
        self.train_sets: dict[str, Any] = {}
        self.val_sets: dict[str, Any] = {}
        self.skipped: dict[str, dict[str, int]] = {}
        self.streams: dict[str, BatchStream] = {}
        self._stream_state: dict[str, dict[str, int]] = {}
        self._warned_short: set[str] = set()

    # ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the tokenizer and tokenize both datasets (idempotent; cached by ``datasets``)."""
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(
            self.tokenizer_name, chat_template=self.chat_template, trust_remote_code=self.trust_remote_code
        )
        if self.datasets is not None:
            for d in self.datasets:
                loaded = (
                    load_sft(d.sft, self.tokenizer, seed=self.seed)
                    if d.data_kind == "sft"
                    else load_preference(d.preference, self.tokenizer, seed=self.seed)
                )
                self.train_sets[d.name] = loaded.train
                if loaded.val is not None:
                    self.val_sets[d.name] = loaded.val
                self.skipped[d.name] = dict(loaded.skipped)
        else:
            sft = load_sft(self.sft, self.tokenizer, seed=self.seed)
            pref = load_preference(self.preference, self.tokenizer, seed=self.seed)
            self.train_sets = {"sft": sft.train, "dpo": pref.train}
            self.val_sets = {k: v for k, v in (("sft", sft.val), ("dpo", pref.val)) if v is not None}
            self.skipped = {"sft": dict(sft.skipped), "dpo": dict(pref.skipped)}
        if self.held_in:
            self.held_in_rows = {
                name: sorted(random.Random(self.seed).sample(range(len(ds)), min(self.held_in, len(ds))))
                for name, ds in self.train_sets.items()
            }

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def objective_kinds(self) -> dict[str, str]:
        """``{name: "sft" | "preference"}`` of every objective, in order (the pair: ``sft``, ``dpo``)."""
        if self.datasets is None:
            return {"sft": "sft", "dpo": "preference"}
        return {d.name: d.kind for d in self.datasets}

    @property
    def objective_weights(self) -> dict[str, float] | None:
        """``{name: lambda_k}`` with ``datasets``; None for the pair (whose weight is the module's ``lam``)."""
        return None if self.datasets is None else {d.name: float(d.weight) for d in self.datasets}

    def data_kind(self, name: str) -> str:
        """``sft`` or ``preference``: the rows of objective ``name`` (the pair: ``sft`` and ``dpo``)."""
        if self.datasets is None:
            return "sft" if name == "sft" else "preference"
        return next(d.data_kind for d in self.datasets if d.name == name)

    def collate(self, name: str):
        fn = collate_sft if self.data_kind(name) == "sft" else collate_preference
        return partial(fn, pad_id=self.pad_id, pad_to_multiple_of=self.batching.pad_to_multiple_of)

    def batch_size(self, name: str) -> int:
        own = next((d.batch_size for d in self.datasets or [] if d.name == name), None)
        if own is not None:
            return own
        return self.batching.sft_batch_size if self.data_kind(name) == "sft" else self.batching.dpo_batch_size

    # ---------------------------------------------------------------------------------------------
    def train_dataloader(self) -> CombinedLoader:
        self.load()
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        # Rebuilt (e.g. reload_dataloaders_every_n_epochs): each stream continues where it is; on a resume,
        # where the checkpoint says (once).
        saved = {**self._stream_state, **{k: s.state() for k, s in self.streams.items()}}
        self._stream_state = {}
        self.streams = {}
        for name, ds in self.train_sets.items():
            stream = BatchStream(
                name,
                ds,
                self.batch_size(name),
                self.collate(name),
                seed=self.seed,
                shuffle=self.batching.shuffle,
                rank=rank,
                world_size=world,
                num_workers=self.batching.num_workers,
                order_fn=self._length_order(name, ds, world) if self.batching.group_by_length else None,
            )
            if name in saved:
                stream.restore(saved[name])
            if rank == 0:
                self._warn_short(name, len(ds), world)
            self.streams[name] = stream
        return CombinedLoader({k: TicketIterable(s) for k, s in self.streams.items()}, mode="max_size_cycle")

    def _warn_short(self, name: str, rows: int, world_size: int) -> None:
        """Warn once per objective when its training set is smaller than one batch."""
        msg = short_data_message(name, rows, self.batch_size(name), world_size)
        if msg is not None and name not in self._warned_short:
            self._warned_short.add(name)
            log.warning(msg)

    def _val_parts(self) -> list[tuple[str, str, Any]]:
        """``(objective, metric prefix, rows)`` of each validation loader: the held-out sets (``val``), then the
        held-in samples (``held_in``). A held-in sample is taken from the training set as it is now, so it carries
        the cached reference log-probs once they are computed."""
        self.load()
        parts = [(name, "val", ds) for name, ds in self.val_sets.items()]
        for name, rows in self.held_in_rows.items():
            ds = self.train_sets[name]
            parts.append((name, "held_in", ds.select(rows) if hasattr(ds, "select") else [ds[i] for i in rows]))
        return parts

    @property
    def val_names(self) -> list[str]:
        """The objective of each validation loader, in :meth:`val_dataloader`'s order."""
        self.load()
        return list(self.val_sets) + list(self.held_in_rows)

    @property
    def val_prefixes(self) -> list[str]:
        """The metric prefix of each validation loader (``val`` for held-out rows, ``held_in`` for the sample of
        training rows), in :meth:`val_dataloader`'s order."""
        self.load()
        return ["val"] * len(self.val_sets) + ["held_in"] * len(self.held_in_rows)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                ds,
                batch_size=self.batching.eval_batch_size,
                shuffle=False,
                collate_fn=self.collate(name),
                num_workers=self.batching.num_workers,
            )
            for name, _, ds in self._val_parts()
        ]

    def _length_order(self, name: str, dataset: Any, world_size: int):
        """The stream's ``order_fn`` for length-grouped batches (lengths read once, here)."""
        lengths = row_lengths(dataset, LENGTH_COLUMNS["sft" if self.data_kind(name) == "sft" else "dpo"])
        global_batch = self.batch_size(name) * world_size
        group, shuffle = self.batching.length_group_batches, self.batching.shuffle
        return lambda epoch, g: length_grouped_order(lengths, global_batch, group, g, shuffle)

    def set_reference_logps(
        self, split: str, chosen: Sequence[float], rejected: Sequence[float], name: str = "dpo"
    ) -> None:
        """Store precomputed reference log-probs in the ``split`` (``train`` or ``val``) preference set ``name``
        (the pair's ``dpo``, or a data set of ``datasets``), as columns :data:`REF_COLUMNS` (row order of the set);
        batches then carry them as ``ref_logps``.

        A training stream already opened keeps its position and reads the new columns from its next batch.
        """
        sets = {"train": self.train_sets, "val": self.val_sets}[split]
        sets[name] = with_columns(sets[name], dict(zip(REF_COLUMNS, (chosen, rejected))))
        stream = self.streams.get(name) if split == "train" else None
        if stream is not None:
            stream.replace_dataset(sets[name])

    # ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"streams": {k: s.state() for k, s in self.streams.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream_state = dict(state_dict.get("streams", {}))
        for name, s in self.streams.items():
            if name in self._stream_state:
                s.restore(self._stream_state[name])

    def consumed_examples(self) -> dict[str, int]:
        return {k: s.consumed_examples for k, s in self.streams.items()}
