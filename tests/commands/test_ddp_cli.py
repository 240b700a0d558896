"""Multi-process runs through the real CLI: ``python -m xright_pl fit ... --trainer.devices 2 --trainer.strategy
ddp`` on 2 CPU processes (gloo), with every callback the shipped configs turn on (checkpoint, summary, trajectory,
progress, gap metrics) plus export at fit end and the win-rate callback. Each run is a subprocess with a timeout:
a deadlock in a rank-only hook fails the test instead of hanging CI.

The rule these tests hold: code that runs on some ranks only never calls a collective (``Trainer.log_dir``,
``strategy.broadcast``, ``barrier``, ``reduce_boolean_decision``, checkpoint saving, ``all_gather``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

#: Generous: the machine may be heavily loaded. Nothing here depends on timing; the limit only turns a hang
#: into a failure.
TIMEOUT = 900
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
ENV.pop("LOCAL_RANK", None)
ENV.pop("XRIGHT_PL_RUN_VERSION", None)
CHECKPOINT_EVERY = 4


def _fit_args(root: Path, steps: int, *extra: str, config: str = "configs/demo.yaml") -> list[str]:
    return [
        sys.executable, "-m", "xright_pl", "fit", "--config", config, "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
        "--trainer.callbacks.every_n_train_steps", str(CHECKPOINT_EVERY), "--progress.every_n_steps", "2",
        "--data.batching.eval_batch_size", "16", *DDP, *extra,
    ]  # fmt: skip


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def _version_dirs(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"))


def _summary(root: Path) -> dict:
    (folder,) = _version_dirs(root)[-1:]
    return json.loads((folder / "summary.json").read_text())


def _assert_finished(proc: subprocess.CompletedProcess, root: Path, steps: int, picture: bool = True) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    folder = _version_dirs(root)[-1]
    summary = _summary(root)
    assert summary["optimizer_steps"] == steps
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert not (root / "checkpoints" / "xright.lock").exists()  # released at the end
    if picture:
        assert (folder / "trajectory.png").stat().st_size > 0
        assert summary["trajectory_png"] == str(folder / "trajectory.png")
    assert (folder / "config.yaml").is_file() and (folder / "hparams.yaml").is_file()
    if picture:
        assert f"step {steps}/{steps}" in proc.stdout + proc.stderr  # the progress lines
    return summary


def _callback(class_path: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    from test_judge import tiny_reward_model

    from xright_pl.data.encoding import load_tokenizer

    return tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm", load_tokenizer("builtin:demo/tokenizer"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """An 8-step DDP run (a multiple of the checkpoint interval: the final save is skipped as already written)."""
    root = tmp_path_factory.mktemp("ddp_full")
    proc = _run(_fit_args(root, 2 * CHECKPOINT_EVERY))
    return _assert_finished(proc, root, 2 * CHECKPOINT_EVERY)


def test_ddp_run_through_the_cli_exits_and_keeps_everything(tmp_path, reward_model):
    """max_steps not a multiple of the checkpoint interval (the final save runs in on_train_end on every rank),
    with export at fit end and the win-rate callback: exit 0, summary, last.ckpt at the last step, picture, hf/."""
    steps = CHECKPOINT_EVERY + 2
    export = _callback("xright_pl.ExportOnFitEnd")
    win_rate = _callback(
        "xright_pl.WinRateCallback", reward_model=reward_model, num_prompts=4, every_n_steps=3,
        max_new_tokens=4, batch_size=4, baseline="chosen",
    )  # fmt: skip
    proc = _run(_fit_args(tmp_path, steps, export, win_rate))
    summary = _assert_finished(proc, tmp_path, steps)
    from xright_pl.callbacks.checkpoint import checkpoint_step

    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == steps
    hf = _version_dirs(tmp_path)[-1] / "hf"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    assert 0 <= summary["eval/win_rate"] <= 1  # the win-rate callback ran on both ranks (its last value)
    assert summary["steps/sft"] + summary["steps/dpo"] == steps


def test_ddp_resume_from_last_continues_exactly(tmp_path, uninterrupted):
    """4 steps, then --ckpt_path last to 8 steps, both on 2 processes: the same weights as 8 steps at once."""
    first = _run(_fit_args(tmp_path, CHECKPOINT_EVERY))
    _assert_finished(first, tmp_path, CHECKPOINT_EVERY)
    resumed = _run(_fit_args(tmp_path, 2 * CHECKPOINT_EVERY, "--ckpt_path", "last"))
    summary = _assert_finished(resumed, tmp_path, 2 * CHECKPOINT_EVERY)
    assert len(_version_dirs(tmp_path)) == 2  # the resumed run logs in its own version folder
    for key in ("weights_sha256", "steps/sft", "steps/dpo", "val/sft_loss", "val/dpo_loss"):
        assert summary[key] == uninterrupted[key], key


def test_ddp_sigterm_at_the_last_step_saves_stops_and_resumes(tmp_path, uninterrupted):
    """SIGTERM to both ranks in the last optimizer step: both stop at its boundary with last.ckpt (exit 143), the
    exception hooks and teardown run on every rank (no hang), and the resumed run (no step left to train) runs
    the end-of-run hooks on both ranks and ends where an uninterrupted one does."""
    steps = 2 * CHECKPOINT_EVERY
    signal_at = _callback("signal_helpers.SignalAt", step=steps - 1)
    proc = _run(_fit_args(tmp_path, steps, signal_at))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert f"stopped by SIGTERM at step {steps}" in proc.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "checkpoints" / "xright.lock").exists()
    resumed = _run(_fit_args(tmp_path, steps, "--ckpt_path", "last"))
    summary = _assert_finished(resumed, tmp_path, steps, picture=False)  # nothing validated: no point to draw
    assert summary["weights_sha256"] == uninterrupted["weights_sha256"]


def test_ddp_sigterm_during_the_end_of_run_hooks_lets_them_finish(tmp_path):
    """SIGTERM to both ranks inside on_train_end (after the last step, while the end-of-run hooks run, some of
    them collectives): no rank stops inside them; they finish on every rank (final checkpoint, summary, picture)
    and the run exits 0, saying so."""
    steps = CHECKPOINT_EVERY + 1
    proc = _run(_fit_args(tmp_path, steps, _callback("signal_helpers.SignalAtTrainEnd")))
    _assert_finished(proc, tmp_path, steps)
    assert proc.stderr.count("received SIGTERM: training is complete: finishing the end-of-run hooks") == 2
    from xright_pl.callbacks.checkpoint import checkpoint_step

    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == steps


def test_ddp_spawn_is_refused_at_start_with_one_line(tmp_path):
    args = _fit_args(tmp_path, 2)
    args[args.index("ddp")] = "ddp_spawn"
    proc = _run(args)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("xright_pl: error:")]
    assert len(err) == 1 and "--trainer.strategy ddp" in err[0] and "Traceback" not in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written
