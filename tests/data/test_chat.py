"""Chat rows (xright_pl.data.chat): where a trained turn ends, how long chat prompts are fitted, text rows through
the chat template, and the empty-prompt / smaller-than-a-batch warnings."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest

from xright_pl import Batching, JointDataModule, PreferenceData, SFTData
from xright_pl.core.errors import DataError
from xright_pl.core.types import IGNORE_INDEX
from xright_pl.data.chat import end_of_turn_id, parse_hh
from xright_pl.data.encoding import load_preference, load_sft

#: SmolLM2-Instruct's template (ChatML with a default system turn when the conversation has none).
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: A ChatML prompt, turn by turn, ending with the assistant header.
CHATML_PROMPT = re.compile(r"(<\|im_start\|>(system|user|assistant)\n[^<]*<\|im_end\|>\n)+<\|im_start\|>assistant\n")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def parts(tok, ids, labels) -> tuple[str, list[int]]:
    """The decoded prompt (masked part) and the trained label ids; checks the mask is a prefix."""
    n = sum(lab == IGNORE_INDEX for lab in labels)
    assert all(lab == IGNORE_INDEX for lab in labels[:n]) and labels[n:] == ids[n:]
    return tok.decode(ids[:n]), labels[n:]


@pytest.fixture
def smol_like(tiny_tokenizer):
    """The tiny tokenizer made like SmolLM2-Instruct: bos <|im_start|>, eos <|im_end|>, default system turn."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token, tok.eos_token, tok.chat_template = "<|im_start|>", "<|im_end|>", SMOL_TEMPLATE
    return tok


def asst(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conversation(n_turns: int, words: int = 6) -> list[dict]:
    msgs = []
    for t in range(n_turns):
        msgs.append({"role": "user", "content": " ".join(f"question{t}" for _ in range(words))})
        msgs.append({"role": "assistant", "content": " ".join(f"answer{t}" for _ in range(words))})
    return msgs


# ---------------------------------------------------------------------------------------------- end of turn


def test_end_of_turn_detected_from_template(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tiny_tokenizer) == im_end
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
    assert end_of_turn_id(tok) == tok.eos_token_id
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert end_of_turn_id(tok) is None  # no special token after the content


@pytest.mark.parametrize("variant", ["tiny", "smol_like"])
def test_chat_labels_end_with_end_of_turn(variant, tiny_tokenizer, smol_like, tmp_path):
    """SFT and preference chat rows train through <|im_end|> and nothing after it: no "\\n", no (second) EOS."""
    tok = tiny_tokenizer if variant == "tiny" else smol_like
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    sft = load_sft(SFTData(path=write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), val_fraction=0), tok)
    _, labels = parts(tok, sft.train[0]["input_ids"], sft.train[0]["labels"])
    assert labels == tok("Hello!", add_special_tokens=False)["input_ids"] + [im_end]
    assert sft.train[0]["input_ids"][-1] == im_end and newline[0] not in labels

    pair = {"prompt": msgs[:1], "chosen": msgs[1:], "rejected": [{"role": "assistant", "content": "Go."}]}
    pref = load_preference(PreferenceData(path=write_jsonl(tmp_path / "p.jsonl", [pair]), val_fraction=0), tok)
    for side, text in (("chosen", "Hello!"), ("rejected", "Go.")):
        prompt, labels = parts(tok, pref.train[0][f"{side}_input_ids"], pref.train[0][f"{side}_labels"])
        assert labels == tok(text, add_special_tokens=False)["input_ids"] + [im_end]
        assert prompt.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
        assert prompt.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}") == (variant == "smol_like")


def test_template_without_end_of_turn_token_gets_eos(tiny_tokenizer, tmp_path):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    sft = load_sft(SFTData(path=write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), val_fraction=0), tok)
    _, labels = parts(tok, sft.train[0]["input_ids"], sft.train[0]["labels"])
    assert tok.decode(labels) == "Yo\n\n<|endoftext|>"


# --------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("variant", ["tiny", "smol_like"])
def test_long_chat_prompt_drops_oldest_turns(variant, tiny_tokenizer, smol_like, tmp_path):
    tok = tiny_tokenizer if variant == "tiny" else smol_like
    system = [] if variant == "smol_like" else [{"role": "system", "content": "Be brief."}]
    msgs = system + conversation(6)
    full = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    n_full = len(tok(full, add_special_tokens=False)["input_ids"])
    limit = n_full - 20  # too long by a bit more than one turn
    cfg = SFTData(path=write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}]), val_fraction=0, max_prompt_length=limit)
    ex = load_sft(cfg, tok).train[0]
    prompt, labels = parts(tok, ex["input_ids"], ex["labels"])
    n_prompt = len(ex["input_ids"]) - len(labels)
    assert n_prompt <= limit
    assert CHATML_PROMPT.fullmatch(prompt), prompt  # whole turns, ending with the assistant header
    sys_text = "Be brief." if system else DEFAULT_SYSTEM
    assert prompt.startswith(f"<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>user\n")
    # the oldest turn (user + assistant) is gone, the rest is verbatim
    kept = tok.apply_chat_template(system + msgs[len(system) + 2 : -1], tokenize=False, add_generation_prompt=True)
    assert prompt == kept and "question0" not in prompt and "question5" in prompt
    assert tok.decode(labels) == msgs[-1]["content"] + "<|im_end|>"
    # a multi-turn conversational pair: both sides share the same fitted prompt
    pair = {"prompt": msgs[:-1], "chosen": msgs[-1:], "rejected": [asst("No.")]}
    path = write_jsonl(tmp_path / "p.jsonl", [pair])
    ex = load_preference(PreferenceData(path=path, val_fraction=0, max_prompt_length=limit), tok).train[0]
    for side, text in (("chosen", msgs[-1]["content"]), ("rejected", "No.")):
        p, labels = parts(tok, ex[f"{side}_input_ids"], ex[f"{side}_labels"])
        assert p == kept and tok.decode(labels) == text + "<|im_end|>"


@pytest.mark.parametrize("variant", ["tiny", "smol_like"])
def test_long_user_message_cut_from_its_start(variant, tiny_tokenizer, smol_like, tmp_path):
    tok = tiny_tokenizer if variant == "tiny" else smol_like
    long_text = " ".join(f"word{i}" for i in range(300))
    system = [] if variant == "smol_like" else [{"role": "system", "content": "Be brief."}]
    rows = [
        {
            "prompt": system + [{"role": "user", "content": long_text}],
            "chosen": [asst("Yes.")],
            "rejected": [asst("No.")],
        }
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    out = load_preference(PreferenceData(path=path, val_fraction=0, max_prompt_length=96), tok)
    ex = out.train[0]
    prompt, labels = parts(tok, ex["chosen_input_ids"], ex["chosen_labels"])
    assert len(ex["chosen_input_ids"]) - len(labels) <= 96
    assert CHATML_PROMPT.fullmatch(prompt), prompt
    head, user = prompt.split("<|im_start|>user\n")
    assert head == f"<|im_start|>system\n{'Be brief.' if system else DEFAULT_SYSTEM}<|im_end|>\n"
    content = user.removesuffix("<|im_end|>\n<|im_start|>assistant\n")
    assert content and long_text.endswith(content)  # the user's text lost its start only
    # ... and only as much of it as the budget needs (the BPE's merges, which depend on whether the shared data
    # beside the checkout trained it, decide how many characters that is: 20 to 108 here)
    assert len(ex["chosen_input_ids"]) - len(labels) >= 90
    assert tok.decode(labels) == "Yes.<|im_end|>"


def test_chat_prompt_without_room_is_skipped(smol_like, tmp_path, caplog):
    """The default system turn + user header + assistant header alone exceed max_prompt_length: skipped, counted."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}] * 2
    rows.append({"messages": conversation(1)})
    empty = smol_like.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    tokens = len(smol_like(empty, add_special_tokens=False)["input_ids"])
    cfg = SFTData(path=write_jsonl(tmp_path / "m.jsonl", rows), val_fraction=0, max_prompt_length=tokens)
    with caplog.at_level(logging.WARNING, logger="xright_pl.data.encoding"):
        with pytest.raises(DataError, match="prompt_too_long=3"):
            load_sft(cfg, smol_like)
    assert "prompt_too_long=3" in caplog.text and "leave no room" in caplog.text
    out = load_sft(SFTData(path=cfg.path, val_fraction=0, max_prompt_length=tokens + 1), smol_like)
    assert out.skipped == {"empty_response": 0} and len(out.train) == 3  # one token of the user text fits


# ------------------------------------------------------------------------------- text rows via chat template


def test_alpaca_rows_through_chat_template(shared_data, tiny_tokenizer):
    path = shared_data / "alpaca_gpt4_sft_train.jsonl"
    raw = read_jsonl(path, 30)
    cfg = SFTData(path=str(path), limit=30, val_fraction=0, max_length=4096, max_prompt_length=2048)
    out = load_sft(SFTData(**{**vars(cfg), "use_chat_template": True}), tiny_tokenizer)
    assert len(out.train) == 30 and any(r["input"] for r in raw)
    for r, ex in zip(raw, out.train):
        prompt, labels = parts(tiny_tokenizer, ex["input_ids"], ex["labels"])
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        assert prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        assert tiny_tokenizer.decode(labels) == r["output"] + "<|im_end|>"
    templated = load_sft(
        SFTData(**{**vars(cfg), "use_chat_template": True, "prompt_template": "Task: {instruction}|{input}"}),
        tiny_tokenizer,
    )
    prompt, _ = parts(tiny_tokenizer, templated.train[0]["input_ids"], templated.train[0]["labels"])
    assert (
        prompt
        == f"<|im_start|>user\nTask: {raw[0]['instruction']}|{raw[0]['input']}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_completion_rows_through_chat_template(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "What is 2+2?", "completion": "4"}]
    cfg = SFTData(path=write_jsonl(tmp_path / "pc.jsonl", rows), val_fraction=0, use_chat_template=True)
    ex = load_sft(cfg, tiny_tokenizer).train[0]
    prompt, labels = parts(tiny_tokenizer, ex["input_ids"], ex["labels"])
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(labels) == "4<|im_end|>"


def test_hh_text_rows_through_chat_template(shared_data, tiny_tokenizer, tmp_path):
    """rm-hh-rlhf prompt/chosen/rejected strings and Anthropic whole dialogues give the same chat sequences."""
    raw = read_jsonl(shared_data / "hh_rlhf_pref_train.jsonl", 20)
    kw = {"val_fraction": 0, "max_length": 4096, "max_prompt_length": 4096, "use_chat_template": True}
    pcr = load_preference(
        PreferenceData(path=str(shared_data / "hh_rlhf_pref_train.jsonl"), limit=20, **kw), tiny_tokenizer
    )
    whole = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in raw]
    hh = load_preference(PreferenceData(path=write_jsonl(tmp_path / "hh.jsonl", whole), **kw), tiny_tokenizer)
    assert len(pcr.train) == 20 and pcr.train.to_dict() == hh.train.to_dict()
    for r, ex in zip(raw, pcr.train):
        prompt, labels = parts(tiny_tokenizer, ex["chosen_input_ids"], ex["chosen_labels"])
        assert CHATML_PROMPT.fullmatch(prompt) and "\n\nHuman:" not in prompt and "\n\nAssistant:" not in prompt
        msgs = parse_hh(r["prompt"])
        assert [m["role"] for m in msgs][::2] == ["user"] * ((len(msgs) + 1) // 2)
        assert prompt.count("<|im_start|>") == len(msgs) + 1
        assert tiny_tokenizer.decode(labels) == r["chosen"].strip() + "<|im_end|>"


def test_preference_prompt_template(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ex = load_preference(
        PreferenceData(path=path, val_fraction=0, prompt_template="Q: {prompt} A:"), tiny_tokenizer
    ).train[0]
    prompt, labels = parts(tiny_tokenizer, ex["chosen_input_ids"], ex["chosen_labels"])
    assert prompt == "<|bos|>Q: 2+2? A:" and tiny_tokenizer.decode(labels) == " 4<|endoftext|>"
    ex = load_preference(
        PreferenceData(path=path, val_fraction=0, prompt_template="Q: {prompt}", use_chat_template=True), tiny_tokenizer
    ).train[0]
    prompt, _ = parts(tiny_tokenizer, ex["chosen_input_ids"], ex["chosen_labels"])
    assert prompt == "<|im_start|>user\nQ: 2+2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "kind,row,template,match",
    [
        ("pref", {"prompt": "a", "chosen": "b", "rejected": "c"}, "{instruction}", r"must contain \{prompt\}"),
        ("pref", {"prompt": "a", "chosen": "b", "rejected": "c"}, "Answer:", r"uses no placeholder"),
        ("sft", {"prompt": "a", "completion": "b"}, "{prompt} {extra}", r"may use only \{prompt\}"),
        ("sft", {"instruction": "a", "output": "b"}, "{input} only", r"must contain \{instruction\}"),
        (
            "pref",
            {"prompt": [{"role": "user", "content": "a"}], "chosen": [], "rejected": []},
            "{prompt}",
            "chat template",
        ),
    ],
)
def test_prompt_template_that_does_not_fit(kind, row, template, match, tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    cfg = (SFTData if kind == "sft" else PreferenceData)(path=path, val_fraction=0, prompt_template=template)
    with pytest.raises(DataError, match=match) as e:
        (load_sft if kind == "sft" else load_preference)(cfg, tiny_tokenizer)
    assert "rows.jsonl" in str(e.value) and "prompt_template" in str(e.value)


def test_use_chat_template_needs_a_chat_template(tiny_tokenizer, tmp_path):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="use_chat_template=True") as e:
        load_sft(SFTData(path=path, val_fraction=0, use_chat_template=True), tok)
    assert "a.jsonl" in str(e.value) and "chat_template" in str(e.value) and "use_chat_template=False" in str(e.value)


# ------------------------------------------------------------------------------------------ data warnings


def test_whitespace_prompts_are_skipped_and_counted(tiny_tokenizer, tmp_path, caplog):
    sft_rows = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "  \n", "input": " ", "output": "hi"},
        {"instruction": "\t", "output": "hi"},
    ]
    pairs = [
        {"prompt": "Q", "chosen": " yes", "rejected": " no"},
        {"prompt": "   ", "chosen": " yes", "rejected": " no"},
        {"prompt": "\n\nHuman:  \n\nAssistant:", "chosen": " yes", "rejected": " no"},
    ]
    with caplog.at_level(logging.WARNING, logger="xright_pl.data.encoding"):
        sft = load_sft(SFTData(path=write_jsonl(tmp_path / "s.jsonl", sft_rows), val_fraction=0), tiny_tokenizer)
        pref = load_preference(
            PreferenceData(path=write_jsonl(tmp_path / "p.jsonl", pairs), val_fraction=0), tiny_tokenizer
        )
    assert sft.skipped == {"empty_response": 0, "empty_prompt": 2} and len(sft.train) == 1
    assert pref.skipped == {"empty_response": 0, "identical_pair": 0, "no_shared_prompt": 0, "empty_prompt": 2}
    assert len(pref.train) == 1 and pref.train[0]["source_row"] == 0
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 2 and all("empty_prompt=2" in w and "empty or whitespace" in w for w in warns)
    assert "s.jsonl" in warns[0] and "p.jsonl" in warns[1]


def test_data_smaller_than_a_batch_warns_once(tiny_tokenizer, tmp_path, caplog):
    sft = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q", "completion": "A"}])
    pairs = [{"prompt": f"Q{i}", "chosen": " yes", "rejected": " no"} for i in range(4)]
    dm = JointDataModule(
        sft=SFTData(path=sft, val_fraction=0),
        preference=PreferenceData(path=write_jsonl(tmp_path / "p.jsonl", pairs), val_fraction=0),
        batching=Batching(sft_batch_size=8, dpo_batch_size=4),
    )
    dm.tokenizer = tiny_tokenizer
    dm.train_sets = {
        "sft": load_sft(dm.sft, tiny_tokenizer).train,
        "dpo": load_preference(dm.preference, tiny_tokenizer).train,
    }
    with caplog.at_level(logging.WARNING, logger="xright_pl.data.module"):
        dm.train_dataloader()
        dm.train_dataloader()  # rebuilt (e.g. reload_dataloaders_every_n_epochs): no second warning
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1, warns  # dpo: 4 pairs fill a batch of 4
    assert "sft training set has 1 row(s)" in warns[0] and "sft_batch_size=8" in warns[0]
    assert "batching.sft_batch_size" in warns[0]


# ---------------------------------------------------------------------------------- generation = training prompt


@pytest.mark.parametrize("variant", ["tiny", "smol_like"])
def test_generation_prompts_are_the_training_prompts(variant, tiny_tokenizer, smol_like, shared_data, tmp_path):
    """``generate`` builds a prompt token for token as training does: long multi-turn chat prompts fitted by
    whole turns (not cut from the left), and HH text prompts through the chat template with use_chat_template."""
    from xright_pl.inference.prompts import PromptEncoder

    tok = smol_like if variant == "smol_like" else tiny_tokenizer
    rows = [{"messages": [*conversation(n), asst("Fine.")]} for n in (1, 4, 8)]
    cfg = SFTData(path=write_jsonl(tmp_path / "chat.jsonl", rows), val_fraction=0, max_prompt_length=96)
    train = load_sft(cfg, tok).train
    encode = PromptEncoder(tok, 96)
    for row, ids, labels in zip(rows, train["input_ids"], train["labels"]):
        n = sum(lab == IGNORE_INDEX for lab in labels)
        assert encode(row["messages"][:-1]) == ids[:n]
    hh = read_jsonl(shared_data / "hh_rlhf_pref_train.jsonl", 20)
    cfg = PreferenceData(path=write_jsonl(tmp_path / "hh.jsonl", hh), val_fraction=0, max_prompt_length=128)
    cfg.use_chat_template = True
    pref = load_preference(cfg, tok).train
    encode = PromptEncoder(tok, 128, use_chat_template=True)
    assert len(pref) == 20
    for row, ids, labels in zip(hh, pref["chosen_input_ids"], pref["chosen_labels"]):
        n = sum(lab == IGNORE_INDEX for lab in labels)
        assert encode(row["prompt"]) == ids[:n]
