"""Every bad input a user can give, through the command line: a one-paragraph error naming the file, row and
field and the fix, before training starts and without a traceback (or a counted skip in the summary)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO

from xright_pl.commands.cli import main

DEMO = REPO / "xright_pl" / "assets" / "demo"
GOOD_PAIRS = [json.loads(line) for line in (DEMO / "pref_train.jsonl").read_text().splitlines()[:16]]


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.chdir(REPO)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _base(root: Path, config: str = "configs/demo/alright.yaml") -> list[str]:
    return [
        "fit",
        "--config",
        config,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--data.sft.limit",
        "16",
        "--data.preference.limit",
        "16",
        "--summary.print_table",
        "false",
    ]


def _fails(capsys, tmp_path, *args, config="configs/demo/alright.yaml") -> str:
    with pytest.raises(SystemExit) as e:
        main([*_base(tmp_path / "run", config), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained
    return err


def _one_paragraph(err: str) -> str:
    """The library's own errors: one ``xright_pl: error:`` paragraph, the last thing printed (above it only
    progress bars)."""
    start = err.rfind("xright_pl: error: ")
    assert start >= 0 and "\n\n" not in err[start:].strip(), err
    return err[start:]


def _jsonl(path: Path, rows: list, raw: bytes = b"") -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    return path


# ------------------------------------------------------------------------------------------ data files
def test_missing_file(capsys, tmp_path):
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.preference.path", str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl: file not found" in err and "Check the path" in err


def test_directory_instead_of_file(capsys, tmp_path):
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.sft.path", str(tmp_path)))
    assert "is a directory, not a data file" in err and ".jsonl" in err


def test_malformed_json_line(capsys, tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", GOOD_PAIRS[:3], b'{"prompt": "a", "chosen": \n')
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.preference.path", str(f)))
    assert str(f) in err and "line 4 (row 3) is not valid JSON" in err and "one complete JSON object" in err


def test_missing_field(capsys, tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [*GOOD_PAIRS[:2], {"prompt": "Human: hi Assistant:", "chosen": "hello ."}])
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.preference.path", str(f)))
    assert str(f) in err and "row 2 (line 3)" in err and "required field 'rejected' is missing" in err


def test_wrong_type(capsys, tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [*GOOD_PAIRS[:4], {**GOOD_PAIRS[4], "chosen": 3}])
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.preference.path", str(f)))
    assert "row 4 (line 5)" in err and "field 'chosen' must be a string, got int" in err


def test_non_utf8_bytes(capsys, tmp_path):
    f = _jsonl(
        tmp_path / "s.jsonl", [{"instruction": "a", "output": "b ."}], b'{"instruction": "\xff", "output": "x"}\n'
    )
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.sft.path", str(f)))
    assert "line 2 (row 1) is not valid UTF-8" in err and "Re-encode the file as UTF-8" in err


def test_empty_string_and_identical_pair_are_counted_skips(tmp_path):
    rows = [*GOOD_PAIRS, {**GOOD_PAIRS[0], "chosen": ""}, {**GOOD_PAIRS[1], "rejected": GOOD_PAIRS[1]["chosen"]}]
    f = _jsonl(tmp_path / "p.jsonl", rows)
    main([*_base(tmp_path / "run"), "--data.preference.path", str(f), "--data.preference.limit", "null"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"]["dpo"]["empty_response"] == 1
    assert summary["skipped"]["dpo"]["identical_pair"] == 1
    assert summary["optimizer_steps"] == 2


def test_no_response_token_left_after_truncation_is_a_counted_skip(tmp_path):
    """max_prompt_length = max_length = 11: a prompt of 11 tokens leaves no room for its response."""
    from xright_pl.data.encoding import load_tokenizer

    tok = load_tokenizer("builtin:demo/tokenizer")
    rows = [
        json.loads(x) for f in ("pref_train", "pref_eval") for x in (DEMO / f"{f}.jsonl").read_text().split("\n")[:16]
    ]
    expected = sum(len(tok(r["prompt"])["input_ids"]) >= 11 for r in rows)
    assert 0 < expected < 32
    main([*_base(tmp_path / "run"), "--data.preference.max_length", "11", "--data.preference.max_prompt_length", "11"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"]["dpo"]["empty_response"] == expected
    assert summary["skipped"]["sft"]["empty_response"] == 0
    assert summary["optimizer_steps"] == 2


def test_no_response_token_in_any_row(capsys, tmp_path):
    err = _one_paragraph(
        _fails(capsys, tmp_path, "--data.preference.max_length", "4", "--data.preference.max_prompt_length", "4")
    )
    assert "no rows left after filtering" in err and "empty_response=16" in err
    assert "max_length leaves room for responses after max_prompt_length" in err


def test_dataset_empty_after_filtering(capsys, tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{**r, "rejected": r["chosen"]} for r in GOOD_PAIRS])
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.preference.path", str(f)))
    assert str(f) in err and "no rows left after filtering" in err and "identical_pair=16" in err


# ------------------------------------------------------------------------------------------ tokenizer
def _tokenizer_copy(tmp_path: Path, drop: str) -> Path:
    folder = tmp_path / f"tok-{drop}"
    shutil.copytree(DEMO / "tokenizer", folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop(drop)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    if drop == "chat_template":
        (folder / "chat_template.jinja").unlink()
    return folder


def test_tokenizer_without_pad_token_falls_back_to_eos_with_a_warning(tmp_path, caplog):
    tok = _tokenizer_copy(tmp_path, "pad_token")
    with caplog.at_level(logging.WARNING, logger="xright_pl.data.encoding"), pytest.warns(UserWarning, match="pad"):
        main([*_base(tmp_path / "run"), "--data.tokenizer", str(tok)])
    (msg,) = [r.getMessage() for r in caplog.records if "no pad token" in r.getMessage()]
    assert "using the EOS token '<eos>' as pad" in msg
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["optimizer_steps"] == 2


def test_conversational_rows_without_chat_template(capsys, tmp_path):
    tok = _tokenizer_copy(tmp_path, "chat_template")
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in GOOD_PAIRS
    ]
    f = _jsonl(tmp_path / "conv.jsonl", rows)
    err = _one_paragraph(_fails(capsys, tmp_path, "--data.tokenizer", str(tok), "--data.preference.path", str(f)))
    assert str(f) in err and "row 0" in err and "need a chat template" in err and "chat_template" in err


# ------------------------------------------------------------------------------------------ settings
def test_lambda_outside_unit_interval(capsys, tmp_path):
    err = _one_paragraph(_fails(capsys, tmp_path, "--model.lam", "1.5"))
    assert "lam must be a number in [0, 1]" in err and "--model.lam 0.5" in err


def test_k_below_one(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--model.selector.eval_every", "0", config="configs/demo/maxright.yaml")
    err = _one_paragraph(err)
    assert "eval_every (k) must be an integer >= 1, got 0" in err


@pytest.mark.parametrize(
    ("args", "config", "expected"),
    [
        (["--trainer.max_steps", "-5"], "alright", "`max_steps` must be a non-negative integer or -1"),
        (["--model.selector.switch_step", "-1"], "sequential", "switch_step must be an integer >= 0, got -1"),
        (["--model.accumulate_grad_batches", "0"], "alright", "accumulate_grad_batches must be an integer >= 1"),
        (["--trainer.callbacks.every_n_train_steps", "-10"], "alright", "every_n_train_steps must be an integer >= 0"),
        (["--model.max_consecutive_nonfinite", "0"], "alright", "max_consecutive_nonfinite must be an integer >= 1"),
    ],
    ids=["max_steps", "switch_step", "accumulate", "checkpoint_every", "nonfinite"],
)
def test_negative_step_counts(capsys, tmp_path, args, config, expected):
    err = _one_paragraph(_fails(capsys, tmp_path, *args, config=f"configs/demo/{config}.yaml"))
    assert expected in err


def test_unknown_method(capsys, tmp_path):
    err = _one_paragraph(_fails(capsys, tmp_path, "--model.selector.class_path", "xright_pl.Maxleft"))
    assert "xright_pl.Maxleft" in err and "has no attribute 'Maxleft'" in err
    assert "xright_pl.Maxright" in err and "usage:" not in err  # the fix, not the whole usage text


def test_misspelt_option(capsys, tmp_path):
    err = _one_paragraph(_fails(capsys, tmp_path, "--model.lamda", "0.3"))
    assert "unrecognized arguments: --model.lamda 0.3" in err and "--help" in err and "usage:" not in err


def test_maxright_with_one_optimum_names_every_option(capsys, tmp_path):
    err = _one_paragraph(
        _fails(
            capsys,
            tmp_path,
            "--model.selector.optimum_file",
            "null",
            "--model.selector.f_sft_star",
            "0.4",
            config="configs/demo/maxright.yaml",
        )
    )
    assert "MAXRIGHT needs both optima" in err and "f_dpo_star" in err
    assert "optimum_file" in err and "online estimate" in err


def test_model_path_that_does_not_exist(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    err = _one_paragraph(_fails(capsys, tmp_path, "--model.model", missing, "--model.model_config", "null"))
    assert f"model path {missing!r} does not exist" in err and "save_pretrained" in err


def test_whitespace_prompt_is_a_counted_skip_in_the_summary(tmp_path):
    pairs = _jsonl(tmp_path / "p.jsonl", [*GOOD_PAIRS, {**GOOD_PAIRS[0], "prompt": " \n "}])
    sft_rows = [json.loads(x) for x in (DEMO / "sft_train.jsonl").read_text().splitlines()[:16]]
    sft = _jsonl(tmp_path / "s.jsonl", [*sft_rows, {"instruction": "\t", "input": "", "output": "4 ."}])
    main([*_base(tmp_path / "run"), "--data.preference.path", str(pairs), "--data.sft.path", str(sft),
          "--data.preference.limit", "null", "--data.sft.limit", "null"])  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"]["dpo"]["empty_prompt"] == 1 and summary["skipped"]["dpo"]["empty_response"] == 0
    assert summary["skipped"]["sft"]["empty_prompt"] == 1
    assert summary["optimizer_steps"] == 2
