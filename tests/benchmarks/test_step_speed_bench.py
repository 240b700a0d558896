"""benchmarks/step_speed.py: a tiny run of the synthetic step rows writes step_speed.csv and ratios.json; the
benchmarks that are scripts of their own (whole runs, a real model, length grouping) are not options of it."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import load_benchmark

#: The columns of step_speed.csv and run_speed.csv.
COLUMNS = ["system", "step", "tokens_per_s", "step_ms", "peak_memory_mb", "device"]

SIZES = ["--pairs", "1", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--repeats", "1"]


def test_step_speed_smoke(tmp_path, monkeypatch):
    bench = load_benchmark("step_speed", monkeypatch)
    table = bench.main(["--quick", "--out", str(tmp_path), "--no-trl", "--only", "dpo,dpo_cached", *SIZES])
    with (tmp_path / "step_speed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{k: str(v) for k, v in r.items()} for r in table]
    assert list(rows[0]) == COLUMNS
    got = {(r["system"], r["step"]) for r in rows}
    assert got == {(s, k) for s in ("plain", "xright_pl") for k in ("dpo", "dpo_cached")} | {
        ("plain", "dpo_fp32_log_softmax")
    }
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["step_ms"]) > 0 and r["device"] == "cpu"
    ratios = json.loads((tmp_path / "ratios.json").read_text())["ratios"]
    assert ratios["xright dpo recomputed/cached time"] > 0 and ratios["xright/plain dpo time"] > 0


@pytest.mark.parametrize("option", ["--no-runs", "--run-steps=2", "--real-model=DIR", "--length-grouping=PREF"])
def test_other_benchmarks_are_not_options(monkeypatch, capsys, option):
    bench = load_benchmark("step_speed", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        bench.main([option])
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
