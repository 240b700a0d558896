"""Training invariants: equalities that must hold whatever the implementation details."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import demo_data, tiny_module, trainer, varied_sft_file

from xright_pl import Alright, Mix, Sequential, Single
from xright_pl.callbacks.summary import weights_sha256
from xright_pl.data.collate import collate_preference, collate_sft
from xright_pl.objectives.losses import dpo_loss, sequence_logps


def _sgd(params):
    # SGD, not Adam: Adam's first step is ~lr * sign(g), which turns rounding noise in tiny gradients into
    # full-size differences; SGD's update is linear in the gradient, so equal gradients give equal updates.
    return torch.optim.SGD(params, lr=0.5)


@pytest.fixture(autouse=True)
def _one_thread():
    """Bit-exact comparisons, and no thread oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(tmp_path, selector, steps, lam=0.5, data=None, **kwargs):
    module = tiny_module(selector, lam=lam, **kwargs)
    # Validation runs after every Lightning batch (micro-batch) of a 1-step run: with accumulation it falls
    # between micro-batches, and must not wipe the half-accumulated gradients.
    t = trainer(tmp_path, steps, limit_val_batches=1)
    t.fit(module, datamodule=data or demo_data(limit=64))
    return module


# ------------------------------------------------------------------------------ gradient accumulation
def _ordered_data(batch_size, sft_path):
    """Data in file order, so both runs train on the same rows."""
    return demo_data(limit=256, sft_bs=batch_size, dpo_bs=batch_size, sft_path=sft_path, shuffle=False)


@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, objective):
    """One optimizer step on 8 examples: one micro-batch of 8 == 8 micro-batches of 1 (validation running
    between the micro-batches included). The SFT rows have different response lengths: the step's loss is the
    token mean over all 8 rows, not the mean of 8 per-row token means."""
    sft = varied_sft_file(tmp_path)
    data = _ordered_data(8, sft)
    data.load()
    lengths = [data.train_sets["sft"][i]["num_response_tokens"] for i in range(8)]
    assert len(set(lengths)) >= 5, lengths
    whole = _fit(tmp_path / "a", Single(objective), 1, data=_ordered_data(8, sft), optimizer=_sgd)
    accumulated = _fit(
        tmp_path / "b", Single(objective), 1, data=_ordered_data(1, sft), optimizer=_sgd, accumulate_grad_batches=8
    )
    init = tiny_module(Single(objective))
    init.configure_model()
    moved = 0.0
    for (name, p), q, p0 in zip(
        whole.policy.named_parameters(), accumulated.policy.parameters(), init.policy.parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3  # the step did something


def test_mix_accumulation_weighs_each_objective_by_its_own_units(tmp_path):
    """Mix trains both objectives every micro-batch; each keeps its own normalisation under accumulation."""
    sft = varied_sft_file(tmp_path)
    whole = _fit(tmp_path / "a", Mix(), 1, lam=0.3, data=_ordered_data(4, sft), optimizer=_sgd)
    accumulated = _fit(
        tmp_path / "b", Mix(), 1, lam=0.3, data=_ordered_data(1, sft), optimizer=_sgd, accumulate_grad_batches=4
    )
    for (name, p), q in zip(whole.policy.named_parameters(), accumulated.policy.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------ degenerate trade-offs
@pytest.mark.parametrize(
    ("selector", "lam", "equals"),
    [
        (Mix, 1.0, "dpo"),
        (Mix, 0.0, "sft"),
        (Alright, 1.0, "dpo"),
        (Alright, 0.0, "sft"),
    ],
    ids=["mix-lam1-dpo", "mix-lam0-sft", "alright-lam1-dpo", "alright-lam0-sft"],
)
def test_lambda_extremes_equal_single_objective(tmp_path, selector, lam, equals):
    steps = 4
    joint = _fit(tmp_path / "joint", selector(), steps, lam=lam)
    single = _fit(tmp_path / "single", Single(equals), steps, lam=lam)
    assert joint.steps == single.steps == {equals: steps, ("sft" if equals == "dpo" else "dpo"): 0}
    assert weights_sha256(joint.policy) == weights_sha256(single.policy)


@pytest.mark.parametrize("first", ["sft", "dpo"])
def test_sequential_with_an_empty_stage_equals_single_objective(tmp_path, first):
    steps = 4
    second = "dpo" if first == "sft" else "sft"
    no_second = _fit(tmp_path / "a", Sequential(first=first, switch_step=steps), steps)
    no_first = _fit(tmp_path / "b", Sequential(first=first, switch_step=0), steps)
    assert weights_sha256(no_second.policy) == weights_sha256(_fit(tmp_path / "c", Single(first), steps).policy)
    assert weights_sha256(no_first.policy) == weights_sha256(_fit(tmp_path / "d", Single(second), steps).policy)


# ------------------------------------------------------------------------------ losses on one batch
@pytest.fixture(scope="module")
def batches():
    data = demo_data(limit=64)
    data.load()
    sft_rows = [data.train_sets["sft"][i] for i in range(6)]
    pref_rows = [data.train_sets["dpo"][i] for i in range(5)]
    return data.pad_id, sft_rows, pref_rows


@pytest.fixture(scope="module")
def module():
    m = tiny_module(Single("sft"))
    m.configure_model()
    m.eval()
    return m


def test_dpo_loss_at_step_zero_is_ln2_for_every_pair(module, batches):
    pad, _, pref_rows = batches
    batch = collate_preference(pref_rows, pad)
    with torch.no_grad():
        logps = sequence_logps(module.forward_logits(batch.input_ids, batch.attention_mask), batch.labels).logps
        ref = module.reference_logps(batch)
    torch.testing.assert_close(logps, ref)  # the reference is the initial policy
    b = len(pref_rows)
    out = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.1)
    torch.testing.assert_close(out.losses, torch.full((b,), math.log(2)), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert module.dpo_objective(batch).loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_permuting_rows_leaves_losses_unchanged(module, batches):
    pad, sft_rows, pref_rows = batches
    perm = [3, 0, 5, 1, 4, 2]
    with torch.no_grad():
        a = module.sft_objective(collate_sft(sft_rows, pad)).loss
        b = module.sft_objective(collate_sft([sft_rows[i] for i in perm], pad)).loss
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        pperm = [2, 4, 0, 3, 1]
        c = module.dpo_objective(collate_preference(pref_rows, pad))
        d = module.dpo_objective(collate_preference([pref_rows[i] for i in pperm], pad))
    torch.testing.assert_close(c.loss, d.loss, rtol=1e-6, atol=1e-6)
    assert set(c.metrics) == set(d.metrics)
    for k in c.metrics:
        torch.testing.assert_close(c.metrics[k], d.metrics[k], rtol=1e-5, atol=1e-6, msg=k)


def test_extra_padding_leaves_logps_unchanged(module, batches):
    pad, sft_rows, pref_rows = batches
    for collate, rows in ((collate_sft, sft_rows), (collate_preference, pref_rows)):
        tight = collate(rows, pad, pad_to_multiple_of=1)
        loose = collate(rows, pad, pad_to_multiple_of=64)
        assert loose.input_ids.shape[1] >= tight.input_ids.shape[1] + 8
        with torch.no_grad():
            a = sequence_logps(module.forward_logits(tight.input_ids, tight.attention_mask), tight.labels)
            b = sequence_logps(module.forward_logits(loose.input_ids, loose.attention_mask), loose.labels)
        torch.testing.assert_close(a.logps, b.logps, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.num_tokens, b.num_tokens)
