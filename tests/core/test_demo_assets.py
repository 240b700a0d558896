"""The embedded demo assets (`xright_pl/assets/demo`) are up to date, consistent and conflict as designed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from xright_pl.core import demo
from xright_pl.core.assets import resolve

DEMO_DIR = Path(resolve("builtin:demo"))
SFT_FIELDS = {"instruction", "input", "output"}
PREF_FIELDS = {"prompt", "chosen", "rejected"}


def _read(name: str) -> list[dict]:
    with open(DEMO_DIR / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {name: _read(name) for name in demo.DATA_FILES}


@pytest.fixture(scope="module")
def tok():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve("builtin:demo/tokenizer"), local_files_only=True)


def _sft_question(r: dict) -> str:
    return f"{r['instruction']} {r['input']}" if r["input"] else r["instruction"]


def _pref_question(r: dict) -> str:
    p = r["prompt"]
    assert p.startswith("Human: ") and p.endswith(" Assistant:"), p
    return p[len("Human: ") : -len(" Assistant:")]


def test_regenerated_assets_are_identical(tmp_path):
    out = demo.write_assets(tmp_path / "demo")
    for name in demo.DATA_FILES:
        assert (out / f"{name}.jsonl").read_bytes() == (DEMO_DIR / f"{name}.jsonl").read_bytes(), name
    assert (out / "README.md").read_bytes() == (DEMO_DIR / "README.md").read_bytes()
    new = json.loads((out / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    old = json.loads((DEMO_DIR / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    assert new["model"]["vocab"] == old["model"]["vocab"]
    assert new["model"]["type"] == old["model"]["type"] == "WordLevel"


def test_vocab_is_closed_and_stable():
    vocab = demo.demo_vocab()
    assert vocab[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert len(set(vocab)) == len(vocab) == demo.demo_vocab_len()
    assert demo.DEMO_VOCAB_SIZE % 8 == 0 and 0 <= demo.DEMO_VOCAB_SIZE - len(vocab) < 8
    assert demo.DEMO_VOCAB_SIZE == 144  # the number the demo model config uses


def test_tokenizer_loads_offline(tok):
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.bos_token == "<bos>"
    assert tok.unk_token == "<unk>" and tok.pad_token_id == 0 and tok.bos_token_id == 2
    assert tok.eos_token_id == 3 and tok.padding_side == "right"
    assert len(tok) == demo.demo_vocab_len() <= demo.DEMO_VOCAB_SIZE
    assert tok("what color").input_ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in tok("what color is the zorp ?").input_ids
    # same ids whether or not the response is glued to "Assistant:"
    p = "Human: add 3 and 4 . Assistant:"
    assert tok(p + "7 .").input_ids == tok(p + " 7 .").input_ids
    text = tok.apply_chat_template(
        [{"role": "user", "content": "add 3 and 4 ."}, {"role": "assistant", "content": "7 ."}],
        tokenize=False,
    )
    assert text == "<bos>Human: add 3 and 4 . Assistant: 7 . <eos>"
    gen = tok.apply_chat_template(
        [{"role": "user", "content": "add 3 and 4 ."}], tokenize=False, add_generation_prompt=True
    )
    assert gen == "<bos>" + p
    # the Alpaca header words are in the vocabulary
    assert tok.unk_token_id not in tok(demo.ALPACA_HEADER).input_ids


def test_fields_and_sizes(rows):
    assert len(rows["sft_train"]) == len(rows["pref_train"]) == demo.N_TRAIN
    assert len(rows["sft_eval"]) == len(rows["pref_eval"]) == demo.N_EVAL
    for name in ("sft_train", "sft_eval"):
        for r in rows[name]:
            assert set(r) == SFT_FIELDS and all(isinstance(v, str) for v in r.values())
            assert r["instruction"] and r["output"]
        assert 0.1 < sum(bool(r["input"]) for r in rows[name]) / len(rows[name]) < 0.5
    for name in ("pref_train", "pref_eval"):
        for r in rows[name]:
            assert set(r) == PREF_FIELDS and all(isinstance(v, str) and v for v in r.values())
            assert r["chosen"] != r["rejected"]


def test_roundtrip_and_lengths(rows, tok):
    max_len = 0
    for name, rs in rows.items():
        for r in rs:
            if name.startswith("sft"):
                texts = [r["instruction"], r["output"]] + ([r["input"]] if r["input"] else [])
                full = [demo.format_prompt(_sft_question(r)) + " " + r["output"]]
            else:
                texts = [r["prompt"], r["chosen"], r["rejected"]]
                full = [r["prompt"] + " " + r["chosen"], r["prompt"] + " " + r["rejected"]]
            for t in texts + full:
                ids = tok(t, add_special_tokens=False).input_ids
                assert tok.unk_token_id not in ids, t
                assert tok.decode(ids) == t
            for t in full:
                max_len = max(max_len, len(tok(t).input_ids) + 1)  # + <eos>
    assert max_len <= demo.MAX_DEMO_TOKENS


def test_train_eval_prompts_disjoint(rows):
    train = {_sft_question(r) for r in rows["sft_train"]} | {_pref_question(r) for r in rows["pref_train"]}
    evals = {_sft_question(r) for r in rows["sft_eval"]} | {_pref_question(r) for r in rows["pref_eval"]}
    assert not train & evals
    # every eval fact is taught in training under another phrasing
    key = demo.answer_key()
    assert evals <= set(key) and train <= set(key)


def _core(response: str) -> str:
    """The style-B sentence without opener and polite tail."""
    return response.removeprefix(demo.POLITE_OPENER + " ").split(" ,")[0]


def test_style_conflict(rows):
    key = demo.answer_key()
    sentence = {q.text: q.sentence for qs in demo.all_questions() for q in qs}
    demo_wrong = {q.text: q.wrong_sentences for qs in demo.all_questions() for q in qs}
    for name in ("sft_train", "sft_eval"):
        for r in rows[name]:
            assert demo.response_style(r["output"]) == "A"
            assert r["output"] == key[_sft_question(r)] + " ."
    for name in ("pref_train", "pref_eval"):
        rs = rows[name]
        chosen_b = sum(demo.response_style(r["chosen"]) == "B" for r in rs) / len(rs)
        rejected_a = sum(demo.response_style(r["rejected"]) == "A" for r in rs) / len(rs)
        assert chosen_b >= 0.95, chosen_b
        assert 0.6 <= rejected_a <= 0.8, rejected_a  # DPO pushes away from the SFT style here
        for r in rs:
            answer = key[_pref_question(r)]
            assert _core(r["chosen"]) == sentence[_pref_question(r)]  # chosen is correct
            if demo.response_style(r["rejected"]) == "A":
                assert r["rejected"] == answer + " ."  # same fact, SFT style
            else:
                assert demo.response_style(r["rejected"]) == "B"
                assert _core(r["rejected"]) in demo_wrong[_pref_question(r)]  # polite but wrong


def test_assets_are_small():
    total = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert total < 2_000_000
