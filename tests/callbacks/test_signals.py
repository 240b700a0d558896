"""SIGTERM / Ctrl-C during ``fit``: ``last.ckpt`` at the next optimizer-step boundary, a clear message, exit status
128 + signum, and ``--ckpt_path last`` resumes exactly; prompt stops outside training; SLURM requeue; and the
checkpoint-folder faults (concurrent runs, read-only folder, corrupt last.ckpt, another selector)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, small_fit_args

from xright_pl.callbacks.checkpoint import CheckpointError, checkpoint_step
from xright_pl.callbacks.signals import Interrupted, resume_command
from xright_pl.commands.cli import run
from xright_pl.core.errors import ConfigError

STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses use 1 thread too: the same kernels, bit for bit
    yield
    torch.set_num_threads(threads)


def _args(method: str, root: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return small_fit_args(
        method, root, steps, *extra, val_every=6, val_batches=2, checkpoint_every=5, eval_batch_size=8
    )


def _callback(name: str, **init_args) -> str:
    """``--trainer.callbacks+=`` for a callback of ``tests/signal_helpers.py``."""
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"signal_helpers.{name}", "init_args": init_args})


def _summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


def _same_run(resumed: dict, full: dict) -> None:
    for key in ("weights_sha256", "val/sft_loss", "val/dpo_loss", "optimizer_steps", "steps/sft", "steps/dpo"):
        assert resumed[key] == full[key], (key, resumed[key], full[key])


# ------------------------------------------------------------------------------ SIGTERM / SIGINT in training
@pytest.mark.parametrize(
    "method, extra, signum, micro",
    [
        ("alright", ["--model.accumulate_grad_batches", "2"], signal.SIGTERM, 1),  # between 2 micro-batches
        ("mix", [], signal.SIGINT, 0),
    ],
)
def test_signal_in_training_saves_at_the_step_boundary_and_resumes_exactly(
    tmp_path, capsys, method, extra, signum, micro
):
    """The signal arrives at the start of step 7 (micro-batch 0 of 2 for ALRIGHT): the step is finished, last.ckpt
    is saved at step 8 (not the periodic step 5), the run stops with 128 + signum and the resume command; the resumed
    run ends exactly where an uninterrupted one does."""
    full = tmp_path / "full"
    run(_args(method, full, *extra))
    root = tmp_path / "stopped"
    sender = _callback("SignalAt", step=7, micro=micro, signum=int(signum))
    args = _args(method, root, *extra, sender)
    with pytest.raises(Interrupted) as e:
        run(args)
    assert e.value.code == 128 + signum
    last = root / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 8
    assert not (root / "summary.json").exists()
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} at step 8" in err and str(last.resolve()) in err
    assert resume_command(args) in err and resume_command(args).endswith("--ckpt_path last")
    assert not (root / "checkpoints" / "xright.lock").exists()  # released on the way out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    run(_args(method, root, *extra, "--ckpt_path", "last"))
    _same_run(_summary(root), _summary(full))
    assert 0 < _summary(root)["tokens"] < _summary(full)["tokens"]  # it trained only the steps after step 8


def test_sigterm_during_validation_stops_at_once(tmp_path, capsys):
    """SIGTERM at the first batch of the step-6 validation: no further validation batch runs; the message names the
    periodic checkpoint (step 5) to resume from."""
    root = tmp_path / "run"
    watcher = "--trainer.callbacks+=signal_helpers.SignalDuringValidation"
    with pytest.raises(Interrupted) as e:
        run(_args("mix", root, watcher))
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM during the validation at step 6" in err
    assert str((root / "checkpoints" / "last.ckpt").resolve()) in err and "--ckpt_path last" in err
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 5


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xright_pl", *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigterm_during_tokenization_stops_the_process_at_once(tmp_path):
    marker = tmp_path / "went_on"
    p = _cli(
        _args(
            "alright",
            tmp_path / "run",
            _callback("SignalDuringDataLoad", marker=str(marker)),
        )
    )
    _, err = p.communicate(timeout=900)
    assert p.returncode == 143, err[-3000:]
    assert not marker.exists()
    assert "xright_pl: stopped by SIGTERM during start-up" in err and "Nothing was saved" in err
    assert "Traceback" not in err


def test_external_sigterm_from_another_process(tmp_path):
    """The test process sends SIGTERM once the run reports step 4 (a marker file): last.ckpt at step 5, exit 143,
    the printed command resumes to the uninterrupted run's weights."""
    marker = tmp_path / "at_step_4"
    root = tmp_path / "run"
    waiter = _callback("WaitForSignalAt", step=4, marker=str(marker))
    args = _args("maxright", root, "--trainer.callbacks.every_n_train_steps", "100", waiter)
    p = _cli(args)
    try:
        while not marker.exists() and p.poll() is None:  # wait for the condition (a file), not for a delay
            try:
                p.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        assert marker.exists(), p.communicate()[1][-3000:]
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=900)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err[-3000:]
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 5
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python -m xright_pl fit") and command.endswith("--ckpt_path last")
    full = tmp_path / "full"
    run(_args("maxright", full, "--trainer.callbacks.every_n_train_steps", "100"))
    resumed = [a for a in __import__("shlex").split(command)[3:] if a != waiter]
    run(resumed)
    _same_run(_summary(root), _summary(full))


# ------------------------------------------------------------------------------ SLURM requeue (without SLURM)
def test_slurm_requeue_signal_checkpoints_at_the_step_boundary_then_requeues(tmp_path, monkeypatch):
    """Under SLURMEnvironment(auto_requeue=True), SIGUSR1 between two micro-batches of step 3: last.ckpt and
    Lightning's hpc_ckpt_1.ckpt (which the requeued job resumes from) are both written at step 4, then
    `scontrol requeue <job>` runs and the run stops with 128 + SIGUSR1."""
    import lightning.pytorch as pl
    from helpers import demo_data, tiny_module
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.trainer.connectors import signal_connector
    from signal_helpers import SignalAt

    from xright_pl import Alright, StopOnSignal, XRightCheckpoint

    for k, v in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "n1",
                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    calls = []
    monkeypatch.setattr(signal_connector, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    t = pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=8,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        plugins=[SLURMEnvironment(auto_requeue=True)],
        callbacks=[XRightCheckpoint(every_n_train_steps=100), StopOnSignal(), SignalAt(3, 1, int(signal.SIGUSR1))],
    )
    with pytest.raises(Interrupted) as e:
        t.fit(tiny_module(Alright(seed=0), accumulate_grad_batches=2), datamodule=demo_data(limit=32))
    assert e.value.code == 128 + signal.SIGUSR1
    assert calls == [["scontrol", "requeue", "4242"]]
    assert checkpoint_step(tmp_path / "hpc_ckpt_1.ckpt") == 4
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 4
    assert "SLURM job was requeued" in str(e.value)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------------------ checkpoint-folder faults
def _quick(method: str, root: Path, steps: int, *extra: str) -> list[str]:
    return _args(method, root, "--trainer.val_check_interval", str(steps), *extra, steps=steps)


def test_second_run_on_the_same_folder_is_refused_and_stale_lock_taken_over(tmp_path, caplog):
    """A live run holds the folder: another fit there stops before training, naming the folder and the process.
    A lock left by a dead process on this host is taken over with a warning."""
    root = tmp_path / "run"
    marker, release = tmp_path / "holding", tmp_path / "release"
    holder = _callback("HoldAt", step=2, marker=str(marker), release=str(release))
    p = _cli(_quick("sft_only", root, 4, holder))
    try:
        while not marker.exists() and p.poll() is None:  # wait for the condition (a file), not for a delay
            try:
                p.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        assert marker.exists(), p.communicate()[1][-3000:]
        with pytest.raises(CheckpointError) as e:
            run(_quick("sft_only", root, 4))
        msg = str(e.value)
        folder = str((root / "checkpoints").resolve())
        assert f"Checkpoint folder {folder!r} is in use by another run (process {p.pid} on host" in msg
        assert "--trainer.default_root_dir" in msg
        release.write_text("go")
        _, err = p.communicate(timeout=900)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 4  # the first run's checkpoint, untouched
    assert not (root / "checkpoints" / "xright.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = root / "checkpoints" / "xright.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level("WARNING", logger="xright_pl.callbacks.checkpoint"):
        run(_quick("sft_only", root, 6, "--ckpt_path", "last"))
    assert f"Taking over the stale lock {lock} of process {int(dead.stdout)}" in caplog.text
    assert _summary(root)["optimizer_steps"] == 6 and not lock.exists()


def test_unwritable_checkpoint_folder_fails_before_training(tmp_path, monkeypatch):
    root = tmp_path / "run"
    folder = (root / "checkpoints").resolve()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # the tests run as root, for whom chmod does not forbid writes
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    trained = []
    monkeypatch.setattr("xright_pl.training.module.XRightModule.training_step", lambda *a: trained.append(1))
    with pytest.raises(CheckpointError) as e:
        run(_quick("sft_only", root, 4))
    assert f"Checkpoint folder {str(folder)!r} cannot be written (Read-only file system)" in str(e.value)
    assert "before training" in str(e.value) and trained == []


def test_corrupt_last_checkpoint_names_the_file_and_the_kept_previous_one(tmp_path):
    root = tmp_path / "run"
    keep = ["--trainer.callbacks.keep_previous", "true"]
    run(_quick("alright", root, 10, *keep))  # saves at 5 and 10
    folder = root / "checkpoints"
    last, prev = folder / "last.ckpt", folder / "prev-last.ckpt"
    assert checkpoint_step(prev) == 5 and checkpoint_step(last) == 10
    run(_quick("alright", root, 12, *keep, "--ckpt_path", "last"))  # now prev-last is step 10, last step 12
    assert checkpoint_step(prev) == 10 and checkpoint_step(last) == 12
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError) as e:
        run(_quick("alright", root, 14, *keep, "--ckpt_path", "last"))
    msg = str(e.value)
    assert (
        f"Checkpoint '{last.resolve()}' could not be loaded" in msg or f"Checkpoint '{last}' could not be loaded" in msg
    )
    assert f"The previous good checkpoint is '{prev}' (step 10)" in msg and f"--ckpt_path {prev}" in msg
    run(_quick("alright", root, 14, *keep, "--ckpt_path", str(prev)))
    assert _summary(root)["optimizer_steps"] == 14


def test_resuming_with_another_selector_is_refused(tmp_path):
    root = tmp_path / "run"
    run(_quick("alright", root, 4))
    for other, key in (("maxright", "xright_pl.Maxright"), ("mix", "xright_pl.Mix")):
        with pytest.raises(ConfigError) as e:
            run(_quick(other, root, 6, "--ckpt_path", "last"))
        msg = str(e.value)
        assert f"trained with the selector xright_pl.Alright, this run uses {key}" in msg
    run(_quick("mix", tmp_path / "mix", 4))
    with pytest.raises(ConfigError, match="selector xright_pl.Mix, this run uses xright_pl.Alright"):
        run(_quick("alright", tmp_path / "mix", 6, "--ckpt_path", "last"))


# ------------------------------------------------------------------------------ DDP: every rank stops at one step
def test_ddp_ranks_stop_together_at_the_step_boundary(tmp_path):
    """SIGTERM to rank 0 only, between the two micro-batches of step 3: both ranks finish step 3, last.ckpt is
    written once at step 4 and both stop with 143 (the signal is passed on, and the ranks agree at each step)."""
    env = {**ENV}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "ddp", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in results] == [0, 1], proc.stderr[-3000:]
    assert [(r["code"], r["global_step"]) for r in results] == [(143, 4), (143, 4)], proc.stderr[-3000:]
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 4
    assert proc.returncode == 143


def _ddp_worker(out_dir: str) -> None:
    import lightning.pytorch as pl
    from helpers import demo_data, tiny_module
    from signal_helpers import SignalAt

    from xright_pl import Alright, StopOnSignal, XRightCheckpoint

    rank = int(os.environ.get("LOCAL_RANK", 0))
    callbacks = [XRightCheckpoint(every_n_train_steps=100), StopOnSignal()]
    if rank == 0:
        callbacks.append(SignalAt(3, 1))
    trainer = pl.Trainer(
        default_root_dir=out_dir,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    code = 0
    try:
        trainer.fit(tiny_module(Alright(seed=7), accumulate_grad_batches=2), datamodule=demo_data(limit=64))
    except Interrupted as e:
        code = e.code
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"rank": trainer.global_rank, "code": code, "global_step": trainer.global_step})
    )
    sys.exit(code)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _ddp_worker(sys.argv[2])
