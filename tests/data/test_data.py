"""Tests for xright_pl.data: loading, validation, tokenization, held-out splits and collation."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from xright_pl import PreferenceData, SFTData
from xright_pl.core.errors import DataError
from xright_pl.core.types import IGNORE_INDEX
from xright_pl.data.collate import collate_preference, collate_sft
from xright_pl.data.encoding import load_preference, load_sft, load_tokenizer
from xright_pl.data.formats import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, format_preference_row, format_sft_row

EOS = "<|endoftext|>"
BOS = "<|bos|>"


def read_jsonl(path: Path, n: int) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def split_decode(tok, ids: list[int], labels: list[int]) -> tuple[str, str]:
    """Decode the masked (prompt) and unmasked (response) parts; checks the mask is a prefix."""
    n_prompt = sum(lab == IGNORE_INDEX for lab in labels)
    assert all(lab == IGNORE_INDEX for lab in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    return tok.decode(ids[:n_prompt]), tok.decode(labels[n_prompt:])


# ----------------------------------------------------------------------------------------- shared data


def test_alpaca_sample_tokenizes(shared_data, tiny_tokenizer):
    path = shared_data / "alpaca_gpt4_sft_train.jsonl"
    raw = read_jsonl(path, 40)
    out = load_sft(
        SFTData(path=str(path), limit=40, val_fraction=0, max_length=4096, max_prompt_length=1024),
        tiny_tokenizer,
    )
    assert out.val is None and out.skipped == {"empty_response": 0}
    assert len(out.train) == 40
    assert set(out.train.column_names) == {"input_ids", "labels", "num_response_tokens", "source_row"}
    seen_input = seen_no_input = False
    for row, ex in zip(raw, out.train):
        prompt, response = split_decode(tiny_tokenizer, ex["input_ids"], ex["labels"])
        assert response == row["output"] + EOS
        assert ex["num_response_tokens"] == sum(lab != IGNORE_INDEX for lab in ex["labels"])
        assert ex["input_ids"][0] == tiny_tokenizer.bos_token_id
        if row["input"]:
            seen_input = True
            assert row["input"] in prompt
            assert prompt == BOS + ALPACA_PROMPT_INPUT.format(instruction=row["instruction"], input=row["input"])
        else:
            seen_no_input = True
            assert prompt == BOS + ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
    assert seen_input and seen_no_input


def test_hh_sample_tokenizes(shared_data, tiny_tokenizer):
    path = shared_data / "hh_rlhf_pref_train.jsonl"
    raw = read_jsonl(path, 25)
    cfg = PreferenceData(path=str(path), limit=25, val_fraction=0, max_length=8192, max_prompt_length=4096)
    out = load_preference(cfg, tiny_tokenizer)
    assert len(out.train) == 25
    assert out.skipped == {"empty_response": 0, "identical_pair": 0, "no_shared_prompt": 0}
    for row, ex in zip(raw, out.train):
        for side in ("chosen", "rejected"):
            prompt, response = split_decode(tiny_tokenizer, ex[f"{side}_input_ids"], ex[f"{side}_labels"])
            assert prompt == BOS + row["prompt"]
            assert response == row[side] + EOS  # leading space kept


def test_hh_whole_dialogue_split(shared_data, tiny_tokenizer, tmp_path):
    raw = read_jsonl(shared_data / "hh_rlhf_pref_train.jsonl", 20)
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in raw]
    for r, orig in zip(rows, raw):
        assert format_preference_row(r, "hh") == (orig["prompt"], orig["chosen"], orig["rejected"])
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    cfg = PreferenceData(path=path, val_fraction=0, max_length=8192, max_prompt_length=4096)
    out = load_preference(cfg, tiny_tokenizer)  # format auto -> hh
    assert len(out.train) == 20
    for orig, ex in zip(raw, out.train):
        prompt, chosen = split_decode(tiny_tokenizer, ex["chosen_input_ids"], ex["chosen_labels"])
        _, rejected = split_decode(tiny_tokenizer, ex["rejected_input_ids"], ex["rejected_labels"])
        assert (prompt, chosen, rejected) == (
            BOS + orig["prompt"],
            orig["chosen"] + EOS,
            orig["rejected"] + EOS,
        )


def test_eval_path_and_val_fraction(shared_data, tiny_tokenizer):
    train = str(shared_data / "alpaca_gpt4_sft_train.jsonl")
    ev = str(shared_data / "alpaca_gpt4_sft_eval.jsonl")
    out = load_sft(SFTData(path=train, eval_path=ev, limit=12), tiny_tokenizer)
    assert len(out.train) == 12 and len(out.val) == 12  # limit applies to each source
    first_eval = read_jsonl(Path(ev), 1)[0]
    _, resp = split_decode(tiny_tokenizer, out.val[0]["input_ids"], out.val[0]["labels"])
    assert resp.startswith(first_eval["output"][:50])


# ------------------------------------------------------------------------------------ helpers / formats


def test_format_sft_row_variants():
    p, r = format_sft_row({"instruction": "Add.", "input": "1 2", "output": "3"}, "alpaca")
    assert "### Input:\n1 2" in p and r == "3"
    p, _ = format_sft_row({"instruction": "Add.", "input": "", "output": "3"}, "alpaca")
    assert "### Input" not in p and p.endswith("### Response:\n")
    p, _ = format_sft_row({"instruction": "Add.", "output": "3"}, "alpaca", "Q: {instruction} {input}\nA:")
    assert p == "Q: Add. \nA:"
    assert format_sft_row({"prompt": "x", "completion": "y"}, "prompt_completion") == ("x", "y")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert format_sft_row({"messages": msgs}, "messages") == (msgs[:1], "yo")
    with pytest.raises(DataError, match="placeholders"):
        format_sft_row({"instruction": "a", "output": "b"}, "alpaca", "{question}")


def test_conversational_chat_template(tiny_tokenizer, tmp_path):
    u = {"role": "user", "content": "Hi there"}
    a1 = {"role": "assistant", "content": "Hello!"}
    a2 = {"role": "assistant", "content": "Go away."}
    rows = [
        {"prompt": [u], "chosen": [a1], "rejected": [a2]},
        {"chosen": [u, a1], "rejected": [u, a2]},  # whole conversations, implicit prompt
        {"prompt": "Hi there", "chosen": [a1], "rejected": [a2]},  # string prompt -> user message
    ]
    out = load_preference(PreferenceData(path=write_jsonl(tmp_path / "c.jsonl", rows), val_fraction=0), tiny_tokenizer)
    assert len(out.train) == 3
    for ex in out.train:
        prompt, chosen = split_decode(tiny_tokenizer, ex["chosen_input_ids"], ex["chosen_labels"])
        _, rejected = split_decode(tiny_tokenizer, ex["rejected_input_ids"], ex["rejected_labels"])
        assert prompt == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        # trained through the end-of-turn token; the template's "\n" after it and an extra EOS are not
        assert chosen == "Hello!<|im_end|>"
        assert rejected == "Go away.<|im_end|>"

    # SFT messages; when EOS already ends the rendered response it is not appended again
    tok = copy.deepcopy(tiny_tokenizer)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = tok.chat_template.replace("<|im_end|>\n", "<|im_end|>")
    sft = load_sft(SFTData(path=write_jsonl(tmp_path / "m.jsonl", [{"messages": [u, a1]}]), val_fraction=0), tok)
    _, resp = split_decode(tok, sft.train[0]["input_ids"], sft.train[0]["labels"])
    assert resp == "Hello!<|im_end|>"


def test_conversational_without_chat_template(tiny_tokenizer, tmp_path):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError, match="chat_template") as e:
        load_sft(SFTData(path=write_jsonl(tmp_path / "m.jsonl", rows), val_fraction=0), tok)
    assert "m.jsonl" in str(e.value) and "row 0" in str(e.value)


# --------------------------------------------------------------------------------- truncation / skips


def test_truncation_left_prompt_right_response(tiny_tokenizer, tmp_path):
    prompt = " ".join(f"word{i}" for i in range(200))
    response = " ".join(f"answer{i}" for i in range(200))
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": prompt, "completion": response}])
    out = load_sft(SFTData(path=path, val_fraction=0, max_length=40, max_prompt_length=16), tiny_tokenizer)
    ex = out.train[0]
    assert len(ex["input_ids"]) == 40
    n_prompt = sum(lab == IGNORE_INDEX for lab in ex["labels"])
    assert n_prompt == 16
    assert ex["input_ids"][0] == tiny_tokenizer.bos_token_id  # BOS kept when cutting from the left
    assert prompt.endswith(tiny_tokenizer.decode(ex["input_ids"][1:16]))  # the prompt's end is kept
    resp = tiny_tokenizer.decode(ex["input_ids"][16:])
    assert response.startswith(resp) and EOS not in resp  # response cut from the right, EOS dropped
    assert ex["num_response_tokens"] == 24


def test_counted_skips(tiny_tokenizer, tmp_path, caplog):
    rows = [
        {"prompt": "Q1", "completion": "A1"},
        {"prompt": "Q2", "completion": ""},  # empty response
        {"prompt": "long " * 50, "completion": "A3"},  # no room left after the prompt
        {"prompt": "Q4", "completion": "A4"},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="xright_pl.data.encoding"):
        out = load_sft(SFTData(path=path, val_fraction=0, max_length=20, max_prompt_length=20), tiny_tokenizer)
    assert out.skipped == {"empty_response": 2}
    assert len(out.train) == 2
    warns = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "s.jsonl" in warns[0].getMessage() and "empty_response=2" in warns[0].getMessage()

    pairs = [
        {"prompt": "Q", "chosen": " same", "rejected": " same"},
        {"prompt": "Q", "chosen": " yes", "rejected": " no"},
        {"prompt": "Q", "chosen": "", "rejected": " no"},
    ]
    out = load_preference(PreferenceData(path=write_jsonl(tmp_path / "p.jsonl", pairs), val_fraction=0), tiny_tokenizer)
    assert out.skipped == {"empty_response": 1, "identical_pair": 1, "no_shared_prompt": 0}
    assert len(out.train) == 1


# ------------------------------------------------------------------------------------------ DataErrors


def _sft_error(tok, path, **kw) -> str:
    with pytest.raises(DataError) as e:
        load_sft(SFTData(path=str(path), val_fraction=0, **kw), tok)
    return str(e.value)


def test_errors_files(tiny_tokenizer, tmp_path):
    msg = _sft_error(tiny_tokenizer, tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg
    assert "is a directory" in _sft_error(tiny_tokenizer, tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    msg = _sft_error(tiny_tokenizer, tmp_path / "empty.jsonl")
    assert "empty.jsonl" in msg and "empty" in msg

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    msg = _sft_error(tiny_tokenizer, bad)
    assert "bad.jsonl" in msg and "line 2" in msg and "not valid JSON" in msg and "Expecting value" in msg

    enc = tmp_path / "latin1.jsonl"
    enc.write_bytes(b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "caf\xe9", "completion": "b"}\n')
    msg = _sft_error(tiny_tokenizer, enc)
    assert "latin1.jsonl" in msg and "line 3" in msg and "UTF-8" in msg

    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"prompt": "a", "completion": "b"}, ["not", "an", "object"]]))
    msg = _sft_error(tiny_tokenizer, arr)
    assert "arr.json" in msg and "row 1" in msg and "not an object" in msg


def test_errors_rows(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}])
    msg = _sft_error(tiny_tokenizer, path)
    assert "'completion'" in msg and "row 1 (line 2)" in msg and "missing" in msg and "f.jsonl" in msg

    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "completion": None}])
    assert "is null" in _sft_error(tiny_tokenizer, path)

    pairs = [{"prompt": "q", "chosen": " a", "rejected": " b"}] * 2 + [{"prompt": "q", "chosen": 7, "rejected": "b"}]
    with pytest.raises(DataError) as e:
        load_preference(PreferenceData(path=write_jsonl(tmp_path / "p.jsonl", pairs)), tiny_tokenizer)
    msg = str(e.value)
    assert "'chosen'" in msg and "int" in msg and "row 2 (line 3)" in msg and "p.jsonl" in msg

    msg = _sft_error(tiny_tokenizer, write_jsonl(tmp_path / "k.jsonl", [{"foo": 1}]))
    assert "match no SFT format" in msg and "'foo'" in msg

    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b"}])
    msg = _sft_error(tiny_tokenizer, path, format="sharegpt")
    assert "'sharegpt'" in msg and "alpaca, prompt_completion, messages" in msg

    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": " "}])
    msg = _sft_error(tiny_tokenizer, path)
    assert "no rows left after filtering" in msg and "empty_response=2" in msg


def test_load_tokenizer(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer("./no/such/tokenizer")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.warns(UserWarning, match="no pad token"):
        loaded = load_tokenizer(str(tmp_path / "tok"), chat_template="{{ messages[0]['content'] }}")
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.chat_template == "{{ messages[0]['content'] }}"


# --------------------------------------------------------------------------------------- held-out split


def test_val_fraction_split_is_seeded(tiny_tokenizer, tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "v.jsonl", rows)
    a = load_sft(SFTData(path=path, val_fraction=0.1), tiny_tokenizer, seed=1)
    b = load_sft(SFTData(path=path, val_fraction=0.1), tiny_tokenizer, seed=1)
    c = load_sft(SFTData(path=path, val_fraction=0.1), tiny_tokenizer, seed=2)
    assert (len(a.train), len(a.val)) == (36, 4)
    assert a.val["input_ids"] == b.val["input_ids"]
    assert a.val["input_ids"] != c.val["input_ids"]
    assert not {tuple(x) for x in a.val["input_ids"]} & {tuple(x) for x in a.train["input_ids"]}
    assert load_sft(SFTData(path=path, val_fraction=0), tiny_tokenizer).val is None


def test_eval_path_used(tiny_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "tr.jsonl", [{"prompt": "q", "completion": f"a{i}"} for i in range(5)])
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"prompt": "q", "completion": "EVAL"}])
    out = load_sft(SFTData(path=train, eval_path=ev), tiny_tokenizer)
    assert len(out.train) == 5 and len(out.val) == 1
    _, resp = split_decode(tiny_tokenizer, out.val[0]["input_ids"], out.val[0]["labels"])
    assert resp == "EVAL" + EOS


def test_parquet_and_json_array(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    a = load_sft(SFTData(path=str(tmp_path / "d.parquet"), val_fraction=0), tiny_tokenizer)
    b = load_sft(SFTData(path=str(tmp_path / "d.json"), val_fraction=0), tiny_tokenizer)
    assert a.train["input_ids"] == b.train["input_ids"] and len(a.train) == 4


def test_hub_name_calls_load_dataset(tiny_tokenizer, monkeypatch):
    calls = []
    rows = [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go"}] * 3

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split, kw))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = load_preference(PreferenceData(path="Dahoas/rm-hh-rlhf", eval_split="test"), tiny_tokenizer)
    assert calls == [("Dahoas/rm-hh-rlhf", "train", {}), ("Dahoas/rm-hh-rlhf", "test", {})]
    assert len(out.train) == 3 and len(out.val) == 3


# ---------------------------------------------------------------------------------------------- collate


def test_collate_sft():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "num_response_tokens": 2},
        {"input_ids": list(range(10, 20)), "labels": [IGNORE_INDEX] * 5 + list(range(15, 20))},
    ]
    b = collate_sft(rows, pad_id=0)
    assert b.input_ids.shape == b.labels.shape == b.attention_mask.shape == (2, 16)
    assert b.input_ids.dtype == torch.long
    assert b.input_ids[0, :3].tolist() == [5, 6, 7] and (b.input_ids[0, 3:] == 0).all()
    assert (b.labels[0, 3:] == IGNORE_INDEX).all() and b.attention_mask.sum().item() == 13
    assert collate_sft(rows, pad_id=0, pad_to_multiple_of=1).input_ids.shape == (2, 10)


def test_collate_preference_and_ref_logps(tiny_tokenizer):
    rows = [
        {
            "chosen_input_ids": [1, 2, 3],
            "chosen_labels": [-100, 2, 3],
            "rejected_input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9],
            "rejected_labels": [-100] + list(range(2, 10)),
            "ref_chosen_logps": -1.5,
            "ref_rejected_logps": -2.5,
        },
        {
            "chosen_input_ids": [4, 5],
            "chosen_labels": [-100, 5],
            "rejected_input_ids": [4, 6],
            "rejected_labels": [-100, 6],
            "ref_chosen_logps": -3.0,
            "ref_rejected_logps": -4.0,
        },
    ]
    b = collate_preference(rows, pad_id=0)
    assert b.input_ids.shape == (4, 16) and b.num_examples == 2
    assert b.input_ids[:, 0].tolist() == [1, 4, 1, 4]  # chosen rows first, then rejected
    assert b.attention_mask.sum(1).tolist() == [3, 2, 9, 2]
    assert b.ref_logps.dtype == torch.float32 and b.ref_logps.tolist() == [-1.5, -3.0, -2.5, -4.0]
    for r in rows:
        del r["ref_chosen_logps"], r["ref_rejected_logps"]
    assert collate_preference(rows, pad_id=0).ref_logps is None


def test_collate_from_loaded_dataset(tiny_tokenizer, tmp_path):
    pairs = [{"prompt": "Q", "chosen": " yes please", "rejected": " no"}] * 3
    out = load_preference(PreferenceData(path=write_jsonl(tmp_path / "p.jsonl", pairs), val_fraction=0), tiny_tokenizer)
    b = collate_preference([out.train[i] for i in range(3)], pad_id=tiny_tokenizer.pad_token_id)
    assert b.input_ids.shape[0] == 6 and b.input_ids.shape[1] % 8 == 0
    assert ((b.labels != IGNORE_INDEX).sum(1) > 0).all()


def test_sources_reexports_the_public_names_from_their_modules():
    """``xright_pl.data.sources`` only re-exports: every public name defined in the data modules it gathers, each
    the very object of its home module."""
    import ast
    import inspect

    from xright_pl.data import encoding, formats, readers, sources, specs

    for module in (encoding, formats, readers, specs):
        defined = set()
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined.update(target.id for target in node.targets if isinstance(target, ast.Name))
        for name in sorted(n for n in defined if not n.startswith("_") and n != "log"):
            assert name in sources.__all__, f"{module.__name__}.{name} is not re-exported"
            assert getattr(sources, name) is getattr(module, name), name
    assert sources.DataError is DataError
    assert not [n for n in vars(sources) if not n.startswith("__") and n not in sources.__all__]
