"""Reference handling (:mod:`xright_pl.training.reference`) without a Trainer: the rows each process caches, and the
reset of a separate reference to the policy (the fits with cached log-probs are in ``test_step_speed.py`` and
``test_loss_types.py``, the stage-start reset in ``test_training.py`` and ``test_lora.py``)."""

from __future__ import annotations

import pytest
import torch

from xright_pl.core.errors import ConfigError
from xright_pl.models.build import frozen_copy
from xright_pl.training.reference import gathered_rows, reset_to_policy, rows_of_process


@pytest.mark.parametrize("n,world", [(5, 2), (4, 2), (7, 3), (2, 4), (6, 1)])
def test_every_row_is_computed_and_every_process_runs_as_many(n, world):
    shares = [rows_of_process(n, world, rank) for rank in range(world)]
    assert {len(s) for s in shares} == {-(-n // world)}
    assert set(gathered_rows(n, world)) == set(range(n))
    assert gathered_rows(n, world) == [row for s in shares for row in s]


def test_rows_of_process_hand_worked():
    """5 rows on 2 processes: rank 0 takes 0, 2, 4; rank 1 takes 1, 3 and wraps to 0."""
    assert rows_of_process(5, 2, 0) == [0, 2, 4] and rows_of_process(5, 2, 1) == [1, 3, 0]
    assert gathered_rows(5, 2) == [0, 2, 4, 1, 3, 0]


def test_reset_to_policy_copies_the_weights_and_stays_frozen():
    policy = torch.nn.Linear(3, 2)
    reference = frozen_copy(policy)
    with torch.no_grad():
        policy.weight.add_(1.0)
    assert reset_to_policy(policy, reference, lora=False)
    assert torch.equal(reference.weight, policy.weight)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


def test_reset_with_lora_and_a_separate_reference_is_refused():
    policy = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="a stage-start reference with LoRA needs the adapter-free reference"):
        reset_to_policy(policy, frozen_copy(policy), lora=True)
