"""End-to-end training on a tiny model and the embedded data: counts, invariants, consumption."""

from __future__ import annotations

import copy
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import demo_data, recording_forwards, tiny_module, trainer

from xright_pl import Alright, Maxright, Mix, Sequential, Single
from xright_pl.callbacks.summary import weights_sha256


class Recording:
    """Mixin recording every decision a selector makes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decisions = []

    def decide(self, step, losses):
        d = super().decide(step, losses)
        self.decisions.append((step, d.branch, dict(losses)))
        return d


class RecAlright(Recording, Alright):
    pass


class RecMaxright(Recording, Maxright):
    pass


def _fit(tmp_path, selector, steps, lam=0.5, accumulate=1, **module_kwargs):
    module = tiny_module(selector, lam=lam, accumulate_grad_batches=accumulate, **module_kwargs)
    data = demo_data()
    t = trainer(tmp_path, steps)
    module.configure_model()
    initial_policy = {k: v.clone() for k, v in module.policy.state_dict().items()}
    ref_hash = weights_sha256(module.reference)
    t.fit(module, datamodule=data)
    return module, data, t, initial_policy, ref_hash


def test_alright_fit_counts_reference_frozen_and_params_change(tmp_path):
    steps = 24
    sel = RecAlright(seed=3)
    module, data, t, initial, ref_hash = _fit(tmp_path, sel, steps)

    assert t.global_step == steps
    branches = [b for _, b, _ in sel.decisions]
    assert len(branches) == steps
    # The logged branch counts equal the selector's decisions.
    assert module.steps == {"sft": branches.count("sft"), "dpo": branches.count("dpo")}
    assert 0 < module.steps["dpo"] < steps
    assert t.callback_metrics["steps/sft"].item() == branches.count("sft")
    assert t.callback_metrics["steps/dpo"].item() == branches.count("dpo")
    # Every example trained on was consumed exactly once, in order: counts are steps x batch size.
    assert data.consumed_examples() == {"sft": 4 * branches.count("sft"), "dpo": 2 * branches.count("dpo")}
    # Reference bit-identical; every trainable policy parameter changed.
    assert weights_sha256(module.reference) == ref_hash
    assert not module.reference.training
    assert all(not p.requires_grad for p in module.reference.parameters())
    for name, p in module.policy.named_parameters():
        assert not torch.equal(p.detach(), initial[name]), f"{name} did not change"
    # Metrics logged and finite.
    for key in ("val/sft_loss", "val/dpo_loss", "train/lr"):
        assert math.isfinite(t.callback_metrics[key].item()), key


def test_summary_json_written(tmp_path):
    module, data, t, _, _ = _fit(tmp_path, Alright(seed=0), 6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "val/sft_loss",
        "val/dpo_loss",
        "steps/sft",
        "steps/dpo",
        "optimizer_steps",
        "wall_time_s",
        "tokens_per_s",
        "peak_memory_mb",
        "weights_sha256",
        "method",
        "lam",
    ):
        assert key in summary, key
    assert summary["optimizer_steps"] == 6
    assert summary["steps/sft"] + summary["steps/dpo"] == 6
    assert summary["method"] == "alright" and summary["lam"] == 0.5
    assert summary["weights_sha256"] == weights_sha256(module.policy)
    assert summary["tokens_per_s"] > 0


def test_mix_trains_both_every_step(tmp_path):
    module, data, t, _, _ = _fit(tmp_path, Mix(), 5, lam=0.3)
    assert module.steps == {"sft": 5, "dpo": 5}
    assert data.consumed_examples() == {"sft": 20, "dpo": 10}


def test_maxright_evaluates_every_k_and_skips_no_data(tmp_path):
    steps, k = 13, 4
    sel = RecMaxright(f_sft_star=0.0, f_dpo_star=0.0, eval_every=k)
    module, data, t, _, _ = _fit(tmp_path, sel, steps)
    evaluated = [s for s, _, losses in sel.decisions if losses]
    assert evaluated == [0, 4, 8, 12]
    assert sel.evaluations == 4
    branches = [b for _, b, _ in sel.decisions]
    assert module.steps == {"sft": branches.count("sft"), "dpo": branches.count("dpo")}
    # An evaluated but untrained batch is not dropped: consumption equals the trained steps exactly.
    assert data.consumed_examples() == {"sft": 4 * module.steps["sft"], "dpo": 2 * module.steps["dpo"]}


def test_maxright_evaluations_in_a_row_see_new_batches_and_skip_none(tmp_path):
    """An objective evaluated and not trained keeps its batch for its next step; its next evaluation must look at
    another batch, or one easy batch (below f*) would hold the decision for the rest of the run (issue 22's
    MAXRIGHT: SFT never trained again after one 4-row batch at 0.3 against f_sft* 0.81)."""
    steps = 6
    sel = RecMaxright(f_sft_star=100.0, f_dpo_star=0.0, eval_every=1)  # the SFT gap is negative: always DPO
    module = tiny_module(sel)
    calls = recording_forwards(module)
    data = demo_data()
    trainer(tmp_path, steps).fit(module, datamodule=data)
    assert [b for _, b, _ in sel.decisions] == ["dpo"] * steps
    sft_evaluations = [ids for name, grad, ids in calls if name == "sft"]
    assert len(sft_evaluations) == steps and len(set(sft_evaluations)) == steps  # a new batch every time
    assert data.consumed_examples() == {"sft": 0, "dpo": 2 * steps}  # and none of them was skipped
    assert module.evaluations_untrained == {"sft": steps}


def test_maxright_look_ahead_reaches_every_batch_of_a_short_stream_with_accumulation(tmp_path):
    """The n-th evaluation in a row reads the (n mod L)-th untrained batch: with 2 batches an epoch and 2
    micro-batches a step, both batches are looked at (a look-ahead of whole steps would read batch 0 only)."""
    steps = 6
    sel = RecMaxright(f_sft_star=100.0, f_dpo_star=0.0, eval_every=1)
    module = tiny_module(sel, accumulate_grad_batches=2)
    calls = recording_forwards(module)
    data = demo_data(limit=8)  # 8 SFT rows, 4 a batch: 2 batches an epoch
    trainer(tmp_path, steps).fit(module, datamodule=data)
    assert len(data.streams["sft"]) == 2
    sft_evaluations = [ids for name, grad, ids in calls if name == "sft"]
    assert len(sft_evaluations) == steps
    assert sft_evaluations[0::2] == [sft_evaluations[0]] * 3 and sft_evaluations[1::2] == [sft_evaluations[1]] * 3
    assert sft_evaluations[0] != sft_evaluations[1]
    assert data.consumed_examples()["sft"] == 0


def test_maxright_trains_in_order_after_looking_ahead(tmp_path):
    """After evaluations that looked ahead, the objective trains its batches in stream order from the one it
    kept, and that first training forward is not a reused look-ahead graph."""
    steps = 16
    sel = RecMaxright(f_sft_star=4.6, f_dpo_star=0.0, eval_every=1)
    module = tiny_module(sel)
    calls = recording_forwards(module)
    data = demo_data()
    trainer(tmp_path, steps).fit(module, datamodule=data)
    trained = [ids for name, grad, ids in calls if name == "sft" and grad]
    branches = [b for _, b, _ in sel.decisions]
    assert 0 < branches.count("sft") < steps, branches
    stream = data.streams["sft"]
    fresh = copy.copy(stream)  # the same stream from its start: the batches in order, read again from its seed
    fresh.epoch, fresh.position, fresh._iter, fresh._buffer, fresh._read = 0, 0, None, [], (0, 0)
    stream_order = [tuple(fresh.peek(i).input_ids.flatten().tolist()) for i in range(stream.consumed_batches)]
    assert stream.consumed_batches == branches.count("sft")
    # Forwards with a graph, repeats in a row collapsed (an evaluation graph dropped when the decision went the other
    # way, then the same kept batch trained): each SFT step's batch once, in stream order, plus at most the pending
    # batch evaluated with its graph at a last step that then trained DPO. A batch trained twice would show.
    trained_batches = [ids for i, ids in enumerate(trained) if i == 0 or ids != trained[i - 1]]
    assert trained_batches[: len(stream_order)] == stream_order
    assert len(trained_batches) - len(stream_order) in (0, 1)


def test_maxright_evaluation_keeps_one_graph(tmp_path):
    """On an evaluation step only the objective trained at the previous step is evaluated with a graph; the
    other runs without one. Its forward runs again (with a graph) only when the decision switches to it."""
    steps = 16
    sel = RecMaxright(f_sft_star=4.6, f_dpo_star=0.0, eval_every=1)
    module = tiny_module(sel)
    calls = recording_forwards(module)
    t = trainer(tmp_path, steps)
    t.fit(module, datamodule=demo_data())
    branches = [b for _, b, _ in sel.decisions]
    switches = sum(a != b for a, b in zip(["sft", *branches], branches))  # the first guess is sft
    assert 0 < switches < steps, branches  # both cases happen
    assert module.reevaluated_forwards == switches
    assert sum(not grad for _, grad, _ in calls) == steps  # one graph-free evaluation per step
    assert sum(grad for _, grad, _ in calls) == steps + switches  # the trained forward; again after a switch
    assert module.steps == {"sft": branches.count("sft"), "dpo": branches.count("dpo")}


def test_logged_learning_rate_is_the_one_the_step_used(tmp_path):
    from functools import partial

    warmup = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: (s + 1) / 10)
    module = tiny_module(Single("sft"), lr_scheduler=warmup)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(float(trainer.callback_metrics["train/lr"]))

    t = trainer(tmp_path, 3, callbacks=[Spy()])
    t.fit(module, datamodule=demo_data())
    assert seen == pytest.approx([3e-4, 6e-4, 9e-4])  # lr 3e-3 x (step + 1) / 10 at steps 0, 1, 2
    assert math.isfinite(float(t.callback_metrics["train/grad_norm"]))


class MemoryLogger(pl.loggers.Logger):
    """Keeps what is written to it."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "memory", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("every", [1, 4])
def test_loggers_get_each_objective_only_from_the_steps_that_trained_it(tmp_path, every):
    """No stale values: train/dpo_loss is written only for windows with a DPO step, as the mean over them."""
    steps = 12
    sel = RecAlright(seed=3)
    module = tiny_module(sel)
    per_step = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            m = trainer.callback_metrics
            per_step.append({k: float(m[k]) for k in ("train/sft_loss", "train/dpo_loss", "steps/sft") if k in m})

    logger = MemoryLogger()
    t = trainer(tmp_path, steps, callbacks=[Spy()], logger=logger, log_every_n_steps=every)
    t.fit(module, datamodule=demo_data())
    branches = [b for _, b, _ in sel.decisions]
    assert set(branches) == {"sft", "dpo"}
    train_rows = [(step, m) for step, m in logger.rows if "steps/sft" in m]
    assert [step for step, _ in train_rows] == list(range(every - 1, steps, every))
    for step, metrics in train_rows:
        window = range(step + 1 - every, step + 1)
        for name in ("sft", "dpo"):
            trained = [per_step[i][f"train/{name}_loss"] for i in window if branches[i] == name]
            if trained:
                assert metrics[f"train/{name}_loss"] == pytest.approx(sum(trained) / len(trained), rel=1e-6)
            else:
                assert f"train/{name}_loss" not in metrics
        assert metrics["steps/sft"] == per_step[step]["steps/sft"]  # counters: the latest value


def test_sequential_switches_and_recreates_optimizer(tmp_path):
    switch = 4
    seen = {}

    class Spy(Sequential):
        def decide(self, step, losses):
            d = super().decide(step, losses)
            return d

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = id(trainer.optimizers[0])

    module, data, t, _, _ = _fit(tmp_path, Spy(first="sft", switch_step=switch), 8)
    assert module.steps == {"sft": switch, "dpo": 8 - switch}
    # The optimizer object seen before the switch is not the one after it.
    before = {seen[s] for s in range(switch)}
    after = {seen[s] for s in range(switch + 1, 8)}
    assert len(before) == 1 and len(after) == 1 and before != after
    # Adam's step count restarted at the switch: 8 - switch steps in the new optimizer.
    state = next(iter(t.optimizers[0].state.values()))
    assert int(state["step"]) == 8 - switch


def test_sequential_stage_start_reference(tmp_path):
    module, data, t, _, ref_hash = _fit(tmp_path, Sequential(first="sft", switch_step=3, reference="stage_start"), 5)
    assert weights_sha256(module.reference) != ref_hash
    assert not module.reference_is_initial
    assert all(not p.requires_grad for p in module.reference.parameters())


def test_gradient_accumulation_consumes_micro_batches_of_one_branch(tmp_path):
    sel = RecAlright(seed=5)
    module, data, t, _, _ = _fit(tmp_path, sel, 6, accumulate=3)
    assert t.global_step == 6
    assert len(sel.decisions) == 6
    assert data.consumed_examples() == {
        "sft": 3 * 4 * module.steps["sft"],
        "dpo": 3 * 2 * module.steps["dpo"],
    }


def test_dpo_loss_at_step_zero_is_ln2(tmp_path):
    """Reference == policy at step 0, so every pair's loss is -log sigmoid(0) = ln 2."""
    sel = RecMaxright(f_sft_star=0.0, f_dpo_star=0.0, eval_every=1)
    _fit(tmp_path, sel, 1)
    assert sel.decisions[0][2]["dpo"] == pytest.approx(math.log(2), abs=1e-6)


def test_single_objective(tmp_path):
    module, data, t, _, _ = _fit(tmp_path, Single("dpo"), 3)
    assert module.steps == {"sft": 0, "dpo": 3}
    assert data.consumed_examples()["sft"] == 0
