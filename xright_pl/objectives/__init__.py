"""What a step trains: the pure loss functions (``losses``) and the Objective plugins with their
registry (``plugins``). Imports ``core`` only.

The names of the former ``xright_pl.objectives`` module are re-exported here, so old paths such as
``xright_pl.objectives.ObjectiveOutput`` keep working."""

from xright_pl.objectives.plugins import (
    OBJECTIVE_KINDS,
    Objective,
    ObjectiveOutput,
    PreferenceObjective,
    SFTObjective,
    policy_token_logps,
    register_objective,
)

__all__ = [
    "OBJECTIVE_KINDS",
    "Objective",
    "ObjectiveOutput",
    "PreferenceObjective",
    "SFTObjective",
    "policy_token_logps",
    "register_objective",
]
