"""Typed containers for what flows between the data, the losses and the module.

Shapes use ``B`` for the number of examples (SFT rows or preference pairs) and ``T`` for the padded
sequence length. Label positions equal to :data:`IGNORE_INDEX` are not scored (prompt and padding).
Labels are *aligned with* ``input_ids`` (``labels[:, t]`` is the token at position ``t``); the shift by
one for next-token prediction happens in :func:`xright_pl.objectives.losses.token_logps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class SFTBatch:
    """A padded batch of SFT sequences (prompt + response + EOS).

    Attributes:
        input_ids: ``[B, T]`` long token ids, right-padded.
        attention_mask: ``[B, T]`` long, 1 on real tokens, 0 on padding.
        labels: ``[B, T]`` long, the token id on response tokens, :data:`IGNORE_INDEX` elsewhere.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_examples(self) -> int:
        return self.input_ids.shape[0]

    def num_tokens(self) -> torch.Tensor:
        """Number of non-padding tokens in the batch (0-dim tensor, no host sync)."""
        return self.attention_mask.sum()

    def loss_units(self) -> torch.Tensor:
        """What the SFT loss averages over: the scored response tokens (labels shifted by one, as in
        :func:`xright_pl.objectives.losses.token_logps`). 0-dim long; call it on the host copy to avoid a sync."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum()


@dataclass
class PreferenceBatch:
    """A padded batch of preference pairs, chosen and rejected stacked for one forward pass.

    Rows ``0..B-1`` are the chosen sequences (prompt + chosen + EOS) and rows ``B..2B-1`` the rejected
    ones (prompt + rejected + EOS), pair ``i`` in rows ``i`` and ``B + i``.

    Attributes:
        input_ids: ``[2B, T]`` long token ids, right-padded.
        attention_mask: ``[2B, T]`` long.
        labels: ``[2B, T]`` long, response tokens only.
        ref_logps: optional ``[2B]`` float, precomputed reference log-probs ``s_ref(y)`` summed over
            response tokens, in the same row order; ``None`` when the reference must be run.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    ref_logps: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return self.input_ids.shape[0] // 2

    def num_tokens(self) -> torch.Tensor:
        return self.attention_mask.sum()

    def loss_units(self) -> torch.Tensor:
        """What the DPO loss averages over: the pairs (0-dim long)."""
        return torch.tensor(self.num_examples)


@dataclass
class SequenceLogps:
    """Per-sequence log-probabilities over response tokens.

    Attributes:
        logps: ``[N]`` sum over response tokens of ``log pi(y_t | x, y_<t)`` (0 for an all-masked row).
        num_tokens: ``[N]`` number of response tokens scored in each row.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor


@dataclass
class DPOOutput:
    """Result of :func:`xright_pl.objectives.losses.dpo_loss`.

    Attributes:
        losses: ``[B]`` per-pair loss ``-log sigmoid(beta * (log-ratio chosen - log-ratio rejected))``.
        chosen_rewards: ``[B]`` detached implicit reward ``beta * (s_pi(y_w) - s_ref(y_w))``.
        rejected_rewards: ``[B]`` detached implicit reward ``beta * (s_pi(y_l) - s_ref(y_l))``.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
