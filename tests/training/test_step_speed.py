"""Cached reference log-probs, length-grouped batches, and a smoke run of benchmarks/step_speed.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys

import pytest
import torch
from helpers import REPO, demo_data, need_extra, tiny_module, trainer

from xright_pl import Sequential, Single
from xright_pl.core.errors import ConfigError
from xright_pl.data.collate import collate_preference
from xright_pl.data.module import REF_COLUMNS
from xright_pl.data.streams import BatchStream, length_grouped_order, row_lengths
from xright_pl.objectives.losses import sequence_logps


class RecSingle(Single):
    """Single objective, recording the pre-update loss of every step."""

    def __init__(self, objective):
        super().__init__(objective)
        self.losses = []

    def observe(self, step, decision, losses):
        self.losses.append(float(losses[self.objective]))


def _fit(tmp_path, precompute, steps, selector=None, ckpt_path=None, **trainer_kwargs):
    selector = selector or RecSingle("dpo")
    module = tiny_module(selector, precompute_reference_logps=precompute)
    data = demo_data(limit=48)
    t = trainer(tmp_path, steps, **trainer_kwargs)
    t.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, data, t, selector


def test_cached_and_recomputed_dpo_losses_equal(tmp_path):
    steps = 5
    m_ref, _, t_ref, rec = _fit(tmp_path / "a", False, steps)
    m_cache, data, t_cache, cached = _fit(tmp_path / "b", True, steps)
    assert len(rec.losses) == len(cached.losses) == steps
    assert rec.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert cached.losses == pytest.approx(rec.losses, abs=1e-5)
    assert t_cache.callback_metrics["val/dpo_loss"].item() == pytest.approx(
        t_ref.callback_metrics["val/dpo_loss"].item(), abs=1e-5
    )
    for (name, p), q in zip(m_ref.policy.named_parameters(), m_cache.policy.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_cache_holds_reference_logps_and_reference_is_freed(tmp_path):
    module, data, _, _ = _fit(tmp_path, True, 1)
    assert module.reference is None and module.reference_released
    assert not any(name.startswith("reference.") for name in module.state_dict())
    n_policy = sum(p.numel() for p in module.policy.parameters())
    assert sum(p.numel() for p in module.parameters()) == n_policy
    # The cached columns equal s_ref from a fresh copy of the initial policy, on train and val rows.
    fresh = tiny_module(Single("dpo"))
    fresh.configure_model()
    for split, ds in (("train", data.train_sets["dpo"]), ("val", data.val_sets["dpo"])):
        assert set(REF_COLUMNS) <= set(ds.column_names), split
        rows = [ds[i] for i in range(6)]
        batch = collate_preference(rows, pad_id=data.pad_id)
        assert batch.ref_logps is not None
        with torch.no_grad():
            logits = fresh.reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        expected = sequence_logps(logits, batch.labels).logps
        torch.testing.assert_close(batch.ref_logps, expected, atol=1e-5, rtol=1e-5)
        assert all(v < 0 for v in ds["ref_chosen_logps"]), split


def test_resume_recomputes_cache_and_continues_exactly(tmp_path):
    full_module, _, _, full = _fit(tmp_path / "full", True, 6)
    _, _, t1, first = _fit(tmp_path / "a", True, 3)
    ckpt = tmp_path / "a.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("reference.") for k in saved["state_dict"])
    assert "ref_chosen_logps" not in str(saved.get("datamodule_hyper_parameters", ""))
    resumed_module, data, t2, second = _fit(tmp_path / "b", True, 6, ckpt_path=str(ckpt))
    assert t2.global_step == 6
    assert resumed_module.reference is None
    assert set(REF_COLUMNS) <= set(data.train_sets["dpo"].column_names)
    assert first.losses + second.losses == pytest.approx(full.losses, abs=1e-5)
    for p, q in zip(full_module.policy.parameters(), resumed_module.policy.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_cache_refused_with_stage_start_reference(tmp_path):
    sel = Sequential(first="sft", switch_step=2, reference="stage_start")
    with pytest.raises(ConfigError, match="stage_start"):
        _fit(tmp_path, True, 3, selector=sel)
    # With the fixed (initial) reference the cache is allowed and both stages run.
    module, data, _, _ = _fit(tmp_path / "ok", True, 4, selector=Sequential(first="sft", switch_step=2))
    assert module.steps == {"sft": 2, "dpo": 2} and module.reference is None


# ----------------------------------------------------------------------------------- length grouping
def _lengths(n=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 500, (n,), generator=g).tolist()


def test_length_grouped_order_is_a_seeded_permutation_of_sorted_batches():
    lengths, gb, group = _lengths(), 4, 5
    order = length_grouped_order(lengths, gb, group, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(len(lengths)))
    assert order == length_grouped_order(lengths, gb, group, torch.Generator().manual_seed(1))
    assert order != length_grouped_order(lengths, gb, group, torch.Generator().manual_seed(2))
    batches = [order[i : i + gb] for i in range(0, len(order), gb)]
    assert len(batches[-1]) == len(lengths) % gb  # the partial batch stays last
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    for b in batches:  # each batch is a slice of a length-sorted mega-batch
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)

    def padding(o):
        return sum(gb * max(lengths[i] for i in o[j : j + gb]) for j in range(0, len(o), gb))

    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(order) < 0.8 * padding(random_order)


def test_grouped_stream_resumes_mid_epoch():
    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in _lengths(60, seed=3)]
    lengths = row_lengths(rows, ("input_ids",))
    assert lengths == [len(r["input_ids"]) for r in rows]

    def stream():
        return BatchStream(
            "sft",
            rows,
            4,
            lambda b: [len(r["input_ids"]) for r in b],
            seed=7,
            order_fn=lambda epoch, g: length_grouped_order(lengths, 4, 3, g),
        )

    a = stream()
    seen = []
    for _ in range(20):  # more than one epoch (15 batches)
        seen.append(a.peek())
        a.consume(4)
    b = stream()
    for _ in range(6):
        b.peek()
        b.consume(4)
    c = stream()
    c.restore(b.state())
    rest = []
    for _ in range(14):
        rest.append(c.peek())
        c.consume(4)
    assert seen[6:] == rest
    assert seen[15:20] != seen[0:5]  # the next epoch is grouped anew


def test_group_by_length_trains_and_consumes_every_row(tmp_path):
    module = tiny_module(Single("sft"))
    data = demo_data(limit=40, sft_bs=4, group_by_length=True, length_group_batches=3)
    t = trainer(tmp_path, 10)
    t.fit(module, datamodule=data)
    assert data.consumed_examples()["sft"] == 40
    order = data.streams["sft"]._order(0)
    assert sorted(order) == list(range(len(data.train_sets["sft"])))


# ----------------------------------------------------------------------------------- benchmark smoke
def _bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("step_speed", REPO / "benchmarks" / "step_speed.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "step_speed", bench)
    spec.loader.exec_module(bench)
    return bench


def test_step_speed_smoke(tmp_path, monkeypatch):
    bench = _bench(monkeypatch)
    args = ["--quick", "--out", str(tmp_path), "--no-trl", "--no-runs", "--only", "dpo,dpo_cached"]
    table = bench.main([*args, "--pairs", "1", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--repeats", "1"])
    with (tmp_path / "step_speed.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{k: str(v) for k, v in r.items()} for r in table]
    assert list(rows[0]) == list(bench.CSV_FIELDS)
    got = {(r["system"], r["step"]) for r in rows}
    assert got == {(s, k) for s in ("plain", "xright_pl") for k in ("dpo", "dpo_cached")} | {
        ("plain", "dpo_fp32_log_softmax")
    }
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["step_ms"]) > 0 and r["device"] == "cpu"
    ratios = json.loads((tmp_path / "ratios.json").read_text())["ratios"]
    assert ratios["xright dpo recomputed/cached time"] > 0 and ratios["xright/plain dpo time"] > 0


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
    return ["--real-model", str(model_folder), *data, *sizes, "--out", str(out), *extra]


def test_step_speed_real_model(tmp_path, monkeypatch, model_folder):
    bench = _bench(monkeypatch)
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
    setup = bench.RealSetup(**{k: v for k, v in info["setup"].items()})
    _, pool, _ = bench._real_pool(setup)
    _, best, _ = bench.real_rows(setup, best=True)
    length = lambda r: max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))  # noqa: E731
    assert len(best) == setup.rows == 6 and len(pool) == 40
    assert max(map(length, best[:2])) == max(map(length, pool))
    for i in range(0, 6, 2):
        assert length(best[i]) >= length(best[i + 1])


def test_step_speed_real_model_trl(tmp_path, monkeypatch, model_folder):
    """TRL trains exactly the batches of the other systems at each settings (same real tokens, same padding)."""
    need_extra("trl")
    bench = _bench(monkeypatch)
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
