"""`python -m xright_pl judge` and WinRateCallback: win rate statistics, reward scoring, matching, logging."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import TERSE_TEMPLATE, TINY_LLAMA, demo_data, three_datasets, tiny_module, trainer

from xright_pl import Alright, WinRateCallback
from xright_pl.callbacks.win_rate import METRIC_KEYS
from xright_pl.commands.cli import run
from xright_pl.core.errors import ConfigError, DataError
from xright_pl.data.encoding import load_tokenizer
from xright_pl.inference.generate import generate
from xright_pl.inference.judge import instruction_to_messages, judge, pair_answers, wilson_interval, win_rate
from xright_pl.inference.prompts import read_prompts
from xright_pl.models.build import ModelError, build_causal_lm

N_PROMPTS = 24
SCORE_KEYS = {"instruction", "policy_output", "baseline_output", "policy_score", "baseline_score", "outcome"}


def tiny_reward_model(folder, tok, num_labels: int = 1, seed: int = 0) -> str:
    """A random-init Llama reward model (one output) with the demo tokenizer, saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    cfg.update(max_position_embeddings=128, num_labels=num_labels, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model("llama", **cfg))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


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
def setup(tmp_path_factory, demo_tok) -> SimpleNamespace:
    """A tiny policy folder, a tiny reward model, and the policy's answers to the demo preference prompts:
    greedy, and sampled under two seeds."""
    root = tmp_path_factory.mktemp("judge")
    policy = root / "policy"
    build_causal_lm(config=dict(TINY_LLAMA), seed=0).save_pretrained(policy)
    demo_tok.save_pretrained(policy)
    rm = tiny_reward_model(root / "rm", demo_tok)
    files = {}
    for name, kw in (
        ("greedy", {}),
        ("sample0", {"do_sample": True, "seed": 0}),
        ("sample1", {"do_sample": True, "seed": 1}),
    ):
        files[name] = str(root / f"{name}.json")
        generate(str(policy), "builtin:demo/pref_eval.jsonl", files[name], limit=N_PROMPTS, max_new_tokens=6,
                 batch_size=12, progress=False, **kw)  # fmt: skip
    return SimpleNamespace(root=root, policy=str(policy), rm=rm, **files)


# ---------------------------------------------------------------------------------------------- statistics


def test_wilson_interval_hand_worked():
    """7 of 10, z = 1.96: p = 0.7, z^2 = 3.8416, denominator 1 + 3.8416/10 = 1.38416,
    center = (0.7 + 3.8416/20) / 1.38416 = 0.89208 / 1.38416 = 0.644492,
    half = 1.96 / 1.38416 * sqrt(0.7*0.3/10 + 3.8416/400) = 1.416021 * sqrt(0.030604) = 0.247718
    -> [0.396774, 0.892210] (the textbook Wilson interval for 7/10)."""
    lo, hi = wilson_interval(7, 10, z=1.96)
    assert lo == pytest.approx(0.396774, abs=1e-6) and hi == pytest.approx(0.892210, abs=1e-6)
    lo, hi = wilson_interval(0, 5, z=1.96)  # p = 0: the interval starts at 0 and is not empty
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 5 / (1 + 3.8416 / 5), abs=1e-9)
    lo, hi = wilson_interval(2.5, 5)  # ties count half: symmetric around 0.5
    assert lo == pytest.approx(1 - hi) and lo < 0.5 < hi
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_win_rate_counts_ties_half():
    r = win_rate([1.0, 2.0, 3.0, 3.0, 5.0], [0.0, 2.0, 4.0, 3.0, 1.0])
    assert (r.n, r.wins, r.ties, r.losses) == (5, 2, 2, 1)
    assert r.win_rate == pytest.approx(3 / 5)
    assert (r.ci_low, r.ci_high) == pytest.approx(wilson_interval(3, 5))
    same = win_rate([0.1] * 8, [0.1] * 8)
    assert (same.ties, same.win_rate) == (8, 0.5) and same.ci_low < 0.5 < same.ci_high


def test_instruction_to_messages_and_matching():
    assert instruction_to_messages("Human: count the legs . Assistant:") == [
        {"role": "user", "content": "count the legs ."}
    ]
    assert instruction_to_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert instruction_to_messages("Explain e-commerce.") == [{"role": "user", "content": "Explain e-commerce."}]
    # k-th occurrence with k-th occurrence; a policy answer with no baseline answer is counted.
    pairs, unmatched = pair_answers(
        [("q", "1"), ("r", "2"), ("q", "3"), ("s", "4")], [("q", "a"), ("q", "b"), ("r", "c")]
    )
    assert pairs == [(0, 0), (1, 2), (2, 1)] and unmatched == 1


# ---------------------------------------------------------------------------------------------- judge


def test_self_vs_self(setup, tmp_path):
    """Greedy answers against themselves: every prompt a tie, win rate exactly 0.5. Two sampled runs of the
    same model: the answers differ, and 0.5 lies inside the 95% interval."""
    s = judge(setup.greedy, setup.greedy, setup.rm, output_dir=str(tmp_path / "g"), progress=False)
    assert (s["n"], s["ties"], s["win_rate"], s["unmatched"]) == (N_PROMPTS, N_PROMPTS, 0.5, 0)
    assert s["ci_low"] < 0.5 < s["ci_high"] and s["ci_method"] == "wilson95_ties_half"
    assert s["policy_generator"] == "policy" and s["input_format"] == "chat"

    s = judge(setup.sample0, setup.sample1, setup.rm, output_dir=str(tmp_path / "s"), progress=False)
    rows = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert len(rows) == N_PROMPTS and all(set(r) == SCORE_KEYS for r in rows)
    differ = sum(r["policy_output"] != r["baseline_output"] for r in rows)
    assert differ >= N_PROMPTS // 2
    assert s["wins"] + s["losses"] >= differ // 2
    # Measured at these seeds: 8 wins / 16 losses, 0.333 in [0.180, 0.533]. Swapping the sides mirrors it.
    assert s["ci_low"] <= 0.5 <= s["ci_high"]
    swapped = judge(setup.sample1, setup.sample0, setup.rm, output_dir=str(tmp_path / "w"), progress=False)
    assert (swapped["wins"], swapped["losses"]) == (s["losses"], s["wins"])
    assert swapped["win_rate"] == pytest.approx(1 - s["win_rate"])
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["win_rate"] == s["win_rate"] == sum(r["outcome"] for r in rows) / N_PROMPTS
    assert all(r["outcome"] == (1.0 if r["policy_score"] > r["baseline_score"] else
                                0.5 if r["policy_score"] == r["baseline_score"] else 0.0) for r in rows)  # fmt: skip


def test_scores_are_the_reward_models_output(setup, demo_tok, tmp_path):
    """A per-prompt score equals the reward model's logit on the chat-template rendering, computed alone
    (no batch, no padding); the baseline read from a preference file is its chosen answer."""
    from transformers import AutoModelForSequenceClassification

    s = judge(setup.greedy, "builtin:demo/pref_eval.jsonl", setup.rm, output_dir=str(tmp_path), progress=False)
    assert s["n"] == N_PROMPTS and s["unmatched"] == 0
    rows = json.loads((tmp_path / "scores.json").read_text())
    chosen = [i.reference for i in read_prompts("builtin:demo/pref_eval.jsonl", limit=N_PROMPTS)]
    assert [r["baseline_output"] for r in rows] == chosen
    model = AutoModelForSequenceClassification.from_pretrained(setup.rm).eval()
    for r in rows[:3]:
        for side in ("policy", "baseline"):
            text = demo_tok.apply_chat_template(
                instruction_to_messages(r["instruction"]) + [{"role": "assistant", "content": r[f"{side}_output"]}],
                tokenize=False,
            )
            ids = torch.tensor([demo_tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                expected = model(input_ids=ids).logits[0, 0].item()
            assert r[f"{side}_score"] == pytest.approx(expected, abs=1e-5)


def test_judge_errors(setup, demo_tok, tmp_path):
    two = tiny_reward_model(tmp_path / "clf", demo_tok, num_labels=2)
    with pytest.raises(ModelError, match="num_labels"):
        judge(setup.greedy, setup.greedy, two, output_dir=str(tmp_path / "x"), progress=False)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": "unrelated", "output": "x", "generator": "g"}]))
    with pytest.raises(DataError, match="different prompts"):
        judge(setup.greedy, str(other), setup.rm, output_dir=str(tmp_path / "y"), progress=False)
    prompts_only = tmp_path / "p.jsonl"
    prompts_only.write_text('{"instruction": "hi"}\n')
    with pytest.raises(DataError, match="no answer"):
        judge(setup.greedy, str(prompts_only), setup.rm, output_dir=str(tmp_path / "z"), progress=False)


def test_judge_cli(setup, tmp_path, capsys):
    out = run(["judge", "--policy", setup.greedy, "--baseline", setup.sample0, "--reward_model", setup.rm,
               "--output_dir", str(tmp_path), "--progress", "false"])  # fmt: skip
    assert out["n"] == N_PROMPTS
    printed = capsys.readouterr().out
    assert "win rate" in printed and "95% CI" in printed and "Wilson" in printed


# ---------------------------------------------------------------------------------------------- callback


class CountingWinRate(WinRateCallback):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluated_at: list[int] = []

    def evaluate(self, trainer, pl_module):
        self.evaluated_at.append(trainer.global_step)
        return super().evaluate(trainer, pl_module)


def test_callback_logs_win_rate_and_samples(setup, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = CountingWinRate(setup.rm, num_prompts=4, every_n_steps=2, max_new_tokens=4, baseline="reference")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    t = trainer(tmp_path, 4, callbacks=[cb], logger=logger, val_check_interval=2, limit_val_batches=1)
    t.fit(tiny_module(Alright(seed=0)), datamodule=demo_data(limit=64))
    assert cb.evaluated_at == [2, 4] and cb.last_step == 4
    assert set(METRIC_KEYS) <= set(t.logged_metrics)
    assert float(t.logged_metrics["eval/win_rate"]) == cb.last["eval/win_rate"]
    assert cb.last["eval/win_rate_ci_low"] <= cb.last["eval/win_rate"] <= cb.last["eval/win_rate_ci_high"]
    assert len(cb.samples) == 3 and all(s["policy"] is not None for s in cb.samples)
    assert cb.state_dict() == {"last_step": 4}

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert "eval/win_rate" in events.Tags()["scalars"]
    text_tags = [tag for tag in events.Tags()["tensors"] if tag.startswith("eval/samples")]
    assert text_tags and len(events.Tensors(text_tags[0])) == 2
    assert b"**policy**" in events.Tensors(text_tags[0])[-1].tensor_proto.string_val[0]


def test_callback_held_out_prompts_and_chosen(setup, demo_tok):
    """Held-out prompts are the prompt tokens of the validation pairs; 'chosen' is their chosen answer."""
    dm = demo_data(limit=64)
    dm.load()
    cb = WinRateCallback(setup.rm, num_prompts=5, baseline="chosen")
    ids, texts, chosen = cb.held_out(SimpleNamespace(datamodule=dm))
    items = read_prompts("builtin:demo/pref_eval.jsonl", limit=5)
    assert texts == [i.prompt for i in items]
    assert chosen == [i.reference for i in items]
    assert all(seq[0] == demo_tok.bos_token_id for seq in ids)
    with pytest.raises(Exception, match="baseline"):
        WinRateCallback(setup.rm, baseline="nope")


def test_callback_texts_come_from_the_held_out_source_rows(setup, demo_tok):
    """With a seeded val_fraction split the held-out rows are scattered over the training file: the judge's texts
    are those rows' own prompt and whole chosen answer (found by source_row), matching the generation tokens."""
    from xright_pl import Batching, JointDataModule, PreferenceData, SFTData

    path = "builtin:demo/pref_train.jsonl"
    dm = JointDataModule(
        sft=SFTData(path="builtin:demo/sft_train.jsonl", limit=32, max_length=64),
        preference=PreferenceData(path=path, val_fraction=0.25, limit=40, max_length=64),
        batching=Batching(eval_batch_size=8),
    )
    dm.load()
    rows = dm.val_sets["dpo"]["source_row"]
    assert len(rows) == 10 and rows != list(range(10))  # a scattered, seeded selection
    cb = WinRateCallback(setup.rm, num_prompts=6, baseline="chosen")
    ids, texts, chosen = cb.held_out(SimpleNamespace(datamodule=dm))
    items = read_prompts(path, limit=40)
    assert texts == [items[r].instruction for r in rows[:6]]
    assert chosen == [items[r].reference for r in rows[:6]]
    assert [demo_tok.decode(seq, skip_special_tokens=True).strip() for seq in ids] == [t.strip() for t in texts]


def test_callback_with_named_data_sets_takes_the_first_preference_set_or_the_named_one(setup, demo_tok):
    """With data.datasets the held-out prompts are the first preference data set's (prefs), or the named data set's
    own: its rows, its format (prompt_chosen: the preference prompt and chosen answer) and its template (terse)."""
    dm = three_datasets()
    dm.load()
    pref_items = read_prompts("builtin:demo/pref_eval.jsonl", limit=4)
    ids, texts, chosen = WinRateCallback(setup.rm, num_prompts=4).held_out(SimpleNamespace(datamodule=dm))
    assert (texts, chosen) == ([i.instruction for i in pref_items], [i.reference for i in pref_items])
    assert [demo_tok.decode(seq, skip_special_tokens=True).strip() for seq in ids] == [t.strip() for t in texts]
    assert all(seq[0] == demo_tok.bos_token_id for seq in ids)  # the prompt tokens of training: BOS + the prompt
    polite = WinRateCallback(setup.rm, num_prompts=4, dataset="polite").held_out(SimpleNamespace(datamodule=dm))
    assert polite[1:] == (texts, chosen)  # the same rows' prompt and chosen answer, from the SFT set's tokens
    terse = WinRateCallback(setup.rm, num_prompts=3, dataset="terse").held_out(SimpleNamespace(datamodule=dm))
    sft_items = read_prompts("builtin:demo/sft_eval.jsonl", "auto", TERSE_TEMPLATE, 3)
    assert terse[1:] == ([i.instruction for i in sft_items], [i.reference for i in sft_items])
    assert [demo_tok.decode(s, skip_special_tokens=True) for s in terse[0]] == [
        demo_tok.decode(demo_tok(i.prompt, add_special_tokens=False)["input_ids"]) for i in sft_items
    ]  # the template applied, as in training
    with pytest.raises(ConfigError, match=r"dataset='sft'.*no such data set; it has terse, polite, prefs"):
        WinRateCallback(setup.rm, dataset="sft").held_out(SimpleNamespace(datamodule=dm))
    with pytest.raises(ConfigError, match="dataset must be a data set's name"):
        WinRateCallback(setup.rm, dataset="")


def test_callback_prompts_file_is_encoded_with_the_named_data_sets_settings(setup, demo_tok):
    """A prompts file with data.datasets is encoded like the chosen data set's prompts: its template and its
    max_prompt_length (here 4 tokens: BOS + the last 3), not the unused default data.sft/data.preference."""
    from dataclasses import replace

    dm = three_datasets()
    dm.datasets[0] = replace(dm.datasets[0], sft=replace(dm.datasets[0].sft, max_prompt_length=4))
    dm.load()
    cb = WinRateCallback(setup.rm, num_prompts=3, dataset="terse", prompts="builtin:demo/sft_eval.jsonl")
    ids, texts, _ = cb.held_out(SimpleNamespace(datamodule=dm))
    items = read_prompts("builtin:demo/sft_eval.jsonl", "auto", TERSE_TEMPLATE, 3)
    assert texts == [i.instruction for i in items]
    for seq, item in zip(ids, items):
        words = demo_tok(item.prompt, add_special_tokens=False)["input_ids"]
        assert seq == [demo_tok.bos_token_id, *words[-3:]] and item.prompt.startswith("Human:")


def test_callback_logs_win_rate_in_a_named_data_sets_run(setup, tmp_path):
    cb = CountingWinRate(setup.rm, num_prompts=3, every_n_steps=2, max_new_tokens=3, baseline="chosen")
    t = trainer(tmp_path, 2, callbacks=[cb], val_check_interval=2, limit_val_batches=1)
    t.fit(tiny_module(Alright(seed=0)), datamodule=three_datasets())
    assert cb.evaluated_at == [2] and set(METRIC_KEYS) <= set(t.logged_metrics)
    assert [s["baseline"] for s in cb.samples] == [i.reference for i in read_prompts("builtin:demo/pref_eval.jsonl",
                                                                                    limit=3)]  # fmt: skip
