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

from xright_pl.cli import EXTRA_COMMANDS, main, run

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
    config_data = yaml.safe_load(config.read_text())["data"]
    names = [d["name"] for d in config_data["datasets"]] if "datasets" in config_data else ["sft", "dpo"]
    assert sorted(k for k in summary if k.startswith("steps/")) == sorted(f"steps/{k}" for k in names)
    assert sum(summary[f"steps/{k}"] for k in names) >= 4
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
        timeout=1800,  # generous: the machine may be heavily loaded; nothing here depends on timing
    )
    assert proc.returncode == 2
    assert "xright_pl: error:" in proc.stderr and "lam must be a number in [0, 1]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sequential_stages_in_epochs_through_cli(tmp_path):
    """switch_epochs / second_epochs count epochs of each objective's own data (known once training starts):
    128 SFT rows at 16 per step = 8 steps an epoch, 128 pairs at 8 = 16; 0.5 epoch of SFT, then 0.25 of DPO."""
    run(
        [
            "fit", "--config", str(REPO / "configs/demo/sequential.yaml"), "--trainer.default_root_dir",
            str(tmp_path), "--trainer.max_steps", "-1", "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "1", "--data.sft.limit", "128", "--data.preference.limit", "128",
            "--model.selector.init_args.switch_epochs", "0.5", "--model.selector.init_args.second_epochs", "0.25",
        ]
    )  # fmt: skip
    summary = _summary(tmp_path)
    assert (summary["steps/sft"], summary["steps/dpo"], summary["optimizer_steps"]) == (4, 4, 8)
    assert (summary["examples/sft"], summary["examples/dpo"]) == (64, 32)
    assert "switch at step 4, end at step 8" in summary["selector"]


@pytest.mark.parametrize(
    ("flag", "value", "hint"),
    [("accumulate_grad_batches", "4", "--model.accumulate_grad_batches 4"), ("gradient_clip_val", "0.5", "--model")],
)
def test_trainer_level_accumulation_or_clipping_points_to_the_model_option(flag, value, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/demo.yaml"), f"--trainer.{flag}", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert hint in err and "automatic optimization" not in err


def test_no_secret_reaches_the_run_directory(tmp_path, monkeypatch, capsys):
    """Hub credentials come from the environment (HF_TOKEN) and are never written: not in the saved config, the
    hyper-parameters, summary.json, the TensorBoard events or the checkpoints."""
    secret = "hf_SECRETsentinel1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    run(
        [
            "fit",
            "--config",
            str(REPO / "configs/demo/alright.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            *SMALL,
        ]
    )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files) and any(p.name == "summary.json" for p in files)
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in capsys.readouterr().out


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


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.lamda", "0.3"], ["unknown option 'model.lamda'", "Did you mean model.lam?"]),
        (["--trainer.max_steps", "0"], ["--trainer.max_steps 0 trains nothing"]),
        (["--trainer.max_steps", "-5"], ["max_steps", "-5"]),
        (["--model.optimizer.init_args.lr", "abc"],
         ["--model.optimizer.init_args.lr: 'abc' is not a valid value", "float"]),
        (["--data.batching.sft_batch_size", "x"],
         ["--data.batching.sft_batch_size: 'x' is not a valid value (expected int)"]),
    ],
)  # fmt: skip
def test_bad_settings_are_one_clear_paragraph(args, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(tmp_path), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xright_pl: error:") and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err
    assert not (tmp_path / "lightning_logs").exists()  # nothing trained


def test_typo_in_a_config_file_names_the_key_and_the_closest_option(tmp_path, capsys):
    text = (REPO / "configs/demo.yaml").read_text()
    assert "\n  lam: 0.5" in text
    config = tmp_path / "typo.yaml"
    config.write_text(text.replace("\n  lam: 0.5", "\n  lamda: 0.5"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    assert "unknown option 'model.lamda'" in capsys.readouterr().err
