"""`python -m xright_pl generate`: prompts as in training, greedy determinism, AlpacaEval format, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY_LLAMA

from xright_pl import PreferenceData, SFTData
from xright_pl.commands.cli import main, run
from xright_pl.core.errors import DataError
from xright_pl.core.types import IGNORE_INDEX
from xright_pl.data.encoding import load_preference, load_sft, load_tokenizer
from xright_pl.inference.generate import generate, generate_batch
from xright_pl.inference.loading import find_run_config
from xright_pl.inference.prompts import PromptEncoder, read_prompts
from xright_pl.models.build import ModelError, build_causal_lm

KEYS = {"instruction", "output", "generator", "dataset", "prompt_id"}
TEMPLATE = "Human: {instruction} {input} Assistant:"


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one thread than on several fighting over busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo_tok():
    return load_tokenizer("builtin:demo/tokenizer")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, demo_tok) -> str:
    """A save_pretrained folder (model + tokenizer) of a tiny random Llama: what `export` writes."""
    folder = tmp_path_factory.mktemp("export") / "tiny-policy"
    build_causal_lm(config=dict(TINY_LLAMA), seed=0).save_pretrained(folder)
    demo_tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    rows = [json.loads(x) for x in (REPO / "xright_pl/assets/demo/sft_eval.jsonl").read_text().splitlines()[:5]]
    return _write_jsonl(tmp_path_factory.mktemp("prompts") / "five.jsonl", rows)


def _greedy_reference(model, ids: list[int], eos: int, n: int) -> list[int]:
    """Greedy decoding by hand: full forward each step, argmax, stop at EOS."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


# ---------------------------------------------------------------------------------------------- prompts


def test_read_prompts_every_format(tmp_path):
    alpaca = _write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "add 1", "input": "2", "output": "3 ."}, {"instruction": "hi", "input": "", "output": "yo"}],
    )
    items = read_prompts(alpaca, prompt_template=TEMPLATE)
    assert [i.instruction for i in items] == ["add 1\n\n2", "hi"]
    assert [i.prompt for i in items] == ["Human: add 1 2 Assistant:", "Human: hi  Assistant:"]
    assert [i.reference for i in items] == ["3 .", "yo"]
    assert [i.prompt_id for i in items] == [0, 1]

    only = _write_jsonl(tmp_path / "p.jsonl", [{"instruction": "hi"}, {"instruction": "add", "input": "2"}])
    items = read_prompts(only)
    assert [i.reference for i in items] == [None, None]
    assert items[0].prompt.endswith("### Instruction:\nhi\n\n### Response:\n")  # the standard Alpaca template
    assert "### Input:\n2" in items[1].prompt and items[1].instruction == "add\n\n2"

    raw = _write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Human: x Assistant:"}])
    assert read_prompts(raw)[0].prompt == "Human: x Assistant:"

    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    msgs = _write_jsonl(
        tmp_path / "m.jsonl", [{"messages": chat}, {"messages": [*chat, {"role": "assistant", "content": "d"}]}]
    )
    items = read_prompts(msgs)
    assert items[0].prompt == chat and items[0].reference is None  # prompt-only chat
    assert items[1].prompt == chat and items[1].reference == "d"  # SFT messages: the answer is held out
    assert items[0].instruction == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"

    pref = read_prompts("builtin:demo/pref_eval.jsonl", limit=2)
    first = json.loads((REPO / "xright_pl/assets/demo/pref_eval.jsonl").read_text().splitlines()[0])
    assert pref[0].instruction == pref[0].prompt == first["prompt"]
    assert pref[0].reference == first["chosen"]

    hh = _write_jsonl(
        tmp_path / "hh.jsonl",
        [{"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"}],
    )
    assert [(i.prompt, i.reference) for i in read_prompts(hh)] == [("\n\nHuman: q\n\nAssistant:", "good")]

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "no prompt here"}])
    with pytest.raises(DataError, match="row 0"):
        read_prompts(bad)


def _prompt_part(ids: list[int], labels: list[int]) -> list[int]:
    n = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    return list(ids[:n])


def test_run_template_is_used_only_for_rows_it_fits(tmp_path):
    """A run's SFT template with {instruction}/{input} (the demo's) fills alpaca rows; prompt-only rows are used as
    they are. A template the user gives must fit, or it is an error."""
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "what is 2 plus 2 ?"}) + "\n" + json.dumps({"instruction": "add 1 and 2"}) + "\n"
    )
    template = "Human: {instruction} {input} Assistant:"
    items = read_prompts(str(path), "prompt", template, strict_template=False)
    assert items[0].prompt == "what is 2 plus 2 ?"
    assert items[1].prompt == "Human: add 1 and 2  Assistant:"
    with pytest.raises(DataError, match="cannot be filled"):
        read_prompts(str(path), "prompt", template)


def test_prompt_tokens_equal_training_prompts(tmp_path, demo_tok):
    """The prompt fed to generation is token for token the prompt part of a training sequence (template,
    BOS, chat template, left truncation keeping BOS)."""
    sft = SFTData(path="builtin:demo/sft_eval.jsonl", val_fraction=0, limit=8, prompt_template=TEMPLATE,
                  max_length=64, max_prompt_length=9)  # fmt: skip
    train = load_sft(sft, demo_tok).train
    enc = PromptEncoder(demo_tok, max_prompt_length=9)
    items = read_prompts(sft.path, prompt_template=TEMPLATE, limit=8)
    expected = [_prompt_part(r["input_ids"], r["labels"]) for r in train]
    assert [enc(i.prompt) for i in items] == expected
    assert any(len(e) == 9 for e in expected) and all(e[0] == demo_tok.bos_token_id for e in expected)

    pref = PreferenceData(path="builtin:demo/pref_eval.jsonl", val_fraction=0, limit=8, max_length=64)
    train = load_preference(pref, demo_tok).train
    items = read_prompts(pref.path, limit=8)
    enc = PromptEncoder(demo_tok, max_prompt_length=pref.max_prompt_length)
    assert [enc(i.prompt) for i in items] == [_prompt_part(r["chosen_input_ids"], r["chosen_labels"]) for r in train]

    chat = _write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": f"count the legs of the drax {k}"},
                       {"role": "assistant", "content": "7 ."}]} for k in range(3)],
    )  # fmt: skip
    train = load_sft(SFTData(path=chat, val_fraction=0, max_length=64), demo_tok).train
    enc = PromptEncoder(demo_tok)
    assert [enc(i.prompt) for i in read_prompts(chat)] == [_prompt_part(r["input_ids"], r["labels"]) for r in train]


# ---------------------------------------------------------------------------------------------- generation


def test_generate_format_greedy_and_batch_invariance(tmp_path, exported, prompts_file, demo_tok):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    res = generate(exported, prompts_file, str(a), max_new_tokens=6, batch_size=2, progress=False)
    assert res == {"output": str(a), "generator": "tiny-policy", "prompts": 5, "skipped": 0, "generated": 5}
    rows = json.loads(a.read_text())
    assert isinstance(rows, list) and len(rows) == 5
    assert all(set(r) == KEYS for r in rows)
    items = read_prompts(prompts_file)
    assert [r["instruction"] for r in rows] == [i.instruction for i in items]
    assert [r["prompt_id"] for r in rows] == [0, 1, 2, 3, 4]
    assert {r["generator"] for r in rows} == {"tiny-policy"} and {r["dataset"] for r in rows} == {"five"}
    assert all(isinstance(r["output"], str) and r["output"] for r in rows)

    # Greedy is deterministic and does not depend on the batch (left padding is masked).
    generate(exported, prompts_file, str(b), max_new_tokens=6, batch_size=3, progress=False)
    assert json.loads(b.read_text()) == rows

    # ... and equals greedy decoding written out by hand (argmax of a full forward at every step).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    enc = PromptEncoder(demo_tok)
    for item, row in zip(items, rows):
        ids = _greedy_reference(model, enc(item.prompt), demo_tok.eos_token_id, 6)
        assert row["output"] == demo_tok.decode(ids, skip_special_tokens=True).strip()


def test_sampling_is_seeded(tmp_path, exported, prompts_file):
    def sample(name, seed):
        out = tmp_path / name
        generate(exported, prompts_file, str(out), max_new_tokens=6, do_sample=True, seed=seed, progress=False)
        return [r["output"] for r in json.loads(out.read_text())]

    first = sample("s0.json", 0)
    assert sample("s0b.json", 0) == first
    assert sample("s1.json", 1) != first


def test_resume_skips_answered_prompts(tmp_path, exported, prompts_file):
    full = tmp_path / "full.json"
    generate(exported, prompts_file, str(full), max_new_tokens=5, batch_size=2, progress=False)
    part = tmp_path / "part.json"
    generate(exported, prompts_file, str(part), max_new_tokens=5, batch_size=2, limit=3, progress=False)
    done = json.loads(part.read_text())
    assert len(done) == 3
    done[1]["output"] = "EDITED"  # a regenerated answer would overwrite this
    part.write_text(json.dumps(done))
    res = generate(exported, prompts_file, str(part), max_new_tokens=5, batch_size=2, progress=False)
    assert (res["skipped"], res["generated"]) == (3, 2)
    resumed = json.loads(part.read_text())
    expected = json.loads(full.read_text())
    expected[1]["output"] = "EDITED"
    assert resumed == expected
    # Everything answered: nothing to do.
    assert generate(exported, prompts_file, str(part), max_new_tokens=5, progress=False)["generated"] == 0
    # Other generation settings, or other weights behind the same path, would mix answers in one file: refused.
    with pytest.raises(DataError, match="max_new_tokens: 5 then, 9 now"):
        generate(exported, prompts_file, str(part), max_new_tokens=9, progress=False)
    with pytest.raises(DataError, match="do_sample"):
        generate(exported, prompts_file, str(part), max_new_tokens=5, do_sample=True, progress=False)
    weights = next(Path(exported).glob("*.safetensors"))
    times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
    os.utime(weights, ns=(times[0], times[1] + 10**9))
    try:
        with pytest.raises(DataError, match="weights"):
            generate(exported, prompts_file, str(part), max_new_tokens=5, progress=False)
    finally:
        os.utime(weights, ns=times)

    # A file written for other prompts, or by another generator, is refused; --overwrite starts afresh.
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**expected[0], "instruction": "something else"}]))
    with pytest.raises(DataError, match="other prompts"):
        generate(exported, prompts_file, str(other), max_new_tokens=5, progress=False)
    with pytest.raises(DataError, match="generator"):
        generate(exported, prompts_file, str(part), generator="x", max_new_tokens=5, progress=False)
    res = generate(exported, prompts_file, str(other), max_new_tokens=5, batch_size=2, overwrite=True, progress=False)
    assert res["generated"] == 5 and json.loads(other.read_text()) == json.loads(full.read_text())


def test_generate_batch_restores_train_mode(exported, demo_tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported).train()
    texts = generate_batch(model, demo_tok, [[demo_tok.bos_token_id, 5, 6], [demo_tok.bos_token_id]], 3)
    assert len(texts) == 2 and model.training


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_and_reference_match_exported_models(tmp_path, demo_tok):
    """A Lightning checkpoint + the run's config.yaml generates exactly what the trained policy saved with
    save_pretrained generates; --reference answers with the initial model."""
    root = tmp_path / "run"
    cli = run(
        ["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(root),
         "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--summary.print_table", "false",
         "--data.sft.limit", "64", "--data.preference.limit", "64", "--trainer.logger", "false"]
    )  # fmt: skip
    ckpts = sorted(root.rglob("*.ckpt"))
    assert len(ckpts) == 1
    config = root / "config.yaml"  # without a logger LightningCLI saves it in default_root_dir
    assert find_run_config(str(ckpts[0])) == str(config)
    trained = tmp_path / "trained"
    cli.model.policy.save_pretrained(trained)
    demo_tok.save_pretrained(trained)
    initial = tmp_path / "initial"
    cfg = cli.model.hparams
    build_causal_lm(config=dict(cfg.model_config), seed=cfg.seed).save_pretrained(initial)
    demo_tok.save_pretrained(initial)

    def answers(model, name, **kw):
        out = tmp_path / name
        generate(model, "builtin:demo/sft_eval.jsonl", str(out), limit=6, max_new_tokens=6, progress=False, **kw)
        return json.loads(out.read_text())

    from_ckpt = answers(str(ckpts[0]), "ckpt.json")
    # The run's prompt template applies to a checkpoint by default and to a folder given --config.
    assert from_ckpt[0]["generator"] == "run-last"  # <run folder>-<checkpoint name>
    from_folder = answers(str(trained), "folder.json", config=str(config))
    assert [r["output"] for r in from_ckpt] == [r["output"] for r in from_folder]
    ref = answers(str(ckpts[0]), "ref.json", reference=True)
    assert ref[0]["generator"].endswith("-reference")
    assert [r["output"] for r in ref] == [r["output"] for r in answers(str(initial), "init.json", config=str(config))]
    assert [r["output"] for r in ref] != [r["output"] for r in from_ckpt]  # three steps did change the model

    lone = tmp_path / "elsewhere" / "ckpts" / "lone.ckpt"
    lone.parent.mkdir(parents=True)
    lone.write_bytes(ckpts[0].read_bytes())
    with pytest.raises(ModelError, match="config.yaml"):
        generate(str(lone), "builtin:demo/sft_eval.jsonl", str(tmp_path / "x.json"), progress=False)
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("hidden_size: 64", "hidden_size: 32"))
    with pytest.raises(ModelError, match="does not fit"):
        generate(str(lone), "builtin:demo/sft_eval.jsonl", str(tmp_path / "x.json"), config=str(other), progress=False)


def test_find_run_config_layouts(tmp_path):
    """<root>/checkpoints/x.ckpt with <root>/lightning_logs/version_N/config.yaml (newest wins), and
    <log dir>/checkpoints/x.ckpt with <log dir>/config.yaml; nothing found further up."""
    import os

    ckpt = tmp_path / "root" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert find_run_config(str(ckpt)) is None
    for v, t in (("version_0", 1_000), ("version_1", 2_000)):
        (tmp_path / "root/lightning_logs" / v).mkdir(parents=True)
        (tmp_path / "root/lightning_logs" / v / "config.yaml").write_text("model: {}")
        os.utime(tmp_path / "root/lightning_logs" / v / "config.yaml", (t, t))
    assert find_run_config(str(ckpt)) == str(tmp_path / "root/lightning_logs/version_1/config.yaml")
    (tmp_path / "root/config.yaml").write_text("model: {}")
    assert find_run_config(str(ckpt)) == str(tmp_path / "root/config.yaml")
    deep = tmp_path / "root" / "a" / "b" / "c.ckpt"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"")
    assert find_run_config(str(deep)) is None


def test_checkpoint_is_named_after_its_own_run_when_two_runs_share_a_root(tmp_path):
    """Issue 11 (4): two runs in one root (lightning_logs/version_0 and version_1, one checkpoints folder). A
    checkpoint of version_0 is answered with version_0's config and named after it, also when its file is newer
    than version_1's config (copied, touched): the checkpoint records its run."""
    root = tmp_path / "demo"

    def fit(hidden: int):
        run(
            ["fit", "--config", str(REPO / "configs/demo.yaml"), "--trainer.default_root_dir", str(root),
             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
             "false", "--summary.print_table", "false", "--trajectory.enabled", "false", "--data.sft.limit", "32",
             "--data.preference.limit", "32", "--model.model_config.hidden_size", str(hidden)]
        )  # fmt: skip

    fit(64)
    first = root / "checkpoints" / "run0.ckpt"
    (root / "checkpoints" / "last.ckpt").rename(first)
    fit(32)  # another shape: version_1's config cannot load version_0's weights
    logs = root / "lightning_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["version_0", "version_1"]
    assert find_run_config(str(first)) == str(logs / "version_0" / "config.yaml")
    assert find_run_config(str(root / "checkpoints" / "last.ckpt")) == str(logs / "version_1" / "config.yaml")
    os.utime(first)  # now newer than both configs: the recorded run decides, not the file times
    res = generate(str(first), "builtin:demo/sft_eval.jsonl", str(tmp_path / "a.json"), limit=2,
                   max_new_tokens=2, progress=False)  # fmt: skip
    assert res["generator"] == "demo-version_0-run0"
    assert {r["generator"] for r in json.loads((tmp_path / "a.json").read_text())} == {"demo-version_0-run0"}
    res = generate(str(root / "checkpoints" / "last.ckpt"), "builtin:demo/sft_eval.jsonl", str(tmp_path / "b.json"),
                   limit=2, max_new_tokens=2, progress=False)  # fmt: skip
    assert res["generator"] == "demo-version_1-last"
    # The whole root moved elsewhere: the run is found at the same place relative to the checkpoint.
    moved = tmp_path / "moved" / "demo"
    moved.parent.mkdir()
    root.rename(moved)
    assert find_run_config(str(moved / "checkpoints" / "run0.ckpt")) == str(
        moved / "lightning_logs" / "version_0" / "config.yaml"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompts", "{empty}"], r"--prompts .*empty\.jsonl.*no prompts"),
        (["--prompts", "{empty_list}"], r"--prompts .*empty_list\.json.*no prompts"),
        (["--prompts", "builtin:demo/sft_eval.jsonl", "--limit", "0"], r"--limit 0.*no prompts"),
        (["--prompts", "builtin:demo/sft_eval.jsonl", "--max_new_tokens", "0"], r"--max_new_tokens 0.*at least 1"),
    ],
)
def test_cli_no_prompts_or_no_new_tokens_is_a_clear_error(tmp_path, capsys, monkeypatch, exported, args, message):
    """Issue 11 (6): an empty prompts file, --limit 0 and --max_new_tokens 0 are errors (exit 2, one paragraph
    naming the option), raised before the model is loaded, and no output file is written."""
    import re

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty_list.json").write_text("[]")
    args = [a.format(empty=tmp_path / "empty.jsonl", empty_list=tmp_path / "empty_list.json") for a in args]

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("xright_pl.inference.generate.load_generator", no_load)
    out = tmp_path / "o.json"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", exported, "--output", str(out), "--progress", "false", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xright_pl: error: ") and "\n" not in err, err
    assert re.search(message, err), err
    assert not out.exists()


def test_cli_help_and_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--prompts", "--output", "--max_new_tokens", "--do_sample", "--batch_size"):
        assert flag in out
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "nope"), "--prompts", "builtin:demo/sft_eval.jsonl",
              "--output", str(tmp_path / "o.json")])  # fmt: skip
    assert e.value.code == 2
    assert "xright_pl: error: model" in capsys.readouterr().err


def test_alpaca_eval_set_round_trip(tmp_path, exported):
    """AlpacaEval's evaluation set (instruction/output/generator/dataset) in, model_outputs out: the
    instruction is kept verbatim (AlpacaEval matches on it) and so is each row's dataset."""
    rows = [
        {"instruction": "What is 1 plus 7?", "output": "8", "generator": "text_davinci_003", "dataset": "helpful_base"},
        {"instruction": "Name a shape.", "output": "round", "generator": "text_davinci_003", "dataset": "koala"},
    ]
    src = tmp_path / "alpaca_eval.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "model_outputs.json"
    generate(exported, str(src), str(out), max_new_tokens=4, generator="my-model", progress=False)
    got = json.loads(out.read_text())
    assert [(r["instruction"], r["dataset"], r["generator"]) for r in got] == [
        ("What is 1 plus 7?", "helpful_base", "my-model"),
        ("Name a shape.", "koala", "my-model"),
    ]
