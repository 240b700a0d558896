"""ALRIGHT: a seeded draw of the objective at every step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from xright_pl.selectors.base import Decision, Selector, draw


class Alright(Selector):
    """ALRIGHT: each optimizer step trains DPO with probability ``lam``, else SFT; with K objectives, objective k
    with probability ``lambda_k``.

    One uniform draw ``u`` per step: the objectives' intervals of lengths ``lambda_k`` are laid out from the last
    objective to the first, so for the pair ``u < lam`` is a DPO step, as it always was.

    The draw comes from a generator owned by this callback and seeded with ``seed``; every process holds
    the same generator, so every process takes the same branch, and the generator's state is saved in
    checkpoints.

    Args:
        seed: seed of the Bernoulli draws (same on every process).
    """

    name = "alright"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def decide(self, step: int, losses: Mapping[str, float]) -> Decision:
        u = torch.rand((), generator=self.generator).item()
        return Decision({draw(self.weights, u): 1.0})

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self.generator.set_state(state_dict["generator"])

    def describe(self) -> str:
        return f"alright(seed={self.seed})"
