"""Every offline config through the real CLI, --help and --print_config, and the README snippet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from xright_pl.commands.cli import EXTRA_COMMANDS, main, run

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
    # the attribute docstrings of the data classes are the options' help
    assert "Local .json/.jsonl/.parquet file" in " ".join(out.split())
    assert "sft_batch_size" in out and "SFT sequences per micro-batch" in " ".join(out.split())


def test_top_level_help_lists_every_command(capsys):
    run(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m xright_pl <command>")
    for command in ("fit", "validate", *EXTRA_COMMANDS):
        assert f"\n  {command} " in out, command
    with pytest.raises(SystemExit) as e:
        run([])
    assert e.value.code == 2 and "usage: python -m xright_pl" in capsys.readouterr().err


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


# ------------------------------------------------------------------------------ start-up: nothing written
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.optimizer.init_args.lr", "-1"],
         ["--model.optimizer.init_args.lr", "torch.optim.adamw.AdamW", "Invalid learning rate: -1"]),
        (["--trainer.max_step", "10"], ["unknown option 'trainer.max_step'", "Did you mean trainer.max_steps"]),
        (["--trainer.strategy", "ddp_spawn", "--trainer.accelerator", "cpu", "--trainer.devices", "2"],
         ["--trainer.strategy ddp_spawn is not supported", "use --trainer.strategy ddp"]),
    ],
)  # fmt: skip
def test_start_up_errors_are_one_line_and_write_nothing(args, expected, tmp_path, capsys):
    root = tmp_path / "root"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(root), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xright_pl: error:") and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    assert not root.exists()


def test_a_root_below_a_regular_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(afile / "sub")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trainer.default_root_dir" in err and "Not a directory" in err, err


def _read_only_mount_available(folder: Path) -> bool:
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_a_read_only_root_is_one_line_before_anything_runs(tmp_path):
    """A read-only mount (a private mount namespace; root ignores permission bits, so chmod would not do)."""
    import shutil

    mount = tmp_path / "ro"
    mount.mkdir()
    if not shutil.which("unshare") or not _read_only_mount_available(mount):
        if os.geteuid() == 0:
            pytest.skip("no private read-only mount here (unshare -m)")
        mount.chmod(0o555)
        prefix: list[str] = []
    else:
        remount = f'mount --bind {mount} {mount} && mount -o remount,bind,ro {mount} && "$@"'
        prefix = ["unshare", "-m", "sh", "-c", remount, "sh"]
    cmd = [sys.executable, "-m", "xright_pl", "fit", "--config", "configs/demo.yaml"]
    proc = subprocess.run(
        [*prefix, *cmd, "--trainer.default_root_dir", str(mount / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("xright_pl: error:")]
    assert len(err) == 1 and "--trainer.default_root_dir" in err[0], proc.stderr[-3000:]
    assert "Read-only file system" in err[0] or "Permission denied" in err[0]
    assert "Traceback" not in proc.stderr
    assert not any(mount.iterdir())


def test_a_failed_start_leaves_no_version_folder(tmp_path, capsys):
    """A run refused after the logger's folder was picked (bad data at setup) removes it again."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')  # no output field
    root = tmp_path / "root"
    (root / "lightning_logs" / "version_0").mkdir(parents=True)  # an earlier run's folder is kept
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(root),
              "--data.sft.path", str(bad)])  # fmt: skip
    assert e.value.code == 2
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == ["version_0"]
    assert not (root / "checkpoints").exists()


_RACER = """
import sys, time
from pathlib import Path
from xright_pl.commands.cli import main
go = Path(sys.argv[1])
while not go.exists():  # both processes are imported and waiting: they start their fits together
    time.sleep(0.005)
main(sys.argv[2:])
"""


@pytest.mark.parametrize("attempt", range(3))
def test_two_runs_started_together_on_one_root_keep_their_own_config(attempt, tmp_path):
    """Two fits on one default_root_dir at the same moment (lam 0.3 and 0.7): one may be refused by the lock (exit
    2, having written nothing), or both may run one after the other; never does one run's config.yaml, hparams.yaml
    or summary.json say another's lam, and no empty version folder is left."""
    root, go = tmp_path / "root", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("XRIGHT_PL_RUN_VERSION", None)
    procs = {}
    for lam in ("0.3", "0.7"):
        args = ["fit", "--config", "configs/demo.yaml", "--trainer.default_root_dir", str(root), "--model.lam", lam,
                "--summary.print_table", "false", *SMALL]  # fmt: skip
        procs[lam] = subprocess.Popen(
            [sys.executable, "-c", _RACER, str(go), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    go.touch()
    results = {}
    for lam, p in procs.items():
        _, err = p.communicate(timeout=1800)  # reads both pipes: a chatty child never blocks on a full pipe
        results[lam] = (p.returncode, err)
    finished = [lam for lam, (rc, _) in results.items() if rc == 0]
    for rc, err in results.values():
        assert rc in (0, 2), err[-3000:]
        if rc == 2:
            assert "is in use by another run" in err and "Traceback" not in err, err[-3000:]
    assert finished, results
    folders = sorted((root / "lightning_logs").iterdir())
    assert len(folders) == len(finished)  # one folder per run that ran; none left by a refused one
    seen = set()
    for folder in folders:
        lam = yaml.safe_load((folder / "config.yaml").read_text())["model"]["lam"]
        assert yaml.safe_load((folder / "hparams.yaml").read_text())["lam"] == lam
        assert json.loads((folder / "summary.json").read_text())["lam"] == lam
        seen.add(lam)
    assert seen == {float(lam) for lam in finished}
