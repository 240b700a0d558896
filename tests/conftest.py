"""Shared test fixtures: the offline sample data folder and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Tiny models on a 2-core machine: one intra-op thread per process is much faster than oversubscribed cores
# (idle threads spin). Set before torch is imported, so subprocesses started by tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# In CI the shared data sits next to the repository: <repo>/../shared/data
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_FALLBACK_TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog. 1, 2, 3 - numbers and punctuation!",
]


def pytest_collection_modifyitems(config, items):
    """``real`` tests (a real model from an extra package) run only when ``-m`` names them (``-m real``)."""
    if "real" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="needs the real SmolLM2 model; opt-in: pytest -m real")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline sample data folder (skips the test when it is missing)."""
    if not (SHARED_DATA / "alpaca_gpt4_sft_train.jsonl").is_file():
        pytest.skip(f"shared sample data not found at {SHARED_DATA} (expected at <repo>/../shared/data)")
    return SHARED_DATA


def _training_texts(n_rows: int = 150) -> list[str]:
    texts = list(_FALLBACK_TEXTS)
    for name in ("alpaca_gpt4_sft_train.jsonl", "hh_rlhf_pref_train.jsonl"):
        path = SHARED_DATA / name
        if not path.is_file():
            continue
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= n_rows:
                    break
                texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    return texts


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A GPT-2-style byte-level BPE (vocab 600) trained in-process, with BOS added in front of every text,
    eos ``<|endoftext|>``, pad ``<|pad|>``, bos ``<|bos|>`` and a ChatML-like chat template. Decoding is
    exact for any text (byte-level), so tests can compare decoded tokens with source strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_training_texts(), trainer)
    bos_id = tk.token_to_id("<|bos|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
