"""benchmarks/pareto.py: a tiny real run (one seed, one lam, 3 steps) and the table arithmetic."""

from __future__ import annotations

import csv
import json
import math

import pytest
from helpers import has_extra

from benchmarks.pareto import COLUMNS, add_increases, main, markdown

SETTINGS = [
    "--set",
    "data.sft.limit=64",
    "--set",
    "data.preference.limit=64",
    "--set",
    "trainer.limit_val_batches=1",
]


def test_pareto_smoke(tmp_path):
    out = tmp_path / "out"
    main(
        ["--out", str(out), "--seeds", "0", "--lams", "0.5", "--steps", "3"]
        + ["--methods", "sequential_dpo_sft", "maxright", *SETTINGS]
    )
    rows = list(csv.DictReader(open(out / "pareto.csv")))
    assert set(COLUMNS) <= set(rows[0]) and len(rows) == 2
    assert [r["method"] for r in rows] == ["sequential_dpo_sft", "maxright"]
    optimum = json.loads((out / "runs" / "seed0" / "optimum.json").read_text())
    sft_only = json.loads((out / "runs" / "seed0" / "sft_only" / "summary.json").read_text())
    assert optimum["f_sft_star"] == pytest.approx(sft_only["val/sft_loss"])
    for r in rows:
        assert int(r["steps"]) == 3 and int(r["steps_sft"]) + int(r["steps_dpo"]) == 3  # equal budgets
        assert float(r["lam"]) == 0.5 and r["seed"] == "0"
        sft_gap = float(r["sft_loss"]) - optimum["f_sft_star"]
        dpo_gap = float(r["dpo_loss"]) - optimum["f_dpo_star"]
        assert float(r["sft_gap"]) == pytest.approx(sft_gap) and float(r["dpo_gap"]) == pytest.approx(dpo_gap)
        assert float(r["ideal_distance"]) == pytest.approx(math.hypot(sft_gap, dpo_gap))
        assert float(r["step_time_s"]) > 0 and float(r["peak_memory_mb"]) > 0
    seq, maxr = rows
    # lam 0.5 of 3 steps, DPO first: round(0.5 * 3) = 2 DPO steps, then 1 SFT step.
    assert (int(seq["steps_dpo"]), int(seq["steps_sft"])) == (2, 1)
    assert float(seq["runtime_increase_pct"]) == 0.0 and float(seq["peak_memory_increase_pct"]) == 0.0
    expected = 100 * (float(maxr["step_time_s"]) / float(seq["step_time_s"]) - 1)
    assert float(maxr["runtime_increase_pct"]) == pytest.approx(expected)
    md = (out / "pareto.md").read_text()
    assert "| 0.5 | MAXRIGHT |" in md and "| 0.5 | Sequential (DPO→SFT) |" in md
    assert "- config: `configs/demo.yaml`;" in md  # relative to the repository: no path of this machine
    if has_extra("matplotlib"):
        assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the benchmarks extra is absent: the table without the picture
        assert not (out / "pareto.png").exists()
    assert (out / "optima.csv").is_file()


def _row(method, lam, seed, t, mem, dist):
    return {"method": method, "lam": lam, "seed": seed, "step_time_s": t, "peak_memory_mb": mem, "ideal_distance": dist}


def test_increases_are_against_the_mean_of_both_sequential_orders_of_the_same_seed_and_lam():
    """Seed 0, lam 0.5: Sequential runs take 10 s and 12 s -> base 11 s; Mix takes 16.5 s -> +50%."""
    rows = [
        _row("sequential_sft_dpo", 0.5, 0, 10.0, 100.0, 1.0),
        _row("sequential_dpo_sft", 0.5, 0, 12.0, 100.0, 1.0),
        _row("mix", 0.5, 0, 16.5, 130.0, 0.2),
        _row("mix", 0.5, 1, 16.5, 130.0, 0.4),  # no Sequential at seed 1: no increase
    ]
    add_increases(rows)
    assert rows[2]["runtime_increase_pct"] == pytest.approx(50.0)
    assert rows[2]["peak_memory_increase_pct"] == pytest.approx(30.0)
    assert rows[0]["runtime_increase_pct"] == pytest.approx(100 * (10 / 11 - 1))
    assert rows[3]["runtime_increase_pct"] is None
    for r in rows:
        r.update(sft_loss=1.0, dpo_loss=1.0, sft_gap=0.0, dpo_gap=0.0)
    meta = {"config": "c.yaml", "steps": 3, "seeds": [0, 1], "lams": [0.5], "settings": [], "benchmark_time_s": 1}
    md = markdown(rows, [], {**meta, "machine": "test"}, ["mix"], [0.5])
    # mean and sample std of the ideal distance over the two Mix seeds: 0.3 +- 0.141
    assert "| 0.5 | Mix | 2 | 1.000 ± 0.000 | 1.000 ± 0.000 | 0.000 ± 0.000 | 0.000 ± 0.000 | 0.300 ± 0.141 |" in md


def test_maxright_study_run_lengths():
    from benchmarks.maxright_study import run_lengths

    assert run_lengths("ssddsdddss", "d") == [2, 3]
    assert run_lengths("ssddsdddss", "s") == [2, 1, 2]
    assert run_lengths("ssss", "d") == []
