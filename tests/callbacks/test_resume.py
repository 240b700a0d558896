"""Nothing lost: a run killed with SIGKILL and resumed with ``--ckpt_path last`` ends exactly where an
uninterrupted run ends; checkpoint writes are atomic; faults during training are skipped or stop cleanly."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import REPO, demo_data, recording_forwards, small_fit_args, tiny_module, trainer

from xright_pl import Alright, Mix, Sequential, Single, XRightCheckpoint
from xright_pl.callbacks.checkpoint import AtomicCheckpointIO, CheckpointError, atomic_torch_save, checkpoint_step
from xright_pl.callbacks.summary import weights_sha256
from xright_pl.commands.cli import run
from xright_pl.training.module import TrainingError

STEPS, EVERY = 30, 10
METHODS = {
    # method: extra flags exercising its state (accumulation; MAXRIGHT's tracked losses every 3 steps)
    "alright": ["--model.accumulate_grad_batches", "2"],
    "maxright": ["--model.selector.eval_every", "3"],
    "sequential": [],  # switches (new optimizer) at step 15, after the kill
    "mix": [],
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Bit-exact comparisons, and no thread oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(method: str, root: Path) -> list[str]:
    return small_fit_args(
        method, root, STEPS, *METHODS.get(method, []),
        val_every=15, val_batches=1, checkpoint_every=EVERY, eval_batch_size=16,
    )  # fmt: skip


def _summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


class _Killer(threading.Thread):
    """Starts one CLI run per method and SIGKILLs each once it has paused right after its first checkpoint
    (:class:`helpers.PauseAfterFirstCheckpoint`): the kill lands at a known step, however loaded the machine."""

    def __init__(self, roots: dict[str, Path]) -> None:
        super().__init__(daemon=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        pause = ["--trainer.callbacks+=tests.helpers.PauseAfterFirstCheckpoint"]
        self.procs = {
            m: subprocess.Popen(
                [sys.executable, "-m", "xright_pl", *_args(m, root), *pause],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(root.parent / f"{m}.stderr", "w"),  # noqa: SIM115 - closed with the process
            )
            for m, root in roots.items()
        }
        self.roots = roots
        self.killed: dict[str, bool] = {}

    def run(self) -> None:
        deadline = time.monotonic() + 3600  # a safety net only: the runs pause until killed
        while len(self.killed) < len(self.procs) and time.monotonic() < deadline:
            for m, p in self.procs.items():
                if m in self.killed:
                    continue
                if (self.roots[m] / "paused").exists():
                    p.send_signal(signal.SIGKILL)
                    self.killed[m] = True
                elif p.poll() is not None:
                    self.killed[m] = False  # exited before its first checkpoint
            time.sleep(0.05)
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stderr and p.stderr.close()


def test_sigkill_then_resume_equals_uninterrupted_run_for_every_method(tmp_path, monkeypatch):
    """Each method: a CLI run SIGKILLed right after its first checkpoint, resumed with ``--ckpt_path last``,
    ends with exactly the weights and validation losses of an uninterrupted run with the same seed."""
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed runs use 1 thread too: the same kernels, bit for bit
    try:
        killed_roots = {m: tmp_path / "killed" / m for m in METHODS}
        for r in killed_roots.values():
            r.mkdir(parents=True)
        killer = _Killer(killed_roots)
        killer.start()
        uninterrupted = {}
        for m in METHODS:  # meanwhile, the uninterrupted runs in this process
            run(_args(m, tmp_path / "full" / m))
            uninterrupted[m] = _summary(tmp_path / "full" / m)
        killer.join()
        for m in METHODS:
            stderr = (killed_roots[m].parent / f"{m}.stderr").read_text()[-2000:]
            assert killer.killed.get(m) is True, f"{m}: the run ended before it could be killed:\n{stderr}"
            assert killer.procs[m].returncode == -signal.SIGKILL
            ckpt = killed_roots[m] / "checkpoints" / "last.ckpt"
            assert checkpoint_step(ckpt) == EVERY  # paused at the first step after its first checkpoint
            assert not (killed_roots[m] / "summary.json").exists()
            run([*_args(m, killed_roots[m]), "--ckpt_path", "last"])
            resumed, full = _summary(killed_roots[m]), uninterrupted[m]
            for key in ("weights_sha256", "val/sft_loss", "val/dpo_loss", "optimizer_steps", "steps/sft", "steps/dpo"):
                assert resumed[key] == full[key], (m, key, resumed[key], full[key])
            assert resumed["examples/sft"] == full["examples/sft"] and resumed["examples/dpo"] == full["examples/dpo"]
            # It really resumed: this process trained only the steps after the checkpoint.
            assert 0 < resumed["tokens"] < full["tokens"], m
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ checkpoint files
def _fit_with_checkpoints(tmp_path, selector, steps=4, every=2, module=None):
    module = module or tiny_module(selector)
    data = demo_data(limit=32)
    ckpt = XRightCheckpoint(every_n_train_steps=every)
    t = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        callbacks=[ckpt],
    )
    t.fit(module, datamodule=data)
    return module, t, ckpt


def test_checkpoint_folder_atomic_io_and_no_reference_copy(tmp_path):
    module, t, ckpt = _fit_with_checkpoints(tmp_path, Alright(seed=1))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.last_model_path == str(last.resolve()) and last.is_file()
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not [p for p in last.parent.iterdir() if p.name != "last.ckpt"]  # no temp files, no step files
    state = torch.load(last, weights_only=True)  # nothing but tensors and plain values
    assert state["global_step"] == 4
    # The reference is a copy of the initial policy: rebuilt on load, not stored.
    assert not [k for k in state["state_dict"] if k.startswith("reference.")]
    assert [k for k in state["state_dict"] if k.startswith("policy.")]
    assert state["xright_pl"]["rng"]["cpu"].dtype == torch.uint8
    assert state["callbacks"]["xright_pl.Alright"]["generator"].dtype == torch.uint8


def test_stage_start_reference_is_stored_once_it_differs(tmp_path):
    module, t, _ = _fit_with_checkpoints(tmp_path, Sequential(first="sft", switch_step=1, reference="stage_start"))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    ref = {k[len("reference.") :]: v for k, v in state["state_dict"].items() if k.startswith("reference.")}
    assert ref and weights_sha256(module.reference) == _sha_of(ref)


def _sha_of(state_dict):
    m = torch.nn.Module()
    m.state_dict = lambda: state_dict  # weights_sha256 reads only state_dict()
    return weights_sha256(m)


def test_interrupted_write_and_full_disk_keep_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, path)
    real_save = torch.save

    def half_then(exc):
        def save(obj, f):
            real_save(obj, f)
            f.truncate(f.tell() // 2)  # half of it written, then the failure
            raise exc

        return save

    monkeypatch.setattr(torch, "save", half_then(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": torch.tensor(2)}, path)
    monkeypatch.setattr(torch, "save", half_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError) as e:
        atomic_torch_save({"step": torch.tensor(3)}, path)
    msg = str(e.value)
    assert "disk is full" in msg and str(path) in msg and "previous checkpoint" in msg and "intact" in msg
    monkeypatch.undo()
    assert int(torch.load(path, weights_only=True)["step"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # temp files cleaned up


def test_disk_full_during_training_is_a_clear_error(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match="disk is full"):
        _fit_with_checkpoints(tmp_path, Alright(seed=0), steps=6)
    monkeypatch.undo()
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="could not be loaded"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_data_configs_load_under_their_current_and_their_old_module(tmp_path, monkeypatch):
    """SFTData/PreferenceData moved from ``xright_pl.data.sources`` to ``xright_pl.data.specs``: checkpoints
    that name them by either module load with ``weights_only=True``."""
    from xright_pl import PreferenceData, SFTData

    hparams = {"sft": SFTData(path="a.jsonl", limit=3), "preference": PreferenceData(path="b.jsonl")}
    new, old = tmp_path / "new.ckpt", tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hparams": hparams}, new)
    for cls in (SFTData, PreferenceData):
        monkeypatch.setattr(cls, "__module__", "xright_pl.data.sources")  # pickled as before the move
    torch.save({"state_dict": {}, "hparams": hparams}, old)
    monkeypatch.undo()
    assert b"xright_pl.data.sources" in old.read_bytes() and b"xright_pl.data.sources" not in new.read_bytes()
    for path in (new, old):
        assert AtomicCheckpointIO().load_checkpoint(path)["hparams"] == hparams


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_negative_checkpoint_interval_is_a_config_error():
    from xright_pl.core.errors import ConfigError

    with pytest.raises(ConfigError, match="every_n_train_steps must be an integer >= 0"):
        XRightCheckpoint(every_n_train_steps=-1)


# ------------------------------------------------------------------------------------ non-finite steps
class _PoisonedSingle(Single):
    """SFT-only; the loss becomes NaN at the given optimizer steps (the batch is still consumed)."""

    def __init__(self, bad_steps):
        super().__init__("sft")
        self.bad_steps = set(bad_steps)
        self.attempts = 0


def _poison(module, selector, kind):
    real = module.sft_objective

    def sft_objective(batch):
        out = real(batch)
        selector.attempts += 1
        if selector.attempts - 1 in selector.bad_steps:
            if kind == "loss":
                out.loss = out.loss * float("nan")
            else:  # finite loss, NaN gradient
                out.loss = out.loss + _NanGradient.apply(module.policy.lm_head.weight.sum())
        return out

    module.sft_objective = sft_objective


class _NanGradient(torch.autograd.Function):
    """Zero forward, NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 0.0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_and_logged(tmp_path, caplog, kind):
    sel = _PoisonedSingle(bad_steps={2})
    module = tiny_module(sel)
    _poison(module, sel, kind)
    t = trainer(tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger="xright_pl.training.guards"):
        t.fit(module, datamodule=demo_data(limit=32))
    assert t.global_step == 4 and sel.attempts == 5  # one extra batch for the skipped update
    assert module.steps == {"sft": 4, "dpo": 0} and module.nonfinite_skips == 1
    (record,) = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert "step 2 (sft branch)" in record.getMessage() and "update skipped" in record.getMessage()
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert t.callback_metrics["train/nonfinite_skips"].item() == 1


def test_consecutive_nonfinite_steps_stop_training_without_nan_checkpoint(tmp_path):
    sel = _PoisonedSingle(bad_steps=range(3, 100))
    module = tiny_module(sel, max_consecutive_nonfinite=3)
    _poison(module, sel, "loss")
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss") as e:
        _fit_with_checkpoints(tmp_path, sel, steps=10, every=1, module=module)
    assert "--model.max_consecutive_nonfinite" in str(e.value)


def test_nan_weights_are_never_checkpointed(tmp_path):
    module, t, _ = _fit_with_checkpoints(tmp_path, Mix(), steps=2, every=2)
    with torch.no_grad():
        next(module.policy.parameters()).fill_(math.nan)
    with pytest.raises(TrainingError, match="Refusing to write a checkpoint"):
        t.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 2


# ------------------------------------------------------------------------------ resuming with other settings
def _fit_args(method, root, steps, *extra):
    args = _args(method, root)
    args[args.index("--trainer.max_steps") + 1] = str(steps)
    return [*args, *extra]


def test_changed_model_setting_on_resume_is_used_and_warned_for_both_path_forms(tmp_path, caplog):
    """LightningCLI would silently take the checkpoint's model settings for a file path and the command line's
    for ``last``: both forms now use the command line's and warn about each difference."""
    root = tmp_path / "run"
    run(_fit_args("alright", root, 10))
    for steps, (ckpt, old, new) in enumerate([(str(root / "checkpoints" / "last.ckpt"), 0.5, 0.9), ("last", 0.9, 0.7)]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="xright_pl.training.module"):
            run(_fit_args("alright", root, 12 + 2 * steps, "--model.lam", str(new), "--ckpt_path", ckpt))
        assert _summary(root)["lam"] == new
        assert f"resuming with model.lam = {new}; the checkpoint was trained with {old}" in caplog.text


def test_changed_batch_size_on_resume_continues_at_the_same_example(tmp_path, caplog):
    root = tmp_path / "run"
    run(_fit_args("sft_only", root, 6))  # 6 steps x 4 rows: 24 examples
    with caplog.at_level("WARNING", logger="xright_pl.data.streams"):
        run(_fit_args("sft_only", root, 9, "--data.batching.sft_batch_size", "8", "--ckpt_path", "last"))
    assert "sft batch size changed from 4 to 8 on resume: continuing at example 24" in caplog.text
    assert _summary(root)["examples/sft"] == 24 + 3 * 8
    # Rows 24-47 of epoch 0 (3 batches of 8) were trained after the resume: the epoch of 48 rows is complete.
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["JointDataModule"]["streams"]["sft"]
    assert (state["epoch"], state["position"], state["batch_size"]) == (1, 0, 8)


def test_other_data_on_resume_is_refused(tmp_path, capsys):
    from xright_pl.commands.cli import main

    root = tmp_path / "run"
    run(_fit_args("sft_only", root, 4))
    with pytest.raises(SystemExit) as e:
        main(_fit_args("sft_only", root, 6, "--data.sft.limit", "40", "--ckpt_path", "last"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint was written with 48 training rows, this run has 40" in err and "Traceback" not in err


def test_sequential_switch_is_kept_when_resuming_with_more_steps(tmp_path):
    """A run of 20 steps switches at step 10 (lam 0.5); resumed at 20 with max_steps 40, the second stage goes on:
    no return to the first objective, no second switch (optimizer reset)."""
    root = tmp_path / "run"
    run(_fit_args("sequential", root, 20))
    assert (_summary(root)["steps/sft"], _summary(root)["steps/dpo"]) == (10, 10)
    run(_fit_args("sequential", root, 30, "--ckpt_path", "last"))
    assert (_summary(root)["steps/sft"], _summary(root)["steps/dpo"]) == (10, 20)


def test_reloaded_training_loaders_continue_the_streams(tmp_path):
    """--trainer.reload_dataloaders_every_n_epochs rebuilds the loaders: the streams keep their positions."""
    root = tmp_path / "run"
    run(_fit_args("sft_only", root, 30, "--trainer.reload_dataloaders_every_n_epochs", "1"))
    assert _summary(root)["examples/sft"] == 30 * 4
    plain = tmp_path / "plain"
    run(_fit_args("sft_only", plain, 30))
    assert _summary(root)["weights_sha256"] == _summary(plain)["weights_sha256"]


def test_maxright_resume_goes_on_looking_ahead_where_it_stopped(tmp_path):
    """MAXRIGHT's evaluations of an objective it keeps not training look further ahead each time; a resumed run
    must go on from the same place (the count is checkpointed), or it would re-read a batch already evaluated."""
    from xright_pl import Maxright

    def sft_batches(calls):  # SFT is never trained here: every SFT forward is an evaluation
        return [ids for name, _, ids in calls if name == "sft"]

    def selector():
        return Maxright(f_sft_star=100.0, f_dpo_star=0.0, eval_every=1)  # SFT gap < 0: DPO at every step

    full = tiny_module(selector())
    full_calls = recording_forwards(full)
    _fit_with_checkpoints(tmp_path / "full", None, steps=6, every=3, module=full)
    first = tiny_module(selector())
    first_calls = recording_forwards(first)
    _fit_with_checkpoints(tmp_path / "resumed", None, steps=3, every=3, module=first)
    assert first.evaluations_untrained == {"sft": 3}
    resumed = tiny_module(selector())
    resumed_calls = recording_forwards(resumed)
    t = pl.Trainer(
        default_root_dir=str(tmp_path / "resumed"), max_steps=6, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
        val_check_interval=6, check_val_every_n_epoch=None, callbacks=[XRightCheckpoint(every_n_train_steps=3)],
    )  # fmt: skip
    t.fit(resumed, datamodule=demo_data(limit=32), ckpt_path=str(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))
    full_seen = sft_batches(full_calls)
    assert len(set(full_seen)) == 6
    assert sft_batches(first_calls) + sft_batches(resumed_calls) == full_seen
    assert resumed.evaluations_untrained == {"sft": 6}
