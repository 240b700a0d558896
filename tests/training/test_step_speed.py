"""Cached reference log-probs and length-grouped batches (the smoke runs of the speed benchmarks that measure them
are in tests/benchmarks/)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import demo_data, tiny_module, trainer

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
