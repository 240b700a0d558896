"""Every offline config through the real CLI, --help and --print_config, and the README snippet."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from xright_pl.cli import EXTRA_COMMANDS, run

OFFLINE_CONFIGS = sorted([REPO / "configs" / "demo.yaml", *(REPO / "configs" / "demo").glob("*.yaml")])
SMALL = [
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "4",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--data.sft.limit",
    "64",
    "--data.preference.limit",
    "64",
]


def _summary(root: Path) -> dict:
    found = sorted(root.rglob("summary.json"))
    assert found, f"no summary.json under {root}"
    return json.loads(found[-1].read_text())


@pytest.mark.parametrize("config", OFFLINE_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_offline_config_runs_through_cli(config, tmp_path, capsys):
    run(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path), *SMALL])
    summary = _summary(tmp_path)
    assert summary["optimizer_steps"] == 4
    assert summary["steps/sft"] + summary["steps/dpo"] >= 4
    method = yaml.safe_load(config.read_text())["model"]["selector"]["class_path"].rsplit(".", 1)[-1].lower()
    assert summary["method"] == method
    assert "xright_pl run summary" in capsys.readouterr().out
    # LightningCLI saved the resolved config next to the logs: the run can be reproduced from it.
    assert list(tmp_path.rglob("config.yaml"))


def test_cli_override_and_print_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(["fit", "--config", str(REPO / "configs/demo.yaml"), "--model.lam", "0.25", "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["lam"] == 0.25
    assert cfg["model"]["selector"]["class_path"] == "xright_pl.Alright"
    assert cfg["data"]["batching"]["sft_batch_size"] == 16


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        run([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model.lam" in out and "weight of the DPO objective" in out
    assert "--data.sft.path" in out


def test_user_error_is_one_paragraph_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "xright_pl", "fit", "--config", "configs/demo.yaml", "--model.lam", "1.5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "xright_pl: error:" in proc.stderr and "lam must be a number in [0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_extra_commands_are_registered():
    assert set(EXTRA_COMMANDS) >= {"export", "generate", "judge", "optimum"}


def test_readme_snippet_runs(tmp_path, monkeypatch):
    """The README's 'in your own Lightning project' snippet, with the step count shrunk."""
    readme = (REPO / "README.md").read_text()
    m = re.search(r"<!-- snippet: own-project -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README lost its own-project snippet"
    code = m.group(1).replace("max_steps=200", "max_steps=3")
    assert "max_steps=3" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 3
