"""More than two objectives: named data sets, each with its objective and weight, through the real CLI."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TERSE_TEMPLATE, three_datasets, tiny_module, trainer

from xright_pl import Batching, JointDataModule, Mix, PreferenceData, Sequential, SFTData
from xright_pl.commands.cli import main, run
from xright_pl.data.module import REF_COLUMNS, DataSet

CONFIG = REPO / "configs" / "demo" / "three_objectives.yaml"
WEIGHTS = {"terse": 0.3, "polite": 0.2, "prefs": 0.5}


def _summary(root: Path) -> dict:
    return json.loads(sorted(root.rglob("summary.json"))[-1].read_text())


def _fit(root: Path, *args: str) -> dict:
    run(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar",
         "false", "--trainer.limit_val_batches", "1", *args])  # fmt: skip
    return _summary(root)


def test_three_objectives_each_get_their_share_of_steps(tmp_path):
    """ALRIGHT over 200 steps: data set k trains Binomial(200, lambda_k) steps; accept +- 4 sd. Each step of a data
    set consumes one batch of it (16 rows, 16 rows, 8 pairs), and every data set is validated."""
    n = 200
    s = _fit(tmp_path, "--trainer.max_steps", str(n), "--trainer.val_check_interval", str(n))
    assert s["optimizer_steps"] == n and s["weights"] == WEIGHTS and s["lam"] is None
    assert sum(s[f"steps/{k}"] for k in WEIGHTS) == n
    for k, w in WEIGHTS.items():
        assert abs(s[f"steps/{k}"] - n * w) <= 4 * math.sqrt(n * w * (1 - w)), (k, s[f"steps/{k}"])
    assert (s["examples/terse"], s["examples/polite"], s["examples/prefs"]) == (
        16 * s["steps/terse"], 16 * s["steps/polite"], 8 * s["steps/prefs"]
    )  # fmt: skip
    for key in ("val/terse_loss", "val/polite_loss", "val/prefs_loss", "val/prefs_rewards_accuracies"):
        assert math.isfinite(s[key]), key
    assert "val/sft_loss" not in s and "steps/sft" not in s


def test_three_objectives_resume_exactly(tmp_path):
    """A K-objective run stopped at step 20 and resumed to 40 ends with the uninterrupted run's weights."""
    steps = ["--trainer.val_check_interval", "20"]
    whole = _fit(tmp_path / "whole", "--trainer.max_steps", "40", *steps)
    _fit(tmp_path / "split", "--trainer.max_steps", "20", *steps)
    resumed = _fit(tmp_path / "split", "--trainer.max_steps", "40", *steps, "--ckpt_path", "last")
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert {k: resumed[f"steps/{k}"] for k in WEIGHTS} == {k: whole[f"steps/{k}"] for k in WEIGHTS}


def test_maxright_with_f_star_logs_the_gaps_over_three_objectives(tmp_path):
    stars = "{terse: 0.5, polite: 0.1, prefs: 0.2}"
    s = _fit(tmp_path, "--trainer.max_steps", "12", "--trainer.val_check_interval", "12",
             "--model.selector", "xright_pl.Maxright", "--model.selector.init_args.f_star", stars,
             "--model.selector.init_args.eval_every", "1")  # fmt: skip
    gaps = {k: s[f"val/{k}_loss"] - v for k, v in {"terse": 0.5, "polite": 0.1, "prefs": 0.2}.items()}
    for k, g in gaps.items():
        assert s[f"val/{k}_gap"] == pytest.approx(g, abs=1e-5)
    assert s["val/ideal_distance"] == pytest.approx(math.sqrt(sum(g * g for g in gaps.values())), abs=1e-5)
    assert s["f_star"] == {"terse": 0.5, "polite": 0.1, "prefs": 0.2}


def test_mix_and_sequential_stages_in_python(tmp_path):
    """In Python: Mix trains every data set every step; Sequential's stages follow the weights (0.5, 0.3, 0.2 of 10
    steps: prefs 5, terse 3, polite 2)."""
    module = tiny_module(Mix())
    t = trainer(tmp_path / "mix", 3)
    t.fit(module, datamodule=three_datasets())
    assert module.steps == {"terse": 3, "polite": 3, "prefs": 3}
    module = tiny_module(Sequential(stages=["prefs", "terse", "polite"]))
    t = trainer(tmp_path / "seq", 10)
    t.fit(module, datamodule=three_datasets())
    assert module.steps == {"terse": 3, "polite": 2, "prefs": 5}


def test_polite_rows_train_on_the_chosen_answer():
    dm = three_datasets(limit=4)
    dm.load()
    row = dm.train_sets["polite"][0]
    labels = [t for t in row["labels"] if t != -100]
    assert "glad i could help" in dm.tokenizer.decode(labels)


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ("[{name: a, weight: 0.5, sft: {path: builtin:demo/sft_train.jsonl}}]", "at least 2 data sets"),
        ("[{name: a, weight: 0.5, sft: {path: x.jsonl}}, {name: b, weight: 0.4, sft: {path: y.jsonl}}]",
         r"summing to 1, got \[0.5, 0.4\]"),
        ("[{name: a, weight: 0.5, sft: {path: x.jsonl}}, {name: a, weight: 0.5, preference: {path: y.jsonl}}]",
         "names used twice: a"),
        ("[{name: a, weight: 0.5}, {name: b, weight: 0.5, sft: {path: y.jsonl}}]", "a: give exactly one of sft"),
    ],
)  # fmt: skip
def test_bad_datasets_are_refused_with_every_problem(tmp_path, capsys, datasets, message):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), "--data.datasets", datasets])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Invalid data.datasets" in err and "Traceback" not in err
    assert re.search(message, err), err


def test_trajectory_of_two_chosen_data_sets(tmp_path):
    """``--trajectory.axes [terse, prefs]``: the start point and every validation in that plane; the last point is
    the final validation's (val/terse_loss, val/prefs_loss); at the start the preference loss is ln 2 (policy =
    reference)."""
    s = _fit(tmp_path, "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
             "--trajectory.axes", "[terse, prefs]")  # fmt: skip
    points = s["trajectory"]
    assert [p[0] for p in points] == [0, 10, 20]
    assert points[0][2] == pytest.approx(math.log(2), abs=1e-6)
    assert points[-1][1:] == pytest.approx([s["val/terse_loss"], s["val/prefs_loss"]], abs=1e-6)


# ------------------------------------------------------------------------------------- refusals and extensions
def test_resuming_with_other_objectives_is_refused(tmp_path, capsys):
    """A checkpoint of the SFT/DPO pair resumed with three data sets: one clear error, before any step."""
    from xright_pl.commands.cli import main

    root = tmp_path / "run"
    pair = REPO / "configs" / "demo" / "alright.yaml"
    run(["fit", "--config", str(pair), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
         "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"])  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "8",
              "--ckpt_path", "last"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "trained on the objectives sft, dpo; this run has terse, polite, prefs" in err and "Traceback" not in err


def test_misspelled_single_objective_is_refused_before_the_model_is_built(tmp_path, capsys):
    from xright_pl.commands.cli import main

    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIG), "--trainer.default_root_dir", str(tmp_path),
              "--model.selector", "xright_pl.Single", "--model.selector.init_args.objective", "prefz"])  # fmt: skip
    assert e.value.code == 2
    assert "Single(objective='prefz'): the run has no such objective; it has terse, polite, prefs" in (
        capsys.readouterr().err
    )


def test_a_registered_objective_kind_is_chosen_by_config(tmp_path):
    """``DataSet(objective=<kind>)`` builds the data set's objective from the registry; a kind whose batches do not
    match the data is refused."""
    from test_objectives import ResponseLengthSFT

    from xright_pl.objectives.plugins import OBJECTIVE_KINDS, register_objective

    register_objective(ResponseLengthSFT)
    try:
        dm = three_datasets()
        dm.datasets[0].objective = "test_sum_sft"
        module = tiny_module(Mix())
        t = trainer(tmp_path / "ok", 2)
        t.fit(module, datamodule=dm)
        assert type(module.objectives["terse"]) is ResponseLengthSFT and module.objectives["terse"].calls >= 2
        assert module.objectives["polite"].kind == "sft" and module.objectives["prefs"].kind == "preference"
        bad = three_datasets()
        bad.datasets[2].objective = "test_sum_sft"  # SFT batches wanted, preference pairs given
        from xright_pl.core.errors import ConfigError

        with pytest.raises(ConfigError, match="'prefs': objective kind 'test_sum_sft' trains on SFTBatch"):
            trainer(tmp_path / "bad", 2).fit(tiny_module(Mix()), datamodule=bad)
    finally:
        del OBJECTIVE_KINDS["test_sum_sft"]


def test_maxright_and_sequential_refuse_what_does_not_fit_three_objectives():
    from xright_pl import Maxright
    from xright_pl.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no optimum for prefs"):
        Maxright(f_star={"terse": 0.5, "polite": 0.1}).bind(WEIGHTS)
    with pytest.raises(ConfigError, match="no optimum for terse, polite, prefs: it was given f_sft_star"):
        Maxright(f_sft_star=1.0, f_dpo_star=0.5).bind(WEIGHTS)
    Maxright(f_sft_star=1.0, f_dpo_star=0.5).bind(0.5)  # the pair's optima for the pair: fine
    with pytest.raises(ConfigError, match="give their order.*stages '\\[terse, polite, prefs\\]'"):
        Sequential().bind(WEIGHTS)


class RecMix(Mix):
    """Mix, recording every step's pre-update losses by objective."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def observe(self, step, decision, losses):
        self.losses.append({k: float(v) for k, v in losses.items()})


def two_preference_sets() -> JointDataModule:
    """K = 3 with two preference data sets: terse (SFT), prefs (24 pairs, 2 per batch) and prefs_b (the first 16
    pairs, 4 per batch): every preference set needs its own cache, of its own length."""
    sft = {"path": "builtin:demo/sft_train.jsonl", "eval_path": "builtin:demo/sft_eval.jsonl"}
    pref = {"path": "builtin:demo/pref_train.jsonl", "eval_path": "builtin:demo/pref_eval.jsonl"}
    common = {"max_length": 64, "limit": 24}
    return JointDataModule(
        datasets=[
            DataSet("terse", 0.4, sft=SFTData(**sft, prompt_template=TERSE_TEMPLATE, **common)),
            DataSet("prefs", 0.3, preference=PreferenceData(**pref, **common), batch_size=2),
            DataSet("prefs_b", 0.3, preference=PreferenceData(**pref, max_length=64, limit=16), batch_size=4),
        ],
        batching=Batching(sft_batch_size=4, eval_batch_size=32),
    )


def test_cached_reference_of_every_preference_data_set(tmp_path):
    """precompute_reference_logps at K = 3: both preference data sets (train and val) get the cached columns and the
    reference is released; the losses of every step and of the validation equal those of the live reference."""
    runs = {}
    for precompute in (False, True):
        sel, data = RecMix(), two_preference_sets()
        module = tiny_module(sel, precompute_reference_logps=precompute)
        t = trainer(tmp_path / str(precompute), 4)
        t.fit(module, datamodule=data)
        runs[precompute] = (sel.losses, {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("val/")})
        if precompute:
            assert module.reference is None and module.reference_released
            for split in (data.train_sets, data.val_sets):
                for name in ("prefs", "prefs_b"):
                    assert set(REF_COLUMNS) <= set(split[name].column_names), name
                assert not set(REF_COLUMNS) & set(split["terse"].column_names)
    (live, live_val), (cached, cached_val) = runs[False], runs[True]
    assert len(live) == len(cached) == 4 and set(live[0]) == {"terse", "prefs", "prefs_b"}
    assert live[0]["prefs"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    for a, b in zip(live, cached):
        assert b == pytest.approx(a, abs=1e-5)
    assert {"val/prefs_loss", "val/prefs_b_loss"} <= set(live_val)
    assert cached_val == pytest.approx(live_val, abs=1e-5)


def test_three_objectives_under_ddp_through_the_cli(tmp_path):
    """K = 3 under DDP on 2 CPU processes, through ``python -m xright_pl fit``: it exits cleanly and rank 0 writes
    one summary counting every optimizer step once. (Rank agreement and identical weights under DDP are
    tests/training/test_ddp.py's; this is the K-objective CLI path end to end.)"""
    root = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xright_pl",
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
            "--trainer.max_steps",
            "8",
            "--trainer.val_check_interval",
            "8",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(root),
        ],  # fmt: skip
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=1800,  # generous: the machine may be heavily loaded; nothing here depends on timing
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(root.rglob("summary.json"))
    assert len(summaries) == 1, summaries
    s = json.loads(summaries[0].read_text())
    assert s["optimizer_steps"] == 8 and s["weights"] == WEIGHTS
    assert sum(s[f"steps/{k}"] for k in WEIGHTS) == 8
    for key in ("val/terse_loss", "val/polite_loss", "val/prefs_loss"):
        assert math.isfinite(s[key]), key
