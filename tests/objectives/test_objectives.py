"""Objective plugins: hand-worked values of the built-in objectives, the registry, and a new objective kind plugged
into a module and trained through the Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import demo_data, tiny_module, trainer

from xright_pl import Single
from xright_pl.core.types import IGNORE_INDEX, PreferenceBatch, SFTBatch
from xright_pl.data.collate import collate_preference, collate_sft
from xright_pl.objectives.plugins import (
    OBJECTIVE_KINDS,
    Objective,
    ObjectiveOutput,
    PreferenceObjective,
    SFTObjective,
    register_objective,
)


class UniformLM:
    """What an objective may use of a module: logits that are uniform over ``V`` tokens, and a reference whose
    summed log-probs are given."""

    def __init__(self, vocab: int = 4, ref_logps: torch.Tensor | None = None) -> None:
        self.vocab = vocab
        self.ref = ref_logps
        self.reference_calls = 0

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab, requires_grad=True)

    def reference_logps(self, batch: PreferenceBatch) -> torch.Tensor:
        self.reference_calls += 1
        return self.ref


def sft_batch() -> SFTBatch:
    # Row 0: prompt [1, 2] masked, response [3, 0] scored (2 tokens); row 1: prompt [1], response [2, 3, 1].
    ids = torch.tensor([[1, 2, 3, 0, 0], [1, 2, 3, 1, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 0, IGNORE_INDEX], [IGNORE_INDEX, 2, 3, 1, IGNORE_INDEX]])
    return SFTBatch(ids, mask, labels)


def pref_batch() -> PreferenceBatch:
    # One pair: chosen row 0 scores 2 tokens, rejected row 1 scores 3 tokens.
    b = sft_batch()
    return PreferenceBatch(b.input_ids, b.attention_mask, b.labels)


def test_sft_objective_is_the_token_mean_nll():
    """Uniform logits over V=4: every scored token has NLL ln 4, so the token mean is ln 4 whatever the rows.
    Scored tokens: 2 + 3 = 5 (the validation weight); non-padding tokens 8; rows 2."""
    out = SFTObjective("sft").compute(UniformLM(4), sft_batch())
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.item() == pytest.approx(math.log(4), abs=1e-6)
    assert out.loss.requires_grad
    assert (int(out.num_tokens), out.num_examples) == (8, 2)
    values = SFTObjective("sft").validation_values(UniformLM(4), sft_batch())
    assert list(values) == ["val/sft_loss"]
    loss, weight = values["val/sft_loss"]
    assert loss.item() == pytest.approx(math.log(4), abs=1e-6) and float(weight) == 5.0


def test_preference_objective_hand_worked():
    """Uniform logits over V=4: s_pi(chosen) = -2 ln 4, s_pi(rejected) = -3 ln 4. With the reference at
    s_ref = (-2 ln 4, -2 ln 4), the log-ratios are 0 and -ln 4, so the sigmoid DPO loss is
    -log sigmoid(beta * (0 + ln 4)) = log(1 + 4^-beta); with beta = 1: log(1.25). Chosen reward 0 > rejected
    reward -ln 4: accuracy 1."""
    ref = torch.tensor([-2 * math.log(4), -2 * math.log(4)])
    lm = UniformLM(4, ref)
    obj = PreferenceObjective("dpo", "sigmoid", beta=1.0)
    out = obj.compute(lm, pref_batch())
    assert out.loss.item() == pytest.approx(math.log(1.25), abs=1e-6)
    assert out.num_examples == 1 and lm.reference_calls == 1
    assert out.metrics["rewards/accuracies"].item() == 1.0
    assert out.metrics["rewards/margins"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert obj.validation_keys() == ("val/dpo_loss", "val/rewards_accuracies")
    values = obj.validation_values(lm, pref_batch())
    assert values["val/rewards_accuracies"][0].item() == 1.0 and values["val/dpo_loss"][1] == 1


def test_preference_objective_other_name_prefixes_its_metrics_and_simpo_needs_no_reference():
    obj = PreferenceObjective("safety", "simpo", beta=2.0, simpo_gamma=0.5)
    assert not obj.needs_reference
    lm = UniformLM(4, ref_logps=None)
    out = obj.compute(lm, pref_batch())
    assert lm.reference_calls == 0  # reference-free: never asked
    # SimPO: beta * (mean chosen logp - mean rejected logp) - gamma = 2 * (-ln 4 + ln 4) - 0.5 = -0.5;
    # loss = -log sigmoid(-0.5) = log(1 + e^0.5).
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-6)
    assert "safety/rewards/accuracies" in out.metrics and "rewards/accuracies" not in out.metrics
    assert obj.validation_keys() == ("val/safety_loss", "val/safety_rewards_accuracies")


def test_registry_holds_the_builtin_kinds_and_refuses_clashes():
    assert OBJECTIVE_KINDS["sft"] is SFTObjective and OBJECTIVE_KINDS["preference"] is PreferenceObjective

    class NoKind(Objective):
        pass

    class Clash(Objective):
        kind = "sft"

    with pytest.raises(ValueError, match="no kind"):
        register_objective(NoKind)
    with pytest.raises(ValueError, match="already registered"):
        register_objective(Clash)
    assert OBJECTIVE_KINDS["sft"] is SFTObjective


class ResponseLengthSFT(SFTObjective):
    """A new objective kind for the test: SFT whose loss is the summed (not mean) response NLL per row."""

    kind = "test_sum_sft"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls = 0

    def compute(self, module, batch):
        self.calls += 1
        out = super().compute(module, batch)
        units = (batch.labels[:, 1:] != IGNORE_INDEX).sum()
        return ObjectiveOutput(out.loss * units / batch.num_examples, out.num_tokens, out.num_examples)

    validation_values = Objective.validation_values  # validate on the plugin's own loss (through compute)


def test_a_new_objective_kind_plugs_into_the_module_and_trains(tmp_path):
    """Replace the module's ``sft`` objective with a registered plugin: the training steps and the validation run
    it (the module has no branch on the objective), and the summary counts its steps."""
    register_objective(ResponseLengthSFT)
    try:
        module = tiny_module(Single("sft"))
        plugin = OBJECTIVE_KINDS["test_sum_sft"]("sft")
        module.objectives["sft"] = plugin
        t = trainer(tmp_path, 3)
        dm = demo_data(limit=16)
        t.fit(module, datamodule=dm)
        val_batches = min(2, len(dm.val_dataloader()[0]))  # limit_val_batches=2
        assert plugin.calls == 3 + val_batches
        summary = t.callbacks[0].summary
        assert (summary["steps/sft"], summary["steps/dpo"]) == (3, 0)
        assert summary["val/sft_loss"] > 1.0  # a summed NLL over several tokens, not the token mean
    finally:
        del OBJECTIVE_KINDS["test_sum_sft"]


def test_module_routes_by_name_and_refuses_unknown_objectives():
    module = tiny_module(Single("sft"))
    module.configure_model()
    assert set(module.objectives) == {"sft", "dpo"}
    dm = demo_data(limit=8)
    dm.load()
    sft = collate_sft([dm.train_sets["sft"][i] for i in range(2)], dm.pad_id)
    pref = collate_preference([dm.train_sets["dpo"][i] for i in range(2)], dm.pad_id)
    assert module.objective("sft", sft).loss.item() == module.sft_objective(sft).loss.item()
    assert module.objective("dpo", pref).loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert module.validation_objective(sft).name == "sft" and module.validation_objective(pref).name == "dpo"
    from xright_pl.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown objective 'kl'.*sft, dpo"):
        module.objective("kl", sft)


def test_overriding_the_two_objective_hooks_still_replaces_the_loss(tmp_path):
    """A subclass overriding ``dpo_objective`` (a custom loss, written before objectives were plugins) trains and
    validates on it: the preference loss doubled doubles ``val/dpo_loss`` at the start (2 ln 2)."""

    class DoubleDPO(type(tiny_module())):
        def dpo_objective(self, batch):
            out = super().dpo_objective(batch)
            out.loss = out.loss * 2
            return out

    module = DoubleDPO(model_config=tiny_module().hparams.model_config, selector=Single("dpo"), lr_scheduler=None)
    module.configure_model()
    dm = demo_data(limit=8)
    dm.load()
    pref = collate_preference([dm.train_sets["dpo"][i] for i in range(2)], dm.pad_id)
    assert module.objective("dpo", pref).loss.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    values = module.objectives["dpo"].validation_values(module, pref)
    assert values["val/dpo_loss"][0].item() == pytest.approx(2 * math.log(2), abs=1e-6)
