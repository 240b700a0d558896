"""Batching tokenized rows into padded :class:`~xright_pl.core.types.SFTBatch` / :class:`PreferenceBatch`.

Rows are what a tokenized :class:`datasets.Dataset` yields with no format set (dicts of python lists);
tensors work too. Padding is on the right; ``attention_mask`` comes from the row lengths (never from
comparing ids with ``pad_id``, which may equal the EOS id) and labels are ``IGNORE_INDEX`` on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xright_pl.core.types import IGNORE_INDEX, PreferenceBatch, SFTBatch


def _padded_length(lengths: Sequence[int], pad_to_multiple_of: int | None) -> int:
    t = max(lengths)
    if pad_to_multiple_of and pad_to_multiple_of > 1:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    return t


def _pad(
    seqs: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_id: int,
    pad_to_multiple_of: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not seqs:
        raise ValueError("cannot collate an empty list of rows")
    lengths = [len(s) for s in seqs]
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        if len(lab) != len(s):
            raise ValueError(f"row {i}: labels has {len(lab)} entries but input_ids has {len(s)}")
    t = _padded_length(lengths, pad_to_multiple_of)
    n = len(seqs)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    out_labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labels)):
        k = lengths[i]
        if k:
            input_ids[i, :k] = torch.as_tensor(s, dtype=torch.long)
            out_labels[i, :k] = torch.as_tensor(lab, dtype=torch.long)
            attention_mask[i, :k] = 1
    return input_ids, attention_mask, out_labels


def collate_sft(rows: list[dict], pad_id: int, pad_to_multiple_of: int = 8) -> SFTBatch:
    """Right-pad ``input_ids``/``labels`` rows into an :class:`SFTBatch` (length a multiple of
    ``pad_to_multiple_of``; 0 or 1 pads to the longest row only)."""
    ids, mask, labels = _pad([r["input_ids"] for r in rows], [r["labels"] for r in rows], pad_id, pad_to_multiple_of)
    return SFTBatch(input_ids=ids, attention_mask=mask, labels=labels)


def collate_preference(rows: list[dict], pad_id: int, pad_to_multiple_of: int = 8) -> PreferenceBatch:
    """Stack pairs as ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]`` padded to one length.

    If every row has ``ref_chosen_logps`` and ``ref_rejected_logps``, ``ref_logps`` is a float32 ``[2B]``
    tensor in the same order; if none has them it is ``None``; a mix is an error.
    """
    seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    ids, mask, out_labels = _pad(seqs, labels, pad_id, pad_to_multiple_of)
    has_ref = [r.get("ref_chosen_logps") is not None and r.get("ref_rejected_logps") is not None for r in rows]
    ref = None
    if all(has_ref):
        vals = [float(r["ref_chosen_logps"]) for r in rows] + [float(r["ref_rejected_logps"]) for r in rows]
        ref = torch.tensor(vals, dtype=torch.float32)
    elif any(has_ref):
        missing = [i for i, h in enumerate(has_ref) if not h]
        raise ValueError(
            f"rows {missing[:10]} lack ref_chosen_logps/ref_rejected_logps while others have them; "
            "precompute reference log-probs for every row or for none."
        )
    return PreferenceBatch(input_ids=ids, attention_mask=mask, labels=out_labels, ref_logps=ref)
