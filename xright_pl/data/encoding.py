"""Loading, validating and tokenizing SFT and preference data.

The pipeline for one source is: read the rows (:mod:`xright_pl.data.readers`: local ``.jsonl``/``.json``
parsed there, ``.parquet`` and hub names through :func:`datasets.load_dataset`), detect the row format and
validate every row's fields and types (:mod:`xright_pl.data.formats`: a :class:`DataError` names the source, the
row, the field and the fix), then tokenize once here with :meth:`datasets.Dataset.map`. Text rows: prompt and
response are tokenized separately and concatenated as ``prompt_ids + response_ids + [eos]``. Chat rows (message
lists, or text rows with ``use_chat_template``) are rendered with the tokenizer's chat template and trained
through the end-of-turn token, with long prompts fitted turn by turn (:mod:`xright_pl.data.chat`). Labels are
:data:`~xright_pl.core.types.IGNORE_INDEX` on the prompt. Rows with no response tokens, with an empty prompt, whose
chat prompt cannot be fitted, and preference pairs whose two responses are the same text, are skipped and
counted (one ``WARNING`` log line per source, counts in :attr:`LoadedData.skipped`, see :data:`SKIP_REASONS`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets

from xright_pl.core.assets import resolve
from xright_pl.core.errors import DataError
from xright_pl.core.types import IGNORE_INDEX
from xright_pl.data.chat import ChatEncoder, has_chat_template
from xright_pl.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    _check_format,
    _check_prompt_template,
    _optional_fields,
    _prompt_is_empty,
    _raw_sft_prompt,
    _required_fields,
    _response_text,
    _split_preference_row,
    _validate,
    detect_preference_format,
    detect_sft_format,
    format_preference_row,
    format_sft_row,
)
from xright_pl.data.readers import _looks_like_path, _read_source
from xright_pl.data.specs import PreferenceData, SFTData, eval_source

log = logging.getLogger(__name__)

#: Skip reasons always listed in :attr:`LoadedData.skipped` (with 0 when none); ``OPTIONAL_SKIP_KEYS`` are listed
#: when they occur.
SFT_SKIP_KEYS = ("empty_response",)
PREFERENCE_SKIP_KEYS = ("empty_response", "identical_pair", "no_shared_prompt")
OPTIONAL_SKIP_KEYS = ("empty_prompt", "prompt_too_long")
#: What each skip reason means (the skip warning prints the ones that occurred).
SKIP_REASONS = {
    "empty_response": "no response tokens (empty text, or no room left after the prompt: raise max_length or "
    "lower max_prompt_length)",
    "identical_pair": "chosen equals rejected",
    "no_shared_prompt": "the pair shares no prompt",
    "empty_prompt": "the prompt text is empty or whitespace",
    "prompt_too_long": "a chat prompt whose system turn, last user turn and assistant header leave no room "
    "for the user's text within max_prompt_length",
}

# Serialized rows (local JSON files) travel through ``datasets`` as one JSON string per row, so that
# heterogeneous extra fields and message dicts never meet Arrow's type inference.
_ROW_COLUMN = "_xright_row"
_SKIP_COLUMN = "_xright_skip"
#: Column of the tokenized sets: the row's position in its source file (after ``limit``), to find its text again.
SOURCE_ROW_COLUMN = "source_row"


@dataclass
class LoadedData:
    """Tokenized train and held-out data, and how many rows were skipped (summed over sources)."""

    train: datasets.Dataset
    val: datasets.Dataset | None
    skipped: dict[str, int]
    skipped_by_source: dict[str, dict[str, int]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str, chat_template: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer with ``AutoTokenizer.from_pretrained`` and make it ready for padding.

    ``builtin:`` names resolve to the package assets. A local-looking path that does not exist raises
    :class:`DataError`. Without a pad token the EOS token is used as pad (with a warning); a tokenizer
    with neither is an error. ``chat_template`` (template text, or a path to a ``.jinja`` file) replaces
    the tokenizer's chat template.
    """
    from transformers import AutoTokenizer

    resolved = resolve(name_or_path)
    expanded = os.path.expanduser(resolved)
    if not os.path.exists(expanded) and (_looks_like_path(resolved) or name_or_path.startswith("builtin:")):
        raise DataError(
            f"Tokenizer {name_or_path!r}: the local path {expanded!r} does not exist. Pass an existing "
            "tokenizer folder (with tokenizer.json / tokenizer_config.json), a builtin: asset, or a hub name "
            "such as 'gpt2'."
        )
    try:
        tok = AutoTokenizer.from_pretrained(expanded, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - library errors become one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"Tokenizer {name_or_path!r} could not be loaded ({type(e).__name__}: {first}). "
            "Check the name or path; hub names need network access or a filled local cache; pass "
            "trust_remote_code=True only for tokenizers that need custom code."
        ) from None
    if chat_template is not None:
        tpl_path = os.path.expanduser(resolve(chat_template))
        if "{" not in chat_template and os.path.isfile(tpl_path):
            chat_template = Path(tpl_path).read_text(encoding="utf-8")
        tok.chat_template = chat_template
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise DataError(
                f"Tokenizer {name_or_path!r} has neither a pad token nor an EOS token; sequences need "
                "an EOS. Use a tokenizer that defines eos_token (or set it in its tokenizer_config.json)."
            )
        tok.pad_token = tok.eos_token
        msg = (
            f"Tokenizer {name_or_path!r} has no pad token; using the EOS token {tok.eos_token!r} as pad "
            "(padding is masked by attention_mask and labels, so the EOS is still learned)."
        )
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    return tok


# ---------------------------------------------------------------------------------------- tokenization


@dataclass
class _Item:
    """One row ready to tokenize: a text or chat prompt, its response(s), and a skip reason ("" = keep)."""

    prompt: str | list
    responses: list
    chat: bool
    skip: str = ""


class _Encoder:
    """Tokenizes rows into ``input_ids``/``labels`` with truncation (chat rows through :class:`ChatEncoder`)."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, name: str):
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.name = name
        self.eos_id = tokenizer.eos_token_id
        self.eos = tokenizer.eos_token
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        # the special tokens the tokenizer adds in front of a text by default (e.g. BOS); trailing ones
        # (an EOS some tokenizers append) are dropped since the response side brings its own EOS
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.prefix = next(
            (full[:i] for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), []
        )

    @cached_property
    def chat(self) -> ChatEncoder:
        return ChatEncoder(self.tok, self.max_prompt_length, self.name)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def text_prompt(self, ids: list[int]) -> list[int]:
        """The tokenizer's leading special tokens + ``ids``, cut from the left (keeping those tokens)."""
        pid = list(self.prefix) + ids
        keep = len(self.prefix) if self.prefix else int(bool(pid) and self.bos_id is not None and pid[0] == self.bos_id)
        if len(pid) > self.max_prompt_length:
            tail = self.max_prompt_length - keep
            pid = pid[:keep] + (pid[len(pid) - tail :] if tail > 0 else [])
            pid = pid[: self.max_prompt_length]
        return pid

    def sequence(self, pid: list[int], rid: list[int]) -> tuple[list[int], list[int]] | None:
        """``(input_ids, labels)`` with the response cut from the right to fit; None when none of it fits."""
        rid = rid[: max(self.max_length - len(pid), 0)]
        return (pid + rid, [IGNORE_INDEX] * len(pid) + rid) if rid else None

    def encode(self, items: list[_Item], where: list[str]) -> list[list[tuple[list[int], list[int]]] | None]:
        """Per row, ``(input_ids, labels)`` per response; None for a skipped row (its reason set on the item:
        ``prompt_too_long`` for a chat prompt that cannot be fitted, ``empty_response`` for a response with no
        room left)."""
        text = [k for k, it in enumerate(items) if not it.skip and not it.chat]
        p_ids = dict(zip(text, self._ids([items[k].prompt for k in text])))
        r_ids = iter(self._ids([r for k in text for r in items[k].responses]))
        out: list = []
        for k, it in enumerate(items):
            if it.skip:
                out.append(None)
                continue
            if it.chat:
                parts = self.chat.encode(it.prompt, it.responses, where[k])
                if parts is None:
                    it.skip = "prompt_too_long"
                    out.append(None)
                    continue
                pid, rids = parts
            else:
                pid = self.text_prompt(p_ids[k])
                rids = [next(r_ids) + [self.eos_id] for _ in it.responses]
            seqs = [self.sequence(pid, rid) for rid in rids]
            if any(s is None for s in seqs):
                it.skip, seqs = "empty_response", None
            out.append(seqs)
        return out


def _needs_chat(prompt: Any, responses: Sequence[Any]) -> bool:
    return isinstance(prompt, list) or any(isinstance(r, list) for r in responses)


def _batch_rows(batch: dict[str, list], columns: list[str]) -> list[dict]:
    if _ROW_COLUMN in batch:
        return [json.loads(s) for s in batch[_ROW_COLUMN]]
    cols = [c for c in columns if c in batch]
    return [dict(zip(cols, vals)) for vals in zip(*(batch[c] for c in cols))]


def _prepare(kind: str, fmt: str, row: dict, template: str | None, use_chat: bool) -> _Item:
    """Format one row and decide whether it is skipped before tokenization."""
    if kind == "sft":
        raw_prompt = _raw_sft_prompt(row, fmt)
        parts: tuple | None = format_sft_row(row, fmt, template, use_chat)
    else:
        split = _split_preference_row(row, fmt)
        if split is None:
            return _Item("", [], False, "no_shared_prompt")
        raw_prompt = split[0]
        parts = format_preference_row(row, fmt, template, use_chat)
    prompt, *responses = parts
    reason = ""
    if any(not _response_text(r).strip() for r in responses):
        reason = "empty_response"
    elif _prompt_is_empty(raw_prompt):
        reason = "empty_prompt"
    elif kind == "preference" and responses[0] == responses[1]:
        reason = "identical_pair"
    return _Item(prompt, responses, _needs_chat(prompt, responses), reason)


def _make_map_fn(kind: str, fmt: str, enc: _Encoder, template: str | None, columns: list[str], use_chat: bool):
    name = enc.name

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        items = [_prepare(kind, fmt, row, template, use_chat) for row in _batch_rows(batch, columns)]
        for idx, it in zip(indices, items):
            if it.chat and not it.skip and not has_chat_template(enc.tok):
                raise DataError(
                    f"{name}: row {idx}: conversational rows need a chat template, but the tokenizer has "
                    "none. Pass `chat_template` to load_tokenizer or use a chat (instruct) tokenizer."
                )
        encoded = enc.encode(items, [f"row {idx}" for idx in indices])
        out: dict[str, list] = {SOURCE_ROW_COLUMN: list(indices), _SKIP_COLUMN: [it.skip for it in items]}
        sides = ("",) if kind == "sft" else ("chosen_", "rejected_")
        for j, side in enumerate(sides):
            out[f"{side}input_ids"] = [e[j][0] if e else [] for e in encoded]
            out[f"{side}labels"] = [e[j][1] if e else [] for e in encoded]
        if kind == "sft":
            out["num_response_tokens"] = [sum(t != IGNORE_INDEX for t in lab) for lab in out["labels"]]
        return out

    return fn


def _features(kind: str) -> datasets.Features:
    ids = datasets.Sequence(datasets.Value("int32"))
    if kind == "sft":
        cols = {"input_ids": ids, "labels": ids, "num_response_tokens": datasets.Value("int32")}
    else:
        cols = {f"{s}_{c}": ids for s in ("chosen", "rejected") for c in ("input_ids", "labels")}
    return datasets.Features(
        {**cols, SOURCE_ROW_COLUMN: datasets.Value("int64"), _SKIP_COLUMN: datasets.Value("string")}
    )


def _load_one(
    kind: str, cfg: SFTData | PreferenceData, path: str, split: str | None, tokenizer
) -> tuple[datasets.Dataset, dict[str, int], str]:
    raw = _read_source(path, split, cfg.limit)
    valid = SFT_FORMATS if kind == "sft" else PREFERENCE_FORMATS
    _check_format(cfg.format, valid, raw.name)
    fmt = cfg.format
    if fmt == "auto":
        detect = detect_sft_format if kind == "sft" else detect_preference_format
        fmt = detect(raw.first(), raw.name)
    _validate(raw, fmt)
    if tokenizer.eos_token_id is None:
        raise DataError(f"{raw.name}: the tokenizer has no EOS token; load it with load_tokenizer().")
    if cfg.max_length < 2 or cfg.max_prompt_length < 1:
        raise DataError(
            f"{raw.name}: max_length={cfg.max_length} / max_prompt_length={cfg.max_prompt_length} "
            "are too small; use max_length >= 2 and max_prompt_length >= 1."
        )
    template, use_chat = cfg.prompt_template, cfg.use_chat_template
    _check_prompt_template(template, fmt, raw.name)
    if use_chat and not has_chat_template(tokenizer):
        raise DataError(
            f"{raw.name}: use_chat_template=True, but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '') or ''!r} has no chat template. Use a chat (instruct) "
            "tokenizer, pass the data module's `chat_template`, or set use_chat_template=False."
        )
    columns = list(_required_fields(fmt)) + list(_optional_fields(fmt))
    if raw.rows is not None:
        ds = datasets.Dataset.from_dict(
            {_ROW_COLUMN: [json.dumps({c: r[c] for c in columns if c in r}) for r in raw.rows]}
        )
    else:
        ds = raw.dataset
    enc = _Encoder(tokenizer, cfg.max_length, cfg.max_prompt_length, raw.name)
    fn = _make_map_fn(kind, fmt, enc, template, columns, use_chat)
    ds = ds.map(
        fn,
        batched=True,
        with_indices=True,
        num_proc=cfg.num_proc,
        remove_columns=ds.column_names,
        features=_features(kind),
        desc=f"Tokenizing {kind} data",
    )
    reasons = Counter(ds[_SKIP_COLUMN])
    keys = SFT_SKIP_KEYS if kind == "sft" else PREFERENCE_SKIP_KEYS
    skipped = {k: reasons.get(k, 0) for k in keys}
    skipped.update({k: reasons[k] for k in OPTIONAL_SKIP_KEYS if reasons.get(k)})
    n_total = len(ds)
    if any(skipped.values()):
        log.warning(
            "%s: skipped %d of %d rows (%s). %s.",
            raw.name,
            sum(skipped.values()),
            n_total,
            ", ".join(f"{k}={v}" for k, v in skipped.items() if v),
            "; ".join(f"{k} = {SKIP_REASONS[k]}" for k, v in skipped.items() if v),
        )
        ds = ds.filter(lambda s: [x == "" for x in s], batched=True, input_columns=[_SKIP_COLUMN])
    ds = ds.remove_columns(_SKIP_COLUMN)
    if len(ds) == 0:
        raise DataError(
            f"{raw.name}: no rows left after filtering ({n_total} read; skipped "
            f"{', '.join(f'{k}={v}' for k, v in skipped.items())}). Check the data, the format, and that "
            "max_length leaves room for responses after max_prompt_length."
        )
    return ds, skipped, raw.name


def _split_val(ds: datasets.Dataset, fraction: float, seed: int, name: str):
    if not 0 <= fraction < 1:
        raise DataError(f"{name}: val_fraction={fraction} must be in [0, 1). Use 0 to disable validation.")
    if fraction == 0:
        return ds, None
    n = len(ds)
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(
            f"{name}: only {n} rows; val_fraction={fraction} leaves none for training. Lower val_fraction, "
            "give an eval_path, or use more rows."
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = sorted(order[:n_val])
    train_idx = sorted(order[n_val:])
    return ds.select(train_idx), ds.select(val_idx)


def _load(kind: str, cfg: SFTData | PreferenceData, tokenizer, seed: int) -> LoadedData:
    train, skipped, name = _load_one(kind, cfg, cfg.path, cfg.split, tokenizer)
    by_source = {name: skipped}
    total = Counter(skipped)
    held_out = eval_source(cfg)
    if held_out is not None:
        val, v_skipped, v_name = _load_one(kind, cfg, *held_out, tokenizer)
        by_source[v_name] = v_skipped
        total.update(v_skipped)
    else:
        train, val = _split_val(train, cfg.val_fraction, seed, name)
    return LoadedData(train=train, val=val, skipped=dict(total), skipped_by_source=by_source)


def load_sft(cfg: SFTData, tokenizer, seed: int = 0) -> LoadedData:
    """Load, validate and tokenize SFT data (columns ``input_ids``, ``labels``, ``num_response_tokens``)."""
    return _load("sft", cfg, tokenizer, seed)


def load_preference(cfg: PreferenceData, tokenizer, seed: int = 0) -> LoadedData:
    """Load, validate and tokenize preference pairs (``chosen_``/``rejected_`` ``input_ids``, ``labels``)."""
    return _load("preference", cfg, tokenizer, seed)
