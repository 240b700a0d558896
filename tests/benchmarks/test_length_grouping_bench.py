"""benchmarks/length_grouping.py: padding and DPO step speed of random vs length-grouped batches of one epoch."""

from __future__ import annotations

import json

from helpers import load_benchmark


def test_length_grouping_smoke(tmp_path, monkeypatch):
    bench = load_benchmark("length_grouping", monkeypatch)
    args = ["builtin:demo/pref_train.jsonl", "--tokenizer", "builtin:demo/tokenizer", "--out", str(tmp_path)]
    rows = bench.main([*args, "--pairs", "2", "--steps", "2", "--seq-len", "64"])
    info = json.loads((tmp_path / "length_grouping.json").read_text())
    assert info["rows"] == rows and info["pairs"] == 2
    random_, grouped = rows
    assert (random_["grouped"], grouped["grouped"]) == (False, True)
    assert random_["real_tokens"] == grouped["real_tokens"] > 0  # the same rows of one epoch, in another order
    assert grouped["padded_positions"] <= random_["padded_positions"]
    for r in rows:
        assert 0 <= r["padding_share"] < 1 and r["timed_batches"] == 2 and r["real_tokens_per_s"] > 0
