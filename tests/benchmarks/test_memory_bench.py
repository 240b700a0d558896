"""benchmarks/memory.py: its tiny path writes memory.csv with the issue's columns, one fresh process per row, and
the ratios are computed from the rows."""

from __future__ import annotations

import csv
import importlib.util
import sys

from helpers import REPO, has_extra

TINY_BODY = (
    '{"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}'
)


def _memory():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("memory_bench", REPO / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_tiny_run_writes_the_csv(tmp_path):
    """xright_pl (fused), plain (and TRL where installed) on DPO and SFT steps of a tiny body at the real vocabulary
    49,152: one row each (each a fresh process), every column filled, the tokens and shapes of the run."""
    memory = _memory()
    systems = ["xright_pl", "plain"] + (["trl"] if has_extra("trl") else [])
    args = ["--quick", "--out", str(tmp_path), "--vocabs", "49152", "--pairs", "1", "--seq-len", "16"]
    table = memory.main([*args, "--systems", ",".join(systems), "--model-config", TINY_BODY])
    with (tmp_path / "memory.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == memory.CSV_FIELDS
    assert {"system", "step", "vocab", "tokens", "peak_memory_mb", "step_ms", "device"} <= set(memory.CSV_FIELDS)
    assert sorted((r["system"], r["step"]) for r in rows) == sorted((s, k) for s in systems for k in ("dpo", "sft"))
    assert len(table) == len(rows)
    for r in rows:
        assert (r["vocab"], r["layers"], r["tokens"], r["device"]) == ("49152", "2", "32", "cpu")
        assert float(r["peak_memory_mb"]) > 100 and float(r["step_ms"]) > 0  # a torch process holds > 100 MiB
    text = (tmp_path / "memory.md").read_text()
    assert text.startswith("| system | step | V |") and ("dpo V=49152 L=2 memory xright_pl/trl" in text) == (
        "trl" in systems
    )


def test_ratios_from_rows():
    memory = _memory()
    row = {"step": "dpo", "vocab": 8, "layers": 2, "tokens": 4, "device": "cpu"}
    table = [
        {**row, "system": "xright_pl", "peak_memory_mb": 50.0, "step_ms": 9.0},
        {**row, "system": "trl", "peak_memory_mb": 100.0, "step_ms": 10.0},
        {**row, "system": "xright_pl_unfused", "peak_memory_mb": 80.0, "step_ms": 12.0},
    ]
    assert memory.ratios(table) == {
        "dpo V=8 L=2 memory xright_pl/trl": 0.5,
        "dpo V=8 L=2 time xright_pl/trl": 0.9,
        "dpo V=8 L=2 memory xright_pl/unfused": 0.625,
        "dpo V=8 L=2 time xright_pl/unfused": 0.75,
    }
