"""benchmarks/run_speed.py: tiny whole runs of every selector write run_speed.csv and run_ratios.json."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import load_benchmark

#: The columns of step_speed.csv and run_speed.csv.
COLUMNS = ["system", "step", "tokens_per_s", "step_ms", "peak_memory_mb", "device"]


def test_run_speed_smoke(tmp_path, monkeypatch):
    bench = load_benchmark("run_speed", monkeypatch)
    sizes = ["--pairs", "1", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--repeats", "1", "--run-steps", "4"]
    table = bench.main(["--quick", "--out", str(tmp_path), *sizes])
    with (tmp_path / "run_speed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{k: str(v) for k, v in r.items()} for r in table]
    assert list(rows[0]) == COLUMNS
    assert [(r["system"], r["step"]) for r in rows] == [("xright_pl", k) for k in bench.STEP_ROWS + bench.RUN_ROWS]
    for r in rows:  # 1 pair x 16 tokens: 32 tokens a step, both objectives' in a Mix step
        tokens = 64 if r["step"] == "run_mix" else 32
        assert float(r["tokens_per_s"]) == pytest.approx(tokens * 1000 / float(r["step_ms"]), rel=0.01)
        assert r["device"] == "cpu"
    info = json.loads((tmp_path / "run_ratios.json").read_text())
    assert info["setup"]["run_steps"] == 4
    ratios = info["ratios"]
    for name in ("alright", "maxright_k10"):
        assert ratios[f"{name}/sequential wall"] > 0 and ratios[f"{name}/sequential wall, same branch mix"] > 0
    assert ratios["branches"]["run_sequential"] == {"sft": 2, "dpo": 2}
    assert sum(ratios["branches"]["run_alright"].values()) == 4


def test_run_speed_refuses_unknown_runs(monkeypatch, capsys):
    bench = load_benchmark("run_speed", monkeypatch)
    with pytest.raises(SystemExit):
        bench.main(["--only", "run_sequential,dpo"])
    assert "unknown runs ['dpo']" in capsys.readouterr().err
