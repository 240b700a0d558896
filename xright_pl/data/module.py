"""The composite data module: one tokenizer, an SFT part and a preference part.

Training batches are zipped by a Lightning ``CombinedLoader`` (``max_size_cycle``) over one
:class:`~xright_pl.data.streams.TicketIterable` per objective; the module turns a ticket into a batch only
for the objective the selector chose (see :mod:`xright_pl.data.streams`). Validation uses one plain loader
per objective.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from xright_pl.data.collate import collate_preference, collate_sft
from xright_pl.data.sources import PreferenceData, SFTData, load_preference, load_sft, load_tokenizer
from xright_pl.data.streams import BatchStream, TicketIterable

log = logging.getLogger(__name__)


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
    ) -> None:
        super().__init__()
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

    # ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the tokenizer and tokenize both datasets (idempotent; cached by ``datasets``)."""
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(
            self.tokenizer_name, chat_template=self.chat_template, trust_remote_code=self.trust_remote_code
        )
        sft = load_sft(self.sft, self.tokenizer, seed=self.seed)
        pref = load_preference(self.preference, self.tokenizer, seed=self.seed)
        self.train_sets = {"sft": sft.train, "dpo": pref.train}
        self.val_sets = {k: v for k, v in (("sft", sft.val), ("dpo", pref.val)) if v is not None}
        self.skipped = {"sft": dict(sft.skipped), "dpo": dict(pref.skipped)}

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        self.load()

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def collate(self, name: str):
        fn = collate_sft if name == "sft" else collate_preference
        return partial(fn, pad_id=self.pad_id, pad_to_multiple_of=self.batching.pad_to_multiple_of)

    def batch_size(self, name: str) -> int:
        return self.batching.sft_batch_size if name == "sft" else self.batching.dpo_batch_size

    # ---------------------------------------------------------------------------------------------
    def train_dataloader(self) -> CombinedLoader:
        self.load()
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
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
            )
            if name in self._stream_state:
                stream.restore(self._stream_state[name])
            self.streams[name] = stream
        return CombinedLoader({k: TicketIterable(s) for k, s in self.streams.items()}, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        self.load()
        return [
            DataLoader(
                ds,
                batch_size=self.batching.eval_batch_size,
                shuffle=False,
                collate_fn=self.collate(name),
                num_workers=self.batching.num_workers,
            )
            for name, ds in self.val_sets.items()
        ]

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
