"""benchmarks/real_step_speed.py on a tiny random model saved with the demo tokenizer and the demo rows: equal
settings train the same batches for every system, best settings length-grouped batches of the pool."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import load_benchmark, need_extra


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random Llama saved with the demo tokenizer (which has a chat template): a stand-in for a real model."""
    from helpers import TINY_LLAMA

    from xright_pl.data.encoding import load_tokenizer
    from xright_pl.models.build import build_causal_lm

    folder = tmp_path_factory.mktemp("real") / "model"
    build_causal_lm(None, TINY_LLAMA, seed=0).save_pretrained(folder)
    load_tokenizer("builtin:demo/tokenizer").save_pretrained(folder)
    return folder


def _real_args(model_folder, out, *extra):
    data = ["--real-data", "builtin:demo/pref_train.jsonl", "--real-sft-data", "builtin:demo/sft_train.jsonl"]
    sizes = ["--pairs", "2", "--seq-len", "48", "--steps", "2", "--warmup", "1", "--repeats", "1", "--pool", "40"]
    return [str(model_folder), *data, *sizes, "--out", str(out), *extra]


def test_real_step_speed(tmp_path, monkeypatch, model_folder):
    bench = load_benchmark("real_step_speed", monkeypatch)
    table = bench.main(_real_args(model_folder, tmp_path, "--no-trl"))
    with (tmp_path / "step_speed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{k: str(v) for k, v in r.items()} for r in table]
    assert list(rows[0]) == list(bench.REAL_CSV_FIELDS)
    equal = {("equal", s, k) for s in ("plain", "xright_pl") for k in ("dpo", "dpo_cached", "sft")}
    assert {(r["settings"], r["system"], r["step"]) for r in table} == equal | {
        ("best", "xright_pl", k) for k in ("dpo_cached", "sft")
    }
    by = {(r["settings"], r["system"], r["step"]): r for r in table}
    for step in ("dpo", "dpo_cached", "sft"):  # equal settings: the same batches, in the same order
        plain, xright = by[("equal", "plain", step)], by[("equal", "xright_pl", step)]
        assert plain["real_tokens"] == xright["real_tokens"] > 0
        assert plain["padded_positions"] == xright["padded_positions"]
        assert xright["vs_plain"] == pytest.approx(plain["real_tokens_per_s"] / xright["real_tokens_per_s"], rel=1e-3)
    for r in table:
        assert r["real_tokens_per_s"] > 0 and r["step_ms"] > 0 and 0 <= r["padding_share"] < 1
    info = json.loads((tmp_path / "ratios.json").read_text())
    assert info["targets"] == {f"equal: xright_pl/plain {k} time": ["<=", 1.05] for k in ("dpo", "dpo_cached", "sft")}
    assert set(info["ratios"]) == set(info["targets"])
    for shares in info["grouping_padding"].values():
        assert shares["xright_pl"] <= shares["random"] and shares["transformers"] <= shares["random"]

    # Best settings train length-grouped batches of the pool: the longest pair first, each batch a slice of a
    # length-sorted mega-batch.
    import bench_setup  # on sys.path since the benchmark is loaded

    setup = bench_setup.RealSetup(**{k: v for k, v in info["setup"].items()})
    _, pool, _ = bench_setup.real_pool(setup)
    _, best, _ = bench_setup.real_rows(setup, best=True)
    length = lambda r: max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))  # noqa: E731
    assert len(best) == setup.rows == 6 and len(pool) == 40
    assert max(map(length, best[:2])) == max(map(length, pool))
    for i in range(0, 6, 2):
        assert length(best[i]) >= length(best[i + 1])


def test_real_step_speed_trl(tmp_path, monkeypatch, model_folder):
    """TRL trains exactly the batches of the other systems at each settings (same real tokens, same padding)."""
    need_extra("trl")
    bench = load_benchmark("real_step_speed", monkeypatch)
    table = bench.main(_real_args(model_folder, tmp_path, "--only", "dpo_cached,sft"))
    by = {(r["settings"], r["system"], r["step"]): r for r in table}
    assert set(by) == {("equal", s, k) for s in ("plain", "xright_pl", "trl") for k in ("dpo_cached", "sft")} | {
        ("best", s, k) for s in ("xright_pl", "trl") for k in ("dpo_cached", "sft")
    }
    for settings in ("equal", "best"):
        for step in ("dpo_cached", "sft"):
            trl, xright = by[(settings, "trl", step)], by[(settings, "xright_pl", step)]
            assert (trl["real_tokens"], trl["padded_positions"]) == (xright["real_tokens"], xright["padded_positions"])
            assert xright["vs_trl"] == pytest.approx(trl["real_tokens_per_s"] / xright["real_tokens_per_s"], rel=1e-3)
    ratios = json.loads((tmp_path / "ratios.json").read_text())["ratios"]
    assert {"best: xright_pl/trl dpo_cached time", "best: xright_pl/trl sft time"} <= set(ratios)
