"""Objectives as plugins: what one kind of data trains, and how it is validated.

An objective turns a collated batch into a loss with its graph (:meth:`Objective.compute`) and into the values
its validation reports (:meth:`Objective.validation_values`). The module holds one instance per named objective
(``"sft"`` and ``"dpo"`` today) and never branches on which one it runs: ``training_step`` asks the selector for
the names to train and calls ``objectives[name].compute(module, batch)``.

Objectives are found by their ``kind`` in :data:`OBJECTIVE_KINDS` (``sft``, ``preference``). A new kind is a
subclass with a ``kind``, a ``batch_type`` and ``compute``, registered with :func:`register_objective`. A new
preference *loss* is smaller still: one pure function in :mod:`xright_pl.objectives.losses` and one line in
:data:`~xright_pl.objectives.losses.PREFERENCE_LOSSES`; :class:`PreferenceObjective` runs any of them.

What an objective may use of the module (its public surface, nothing private): ``policy_token_logps(input_ids,
attention_mask, labels)`` (the policy's next-token log-probs of the labels and their mask, by the fused,
response-only path of :mod:`xright_pl.objectives.fused` unless the module turned it off), ``forward_logits(input_ids,
attention_mask)`` (the policy's full logits; used instead by a module that has no ``policy_token_logps``) and
``reference_logps(batch)`` (the frozen reference's summed response log-probs, cached or computed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from xright_pl.core.types import PreferenceBatch, SFTBatch
from xright_pl.objectives.losses import (
    PREFERENCE_LOSSES,
    PreferenceLoss,
    dpo_metrics,
    sequence_logps_from_token_logps,
    sft_loss_from_token_logps,
    token_logps,
)

__all__ = [
    "ObjectiveOutput",
    "Objective",
    "SFTObjective",
    "PreferenceObjective",
    "OBJECTIVE_KINDS",
    "register_objective",
    "policy_token_logps",
]


@dataclass
class ObjectiveOutput:
    """One objective's forward pass on one micro-batch.

    Attributes:
        loss: scalar loss with its graph (SFT: token-mean NLL; DPO: pair-mean preference loss, see ``loss_type``).
        num_tokens: 0-dim count of non-padding tokens processed.
        num_examples: SFT rows or preference pairs in the batch.
        metrics: detached scalars to log (``rewards/...``, ``logps/...``).
        units: what ``loss`` averages over on this micro-batch (SFT: scored response tokens; DPO: pairs), set
            by the training step from the host copy of the batch; ``None`` when unknown.
    """

    loss: Tensor
    num_tokens: Tensor
    num_examples: int
    metrics: dict[str, Tensor] = field(default_factory=dict)
    units: int | None = None


def policy_token_logps(module: Any, batch: SFTBatch | PreferenceBatch) -> tuple[Tensor, Tensor]:
    """``(logps, mask)``, ``[N, T-1]``: the policy's next-token log-probs of ``batch.labels`` (0 where not scored),
    from ``module.policy_token_logps``, or from ``module.forward_logits`` for a module without it."""
    fn = getattr(module, "policy_token_logps", None)
    if fn is not None:
        return fn(batch.input_ids, batch.attention_mask, batch.labels)
    return token_logps(module.forward_logits(batch.input_ids, batch.attention_mask), batch.labels)


class Objective:
    """Base class of the objective plugins.

    Args:
        name: the objective's name in the run (``sft``, ``dpo``, or a data set's name): its metrics are
            ``train/{name}_loss``, ``val/{name}_loss``, ``steps/{name}``.
    """

    kind: ClassVar[str] = ""
    """Registry key (:data:`OBJECTIVE_KINDS`)."""
    batch_type: ClassVar[type] = object
    """The batch container the objective's data collates to."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> Objective:
        """The objective ``name`` built from the module's settings (its hyperparameters: ``beta``, ``loss_type``,
        ...); how the module builds each data set's objective from the registry."""
        return cls(name)

    @property
    def needs_reference(self) -> bool:
        """Whether the module must build (or cache) a frozen reference model for this objective."""
        return False

    def accepts(self, batch: Any) -> bool:
        """Whether ``batch`` is one of this objective's batches."""
        return isinstance(batch, self.batch_type)

    def compute(self, module: Any, batch: Any) -> ObjectiveOutput:
        """The loss of ``batch`` (with its graph), its counts and its training metrics."""
        raise NotImplementedError

    def validation_keys(self) -> tuple[str, ...]:
        """The metric names :meth:`validation_values` returns (``val/{name}_loss`` first)."""
        return (f"val/{self.name}_loss",)

    def validation_values(self, module: Any, batch: Any) -> dict[str, tuple[Tensor, Tensor | int]]:
        """``{metric: (batch value, weight)}``; the epoch value of each metric is the weighted mean over the
        validation batches. The default: the training loss weighted by the examples."""
        out = self.compute(module, batch)
        return {f"val/{self.name}_loss": (out.loss, out.num_examples)}

    def describe(self) -> str:
        return f"{self.name} ({self.kind})"


class SFTObjective(Objective):
    """Supervised fine-tuning: token-mean negative log-likelihood of the response tokens (prompts masked)."""

    kind = "sft"
    batch_type = SFTBatch

    def compute(self, module: Any, batch: SFTBatch) -> ObjectiveOutput:
        loss, _ = sft_loss_from_token_logps(*policy_token_logps(module, batch))
        return ObjectiveOutput(loss, batch.num_tokens(), batch.num_examples)

    def validation_values(self, module: Any, batch: SFTBatch) -> dict[str, tuple[Tensor, Tensor | int]]:
        """The validation loss is a token mean over the whole set: each batch weighs its scored tokens."""
        loss, n_tokens = sft_loss_from_token_logps(*policy_token_logps(module, batch))
        return {f"val/{self.name}_loss": (loss, n_tokens.to(loss.dtype))}


class PreferenceObjective(Objective):
    """Preference learning on (prompt, chosen, rejected) pairs with one of :data:`PREFERENCE_LOSSES`.

    Args:
        name: the objective's name (``dpo`` in two-objective runs).
        loss_type: key of :data:`~xright_pl.objectives.losses.PREFERENCE_LOSSES` (``sigmoid`` is DPO).
        beta: inverse temperature.
        label_smoothing: for the losses that use it (see ``PreferenceLoss.uses_label_smoothing``).
        simpo_gamma: SimPO's target margin.
    """

    kind = "preference"
    batch_type = PreferenceBatch

    def __init__(
        self,
        name: str = "dpo",
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
    ) -> None:
        super().__init__(name)
        self.loss_type = loss_type
        self.loss: PreferenceLoss = PREFERENCE_LOSSES[loss_type]
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        self.simpo_gamma = float(simpo_gamma)

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> PreferenceObjective:
        keys = ("loss_type", "beta", "label_smoothing", "simpo_gamma")
        return cls(name, **{k: settings[k] for k in keys if k in settings})

    @property
    def needs_reference(self) -> bool:
        return self.loss.needs_reference

    def _metric(self, key: str) -> str:
        """Training metric names: ``rewards/...`` for the ``dpo`` objective (as always), else prefixed."""
        return key if self.name == "dpo" else f"{self.name}/{key}"

    def compute(self, module: Any, batch: PreferenceBatch) -> ObjectiveOutput:
        ref = module.reference_logps(batch) if self.loss.needs_reference else None
        seq = sequence_logps_from_token_logps(*policy_token_logps(module, batch))
        logps, n, b = seq.logps, seq.num_tokens, batch.num_examples
        out = self.loss(
            logps[:b], logps[b:], None if ref is None else ref[:b], None if ref is None else ref[b:], self.beta,
            chosen_tokens=n[:b], rejected_tokens=n[b:],
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
        )  # fmt: skip
        metrics = dpo_metrics(out, logps[:b].detach(), logps[b:].detach())
        metrics = {self._metric(k): v for k, v in metrics.items()}
        return ObjectiveOutput(out.losses.mean(), batch.num_tokens(), b, metrics)

    def validation_keys(self) -> tuple[str, ...]:
        return (f"val/{self.name}_loss", self._accuracy_key())

    def _accuracy_key(self) -> str:
        return "val/rewards_accuracies" if self.name == "dpo" else f"val/{self.name}_rewards_accuracies"

    def validation_values(self, module: Any, batch: PreferenceBatch) -> dict[str, tuple[Tensor, Tensor | int]]:
        # The ``dpo`` objective validates through the module's ``dpo_objective`` hook, as before objectives were
        # plugins: a subclass overriding it validates on its own loss, as it trains on it.
        hook = getattr(module, "dpo_objective", None) if self.name == "dpo" else None
        out = hook(batch) if hook is not None else self.compute(module, batch)
        accuracy = out.metrics[self._metric("rewards/accuracies")]
        return {
            f"val/{self.name}_loss": (out.loss, out.num_examples),
            self._accuracy_key(): (accuracy, out.num_examples),
        }

    def describe(self) -> str:
        return f"{self.name} (preference, {self.loss_type}, beta={self.beta:g})"


#: Objective kinds by registry key.
OBJECTIVE_KINDS: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Register an :class:`Objective` subclass under its ``kind`` (usable as a class decorator)."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if cls.kind in OBJECTIVE_KINDS and OBJECTIVE_KINDS[cls.kind] is not cls:
        raise ValueError(f"objective kind {cls.kind!r} is already registered ({OBJECTIVE_KINDS[cls.kind].__name__})")
    OBJECTIVE_KINDS[cls.kind] = cls
    return cls


register_objective(SFTObjective)
register_objective(PreferenceObjective)
