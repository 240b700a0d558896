"""Progress in optimizer steps: lines in a log (not a terminal), one redrawn line on a terminal, finished before
the run summary, which ends with the last checkpoint and the command that resumes the run."""

from __future__ import annotations

import io
import re
import sys

import pytest
from helpers import REPO, demo_data, tiny_module, trainer

from xright_pl import Alright, StepProgress
from xright_pl.commands.cli import main
from xright_pl.core.commandline import resume_command

ARGS = ["--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--data.sft.limit", "64"]


def _fit(tmp_path, capsys, *extra: str) -> list[str]:
    args = ["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["/site-packages/xright_pl/__main__.py", *args, *ARGS, *extra])  # as run by python -m
        main(sys.argv[1:])
    return capsys.readouterr().out.splitlines()


def test_log_output_has_step_lines_validation_lines_then_summary_and_resume_hint(tmp_path, capsys):
    out = _fit(tmp_path, capsys, "--trainer.max_steps", "8", "--progress.every_n_steps", "2", "--progress.tty", "false")
    steps = [ln for ln in out if ln.startswith("step ")]
    assert [ln.split(" | ")[0] for ln in steps] == [f"step {s}/8 ({100 * s // 8}%)" for s in (2, 4, 6, 8)]
    for line in steps:  # per-objective optimizer steps add up to the step count
        s, sft, dpo = map(int, re.match(r"step (\d+)/8 .*\| sft (\d+) dpo (\d+)", line).groups())
        assert sft + dpo == s
    assert sum(ln.startswith("validation at step 4: val/sft_loss") for ln in out) == 1
    assert sum(ln.startswith("validation at step 8: val/sft_loss") for ln in out) == 1
    summary = out.index("xright_pl run summary")
    assert out.index(steps[-1]) < summary and not any("Epoch" in ln for ln in out)
    assert out[-2] == f"last checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}"
    expected = f"{tmp_path} {' '.join(ARGS)} --trainer.max_steps 8 --progress.every_n_steps 2 --progress.tty false"
    assert out[-1].startswith("to resume") and out[-1].endswith(f"{expected} --ckpt_path last")


def test_accumulation_counts_optimizer_steps_and_progress_can_be_turned_off(tmp_path, capsys):
    out = _fit(
        tmp_path / "acc", capsys, "--trainer.max_steps", "4", "--model.accumulate_grad_batches", "2",
        "--progress.every_n_steps", "1", "--progress.tty", "false",
    )  # fmt: skip
    assert [ln.split(" | ")[0] for ln in out if ln.startswith("step ")] == [
        f"step {s}/4 ({25 * s}%)" for s in range(1, 5)
    ]
    out = _fit(tmp_path / "off", capsys, "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false")
    assert not [ln for ln in out if ln.startswith(("step ", "training from", "validation at"))]
    assert "xright_pl run summary" in out


def test_terminal_line_is_redrawn_and_finished(tmp_path):
    bar = StepProgress(tty=True)
    bar.stream = io.StringIO()
    trainer(tmp_path, max_steps=3, callbacks=[bar], enable_progress_bar=True).fit(
        tiny_module(Alright(seed=0)), datamodule=demo_data(limit=32)
    )
    text = bar.stream.getvalue()
    assert text.count("\r\033[2K") == 3 and text.endswith("\n")
    redrawn = text.split("\n")[1]  # after "training from step 0 to 3"
    assert [part.split(" | ")[0] for part in redrawn.split("\r\033[2K")[1:]] == [
        "step 1/3 (33%)",
        "step 2/3 (67%)",
        "step 3/3 (100%)",
    ]


def test_resume_command_replaces_the_checkpoint_path(monkeypatch):
    args = ["fit", "--config", "my run.yaml", "--ckpt_path", "a.ckpt", "--model.lam", "0.3"]
    assert resume_command(args) == "python -m xright_pl fit --config 'my run.yaml' --model.lam 0.3 --ckpt_path last"
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])
    assert resume_command().startswith("trainer.fit(model, datamodule=data, ckpt_path='last')")
    monkeypatch.setattr(sys, "argv", ["/x/xright_pl/__main__.py", *args])  # python -m xright_pl ...
    assert resume_command() == resume_command(args)
