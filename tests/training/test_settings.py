"""The module's constructor checks (training/settings.py): every problem at once, each naming its option."""

from __future__ import annotations

import functools

import pytest
import torch

from xright_pl.core.errors import ConfigError
from xright_pl.training.settings import check_settings, optimizer_problems

GOOD = dict(
    lam=0.5,
    beta=0.1,
    accumulate_grad_batches=1,
    gradient_clip_val=1.0,
    model=None,
    model_config={"model_type": "gpt_neox"},
    selector=None,
    lora=None,
    max_consecutive_nonfinite=10,
    loss_type="sigmoid",
    label_smoothing=0.0,
    simpo_gamma=0.5,
    precompute_reference_logps=False,
    optimizer=torch.optim.AdamW,
)


def test_good_settings_pass():
    check_settings(**GOOD)


def test_one_problem_is_one_line_naming_the_option():
    with pytest.raises(ConfigError) as e:
        check_settings(**{**GOOD, "optimizer": functools.partial(torch.optim.AdamW, lr=-1.0)})
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("invalid XRightModule setting: --model.optimizer.init_args.lr:")
    assert "torch.optim.adamw.AdamW" in message and "Invalid learning rate: -1" in message


def test_every_problem_is_listed_at_once():
    bad = {**GOOD, "beta": 0, "accumulate_grad_batches": 0, "loss_type": "nope", "model": "x"}
    with pytest.raises(ConfigError) as e:
        check_settings(**bad)
    lines = str(e.value).splitlines()
    assert lines[0] == "Invalid XRightModule settings:"
    assert len(lines) == 5
    for words in ("beta must be > 0", "accumulate_grad_batches", "loss_type must be one of", "exactly one of"):
        assert sum(words in line for line in lines[1:]) == 1


def test_optimizer_errors_not_about_a_setting_are_left_to_the_run():
    def two_d_only(params):
        if any(p.ndim != 2 for p in params):
            raise ValueError("this optimizer takes 2-D parameters only")
        return torch.optim.SGD(params, lr=0.1)

    assert optimizer_problems(two_d_only) == []
    assert optimizer_problems(functools.partial(torch.optim.SGD, lr=0.1, momentum=-1)) == [
        "--model.optimizer.init_args.momentum: the optimizer (torch.optim.sgd.SGD) refuses it:"
        " Invalid momentum value: -1"
    ]
