"""The preference loss chosen by ``XRightModule(loss_type=...)``: training, no reference for SimPO, config errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import REPO, demo_data, tiny_module, trainer

from xright_pl import Sequential, Single
from xright_pl.commands.cli import main
from xright_pl.core.errors import ConfigError
from xright_pl.objectives.losses import PREFERENCE_LOSSES

NAMES = list(PREFERENCE_LOSSES)


class FirstDPOLoss(pl.Callback):
    """Records ``train/dpo_loss`` of the first optimizer step (computed before any update)."""

    def __init__(self):
        self.first = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first is None and "train/dpo_loss" in trainer.callback_metrics:
            self.first = trainer.callback_metrics["train/dpo_loss"].item()


#: loss of every pair when policy == reference (h = 0), beta = 0.1: sigmoid/robust -log sigmoid(0) = ln 2 whatever
#: eps; hinge relu(1 - 0) = 1; ipo (0 - 1/(2 * 0.1))^2 = 25. SimPO has no reference: no closed form at step 0.
AT_STEP_ZERO = {"sigmoid": math.log(2), "robust": math.log(2), "hinge": 1.0, "ipo": 25.0}


@pytest.mark.parametrize("loss_type", NAMES)
def test_each_loss_type_trains(tmp_path, loss_type):
    """3 DPO steps (Single("dpo"), beta 0.1, eps 0.1 where the loss uses it): the first step's loss is the value
    the chosen loss gives at policy == reference (see AT_STEP_ZERO, atol 1e-5), so the registry entry really is
    the one called; train/val losses stay finite and every policy parameter changes."""
    eps = 0.1 if PREFERENCE_LOSSES[loss_type].uses_label_smoothing else 0.0
    module = tiny_module(Single("dpo"), loss_type=loss_type, label_smoothing=eps)
    module.configure_model()
    initial = {k: v.clone() for k, v in module.policy.state_dict().items()}
    first = FirstDPOLoss()
    t = trainer(tmp_path, 3, callbacks=[first])
    t.fit(module, datamodule=demo_data(limit=32))
    assert module.steps == {"sft": 0, "dpo": 3}
    if loss_type in AT_STEP_ZERO:
        assert first.first == pytest.approx(AT_STEP_ZERO[loss_type], abs=1e-5)
    else:
        assert math.isfinite(first.first)
    for key in ("train/dpo_loss", "val/dpo_loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert math.isfinite(t.callback_metrics[key].item()), key
    for name, p in module.policy.named_parameters():
        assert not torch.equal(p.detach(), initial[name]), f"{name} did not change"


def test_simpo_builds_no_reference(tmp_path, monkeypatch):
    """SimPO is reference-free: ``configure_model`` builds the policy only (the module holds exactly the policy's
    parameters, half of what the sigmoid module holds), ``reference_logps`` is never called in a fit (train and
    validation), and its rewards are beta * mean log-probs (negative, since log-probs are)."""
    sig = tiny_module(Single("dpo"))
    sig.configure_model()
    simpo = tiny_module(Single("dpo"), loss_type="simpo", simpo_gamma=0.3)
    simpo.configure_model()
    n_policy = sum(p.numel() for p in simpo.policy.parameters())
    assert simpo.reference is None
    assert sum(p.numel() for p in simpo.parameters()) == n_policy
    assert sum(p.numel() for p in sig.parameters()) == 2 * n_policy

    def no_reference(*args, **kwargs):
        raise AssertionError("reference_logps called for a reference-free loss")

    monkeypatch.setattr(simpo, "reference_logps", no_reference)
    t = trainer(tmp_path, 2)
    t.fit(simpo, datamodule=demo_data(limit=16))
    assert simpo.reference is None and simpo.steps["dpo"] == 2
    assert t.callback_metrics["rewards/chosen"].item() < 0
    assert math.isfinite(t.callback_metrics["val/dpo_loss"].item())


def test_simpo_with_sequential_stage_start_has_nothing_to_reset(tmp_path):
    """Sequential(reference="stage_start") resets the reference at the switch; with SimPO there is none, so the
    reset is a no-op (no crash) and the DPO stage trains."""
    module = tiny_module(Sequential(first="sft", switch_step=2, reference="stage_start"), loss_type="simpo")
    t = trainer(tmp_path, 3)
    t.fit(module, datamodule=demo_data(limit=16))
    assert module.reference is None and module.steps == {"sft": 2, "dpo": 1}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "dpo"}, "loss_type must be one of sigmoid, ipo, hinge, robust, simpo; got 'dpo'"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be a number in \[0, 0.5\), got 0.5"),
        ({"label_smoothing": -0.1, "loss_type": "robust"}, r"label_smoothing must be a number in \[0, 0.5\)"),
        ({"label_smoothing": 0.1, "loss_type": "ipo"}, "has no effect with loss_type 'ipo'.*sigmoid, robust, simpo"),
        ({"simpo_gamma": float("nan"), "loss_type": "simpo"}, "simpo_gamma must be a finite number >= 0"),
        ({"loss_type": "simpo", "precompute_reference_logps": True}, "reference-free: there is nothing to precompute"),
    ],
)
def test_bad_loss_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        tiny_module(Single("dpo"), **kwargs)


CLI_SMALL = [
    "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--data.sft.limit", "32", "--data.preference.limit", "32",
]  # fmt: skip


def test_cli_loss_type_ipo(tmp_path):
    """``fit --config configs/demo/dpo_only.yaml --model.loss_type ipo`` trains through the CLI entry point; the
    saved config records the loss."""
    import yaml

    main(["fit", "--config", str(REPO / "configs/demo/dpo_only.yaml"), "--model.loss_type", "ipo",
          "--trainer.default_root_dir", str(tmp_path), *CLI_SMALL])  # fmt: skip
    saved = sorted(tmp_path.rglob("config.yaml"))
    assert saved and yaml.safe_load(saved[-1].read_text())["model"]["loss_type"] == "ipo"
    assert list(tmp_path.rglob("summary.json"))


def test_cli_bad_loss_type_is_one_paragraph(tmp_path, capsys):
    """An unknown loss type exits with status 2 and one ``xright_pl: error:`` paragraph listing the valid names."""
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/demo/dpo_only.yaml"), "--model.loss_type", "kto",
              "--trainer.default_root_dir", str(tmp_path), *CLI_SMALL])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "xright_pl: error:" in err and "sigmoid, ipo, hinge, robust, simpo" in err and "'kto'" in err


def test_ipo_with_precomputed_reference(tmp_path):
    """A reference loss other than sigmoid works with cached reference log-probs: IPO's first step is still
    (0 - 1/(2 * 0.1))^2 = 25 (the cache is computed in other batches, other padding: atol 1e-3), the reference
    model is released, and the policy trains."""
    module = tiny_module(Single("dpo"), loss_type="ipo", precompute_reference_logps=True)
    first = FirstDPOLoss()
    t = trainer(tmp_path, 2, callbacks=[first])
    t.fit(module, datamodule=demo_data(limit=16))
    assert module.reference is None and module.reference_released
    assert first.first == pytest.approx(25.0, abs=1e-3)
    assert math.isfinite(t.callback_metrics["val/dpo_loss"].item())


def test_ipo_divides_by_the_scored_tokens_when_the_response_starts_at_position_0():
    """A response with no prompt and no BOS (labels ``[5, 6, 7]``): position 0 has no context, so 2 tokens are
    scored, not 3 (TRL's completion length before the shift). Hand-worked, beta 0.5 (target ``1/(2 beta) = 1``):
    summed log-ratios ``pc - rc = 1.0`` and ``pr - rr = -1.0`` over 2 scored tokens each give
    ``h_avg = 0.5 - (-0.5) = 1.0`` and loss ``(1.0 - 1)^2 = 0``; dividing by 3 would give
    ``h_avg = 2/3`` and loss ``(2/3 - 1)^2 = 1/9``."""
    from xright_pl.objectives.losses import ipo_loss, sequence_logps

    labels = torch.tensor([[5, 6, 7]])
    seq = sequence_logps(torch.randn(1, 3, 11), labels)
    assert seq.num_tokens.tolist() == [2]
    n = seq.num_tokens.repeat(1)
    t = torch.tensor
    out = ipo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 0.5, chosen_tokens=n, rejected_tokens=n)
    assert out.losses.item() == pytest.approx(0.0, abs=1e-12)
    three = torch.tensor([3])
    out3 = ipo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 0.5, chosen_tokens=three, rejected_tokens=three)
    assert out3.losses.item() == pytest.approx(1 / 9, rel=1e-6)
