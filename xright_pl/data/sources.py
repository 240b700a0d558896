"""Loading, validating and tokenizing SFT and preference data.

The pipeline for one source is: read the rows (local ``.jsonl``/``.json`` parsed here, ``.parquet`` and hub
names through :func:`datasets.load_dataset`), detect the row format, validate every row's fields and types
(a :class:`DataError` names the source, the row, the field and the fix), then tokenize once with
:meth:`datasets.Dataset.map`. Text rows: prompt and response are tokenized separately and concatenated as
``prompt_ids + response_ids + [eos]``. Chat rows (message lists, or text rows with ``use_chat_template``) are
rendered with the tokenizer's chat template and trained through the end-of-turn token, with long prompts fitted
turn by turn (:mod:`xright_pl.data.chat`). Labels are :data:`~xright_pl.types.IGNORE_INDEX` on the prompt.
Rows with no response tokens, with an empty prompt, whose chat prompt cannot be fitted, and preference pairs
whose two responses are the same text, are skipped and counted (one ``WARNING`` log line per source, counts in
:attr:`LoadedData.skipped`, see :data:`SKIP_REASONS`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import string
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets

from xright_pl.assets import resolve
from xright_pl.data.chat import HH_TURN, ChatEncoder, has_chat_template, text_to_messages
from xright_pl.errors import DataError
from xright_pl.types import IGNORE_INDEX

log = logging.getLogger(__name__)

SFT_FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "prompt_chosen")
PREFERENCE_FORMATS = ("auto", "prompt_chosen_rejected", "hh", "conversational")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
HH_ASSISTANT = "\n\nAssistant:"

#: The standard Stanford Alpaca prompts (with and without ``input``).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

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


# --------------------------------------------------------------------------------------------- configs


@dataclass
class SFTData:
    """Where the SFT data comes from and how it is turned into token ids."""

    path: str
    """Local .json/.jsonl/.parquet file, a ``builtin:<file>`` asset, or a Hugging Face hub dataset name."""
    split: str = "train"
    """Split to read when ``path`` is a hub dataset (local files have a single split)."""
    eval_path: str | None = None
    """Held-out source (a file or hub name, read like ``path``); for hub data see also ``eval_split``."""
    eval_split: str | None = None
    """Split used as held-out data: of ``eval_path`` if given, else of the hub dataset ``path``."""
    val_fraction: float = 0.05
    """Seeded fraction of the train rows held out when no eval source is given; 0 disables validation."""
    format: str = "auto"
    """Row format: auto, alpaca (instruction/input/output), prompt_completion, messages (chat), or prompt_chosen
    (the prompt and chosen answer of preference rows, e.g. SFT on HH-RLHF's preferred answers; never detected)."""
    max_length: int = 512
    """Maximum tokens per sequence (prompt + response + EOS); the response is cut from the right."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; longer text prompts are cut from the left (a leading BOS is kept); longer chat
    prompts lose whole earlier turns, then the start of the user's text (system turn and assistant header
    kept; see :mod:`xright_pl.data.chat`)."""
    limit: int | None = None
    """Use only the first N rows of each source (smoke runs); None uses all."""
    prompt_template: str | None = None
    """Prompt template with {instruction}/{input} (alpaca) or {prompt} (prompt_completion) placeholders;
    None uses the standard Alpaca template (the with-input variant when ``input`` is non-empty); with
    ``use_chat_template`` None makes the user message the instruction (plus a blank line and the input)."""
    use_chat_template: bool = False
    """Render alpaca and prompt_completion text rows with the tokenizer's chat template: the (templated)
    prompt becomes one user message (an HH dialogue text becomes its turns), the response the assistant
    turn. Message-list rows always use the chat template."""
    num_proc: int | None = None
    """Worker processes for tokenization (``Dataset.map(num_proc=...)``); None tokenizes in-process."""


@dataclass
class PreferenceData:
    """Where the preference (DPO) data comes from and how it is turned into token ids."""

    path: str
    """Local .json/.jsonl/.parquet file, a ``builtin:<file>`` asset, or a Hugging Face hub dataset name."""
    split: str = "train"
    """Split to read when ``path`` is a hub dataset (local files have a single split)."""
    eval_path: str | None = None
    """Held-out source (a file or hub name, read like ``path``); for hub data see also ``eval_split``."""
    eval_split: str | None = None
    """Split used as held-out data: of ``eval_path`` if given, else of the hub dataset ``path``."""
    val_fraction: float = 0.05
    """Seeded fraction of the train pairs held out when no eval source is given; 0 disables validation."""
    format: str = "auto"
    """Row format: auto, prompt_chosen_rejected (rm-hh-rlhf style strings), hh (Anthropic HH whole
    dialogues sharing a prefix), or conversational (TRL-style message lists, rendered with the chat
    template)."""
    max_length: int = 512
    """Maximum tokens per sequence (prompt + response + EOS); responses are cut from the right."""
    max_prompt_length: int = 256
    """Maximum prompt tokens; longer text prompts are cut from the left (a leading BOS is kept); longer chat
    prompts lose whole earlier turns, then the start of the user's text (system turn and assistant header
    kept; see :mod:`xright_pl.data.chat`)."""
    limit: int | None = None
    """Use only the first N rows of each source (smoke runs); None uses all."""
    prompt_template: str | None = None
    """Template of the prompt text of prompt_chosen_rejected and hh rows, with a {prompt} placeholder (e.g. the
    SFT part's template, so both share one format); None uses the prompt as it is."""
    use_chat_template: bool = False
    """Render text rows with the tokenizer's chat template: an HH dialogue prompt (``\\n\\nHuman: ...
    \\n\\nAssistant:``) becomes its user/assistant turns (responses lose their leading space), any other
    prompt one user message. Conversational rows always use the chat template."""
    num_proc: int | None = None
    """Worker processes for tokenization (``Dataset.map(num_proc=...)``); None tokenizes in-process."""


@dataclass
class LoadedData:
    """Tokenized train and held-out data, and how many rows were skipped (summed over sources)."""

    train: datasets.Dataset
    val: datasets.Dataset | None
    skipped: dict[str, int]
    skipped_by_source: dict[str, dict[str, int]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- tokenizer


def _looks_like_path(s: str) -> bool:
    if s.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    # hub ids are "name" or "owner/name": a second separator (or a Windows one) means a path
    return s.count("/") >= 2 or (os.sep != "/" and os.sep in s)


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


# ---------------------------------------------------------------------------------------- raw reading


@dataclass
class _Raw:
    """Rows of one source before tokenization: either parsed python dicts or a ``datasets.Dataset``."""

    name: str
    rows: list[dict] | None = None
    lines: list[int] | None = None  # 1-based line numbers of ``rows`` (JSONL only)
    dataset: datasets.Dataset | None = None

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"row {i} (line {self.lines[i]})"
        return f"row {i}"

    def first(self) -> dict:
        return self.rows[0] if self.rows is not None else self.dataset[0]

    def iter_rows(self, columns: Sequence[str]) -> Iterable[dict]:
        if self.rows is not None:
            return iter(self.rows)
        cols = [c for c in columns if c in self.dataset.column_names]
        return iter(self.dataset.select_columns(cols))


def _read_jsonl(path: str, name: str, limit: int | None) -> _Raw:
    data = Path(path).read_bytes()
    rows: list[dict] = []
    lines: list[int] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if limit is not None and len(rows) >= limit:
            break
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{name}: line {lineno} (row {len(rows)}) is not valid UTF-8 (byte {e.start} of the line: "
                f"{e.reason}). Re-encode the file as UTF-8."
            ) from None
        if lineno == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{name}: line {lineno} (row {len(rows)}) is not valid JSON: {e.msg} at column {e.colno}. "
                "Each line of a .jsonl file must be one complete JSON object."
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{name}: line {lineno} (row {len(rows)}) is a JSON {type(obj).__name__}, not an object. "
                'Each line must be a JSON object such as {"prompt": ..., "chosen": ...}.'
            )
        rows.append(obj)
        lines.append(lineno)
    if not rows:
        raise DataError(f"{name}: the file is empty (no JSON rows). Point `path` at a file with data.")
    return _Raw(name=name, rows=rows, lines=lines)


def _read_json(path: str, name: str, limit: int | None) -> _Raw:
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        lineno = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{name}: line {lineno} is not valid UTF-8 ({e.reason}). Re-encode the file as UTF-8."
        ) from None
    if not text.strip():
        raise DataError(f"{name}: the file is empty (no JSON rows). Point `path` at a file with data.")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a JSON Lines file named .json
            return _read_jsonl(path, name, limit)
        raise DataError(
            f"{name}: line {e.lineno} is not valid JSON: {e.msg} at column {e.colno}. A .json file must hold "
            "one JSON array of objects (or be JSON Lines, one object per line)."
        ) from None
    if isinstance(obj, dict):
        raise DataError(
            f"{name}: the top-level JSON value is an object; expected an array of row objects "
            f"(or JSON Lines). Top-level keys: {sorted(obj)[:10]}."
        )
    if not isinstance(obj, list):
        raise DataError(f"{name}: the top-level JSON value is a {type(obj).__name__}; expected an array of rows.")
    if not obj:
        raise DataError(f"{name}: the file holds an empty array (no rows). Point `path` at a file with data.")
    if limit is not None:
        obj = obj[:limit]
    for i, r in enumerate(obj):
        if not isinstance(r, dict):
            raise DataError(
                f"{name}: row {i} is a JSON {type(r).__name__}, not an object. The array must hold objects."
            )
    return _Raw(name=name, rows=obj)


def _is_hub_name(path: str) -> bool:
    return not (path.endswith(LOCAL_SUFFIXES) or _looks_like_path(path) or os.path.exists(path))


def _read_source(path: str, split: str | None, limit: int | None) -> _Raw:
    resolved = os.path.expanduser(resolve(path))
    name = resolved
    if not _is_hub_name(resolved):
        if os.path.isdir(resolved):
            raise DataError(
                f"{name}: is a directory, not a data file. Point `path` at a .jsonl, .json or .parquet file inside it."
            )
        if not os.path.exists(resolved):
            raise DataError(
                f"{name}: file not found (working directory {os.getcwd()}). Check the path, or use a "
                "builtin:<file> asset or a hub dataset name."
            )
        if split not in (None, "train"):
            raise DataError(
                f"{name}: a local file has no split {split!r}. Pass the held-out file as `eval_path` "
                "instead of `eval_split`/`split`."
            )
        if resolved.endswith(".jsonl"):
            return _read_jsonl(resolved, name, limit)
        if resolved.endswith(".json"):
            return _read_json(resolved, name, limit)
        if resolved.endswith(".parquet"):
            try:
                ds = datasets.load_dataset("parquet", data_files=resolved, split="train")
            except Exception as e:  # noqa: BLE001
                raise DataError(
                    f"{name}: could not be read as parquet ({type(e).__name__}: {e}). Check the file."
                ) from None
        else:
            raise DataError(
                f"{name}: unsupported file type. Use a .jsonl, .json or .parquet file, or a hub dataset name."
            )
    else:
        split = split or "train"
        name = f"{resolved} (hub, split {split!r})"
        try:
            ds = datasets.load_dataset(resolved, split=split)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(
                f"{name}: datasets.load_dataset failed ({type(e).__name__}: {first}). Check the dataset "
                "name and split, network access / HF_TOKEN, or pass a local .jsonl/.json/.parquet file."
            ) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split is always passed
        raise DataError(f"{name}: got several splits {list(ds)}; set `split`.")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{name}: the data set has no rows. Point `path` at non-empty data.")
    return _Raw(name=name, dataset=ds)


# ----------------------------------------------------------------------------------- format detection


def _check_format(fmt: str, valid: Sequence[str], name: str) -> None:
    if fmt not in valid:
        raise DataError(
            f"{name}: unknown format {fmt!r}. Valid formats: {', '.join(valid)}. Set `format` to one of them "
            "(auto detects from the first row's fields)."
        )


def detect_sft_format(row: dict, name: str = "data") -> str:
    """Return the SFT format of ``row`` from its keys: messages, alpaca or prompt_completion."""
    if isinstance(row.get("messages"), list):
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise DataError(
        f"{name}: row 0 has keys {sorted(row)}, which match no SFT format. Expected 'instruction'+'output' "
        "(alpaca, optional 'input'), 'prompt'+'completion' (prompt_completion) or 'messages' (a list of "
        "{role, content}). Rename the fields or set `format` explicitly."
    )


def detect_preference_format(row: dict, name: str = "data") -> str:
    """Return the preference format of ``row``: conversational, prompt_chosen_rejected or hh."""
    if "chosen" in row and "rejected" in row:
        if isinstance(row["chosen"], list) or isinstance(row.get("prompt"), list):
            return "conversational"
        if "prompt" in row:
            return "prompt_chosen_rejected"
        return "hh"
    raise DataError(
        f"{name}: row 0 has keys {sorted(row)}, which match no preference format. Expected 'prompt'+'chosen'+"
        "'rejected' (prompt_chosen_rejected or conversational) or 'chosen'+'rejected' whole dialogues (hh). "
        "Rename the fields or set `format` explicitly."
    )


# ------------------------------------------------------------------------------------------ validation

_STR = (str,)
_STR_OR_LIST = (str, list)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _required_fields(fmt: str) -> dict[str, tuple[type, ...]]:
    return {
        "alpaca": {"instruction": _STR, "output": _STR},
        "prompt_completion": {"prompt": _STR_OR_LIST, "completion": _STR_OR_LIST},
        "prompt_chosen": {"prompt": _STR, "chosen": _STR},
        "messages": {"messages": (list,)},
        "prompt_chosen_rejected": {"prompt": _STR, "chosen": _STR, "rejected": _STR},
        "hh": {"chosen": _STR, "rejected": _STR},
        "conversational": {"chosen": (list,), "rejected": (list,)},
    }[fmt]


def _optional_fields(fmt: str) -> dict[str, tuple[type, ...]]:
    return {"alpaca": {"input": _STR}, "conversational": {"prompt": _STR_OR_LIST}}.get(fmt, {})


def _validate_messages(msgs: list, name: str, where: str, fld: str) -> None:
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(
                f"{name}: {where}: field {fld!r} item {j} is a {_type_name(m)}; expected a message object "
                '{"role": ..., "content": ...}. Fix the row.'
            )
        for k in ("role", "content"):
            if not isinstance(m.get(k), str):
                raise DataError(
                    f"{name}: {where}: field {fld!r} item {j} needs a string {k!r} "
                    f"(got {_type_name(m.get(k))}). "
                    'Each message must be {"role": str, "content": str}.'
                )


def _validate_row(row: dict, fmt: str, name: str, where: str) -> None:
    req = _required_fields(fmt)
    for fld in req:
        if fld not in row or row[fld] is None:
            what = "missing" if fld not in row else "null"
            raise DataError(
                f"{name}: {where}: required field {fld!r} is {what} (format {fmt!r} needs "
                f"{', '.join(req)}; the row has {sorted(row)}). Fix or drop the row, or set `format`."
            )
    for fld, types in {**req, **_optional_fields(fmt)}.items():
        v = row.get(fld)
        if v is None:
            continue
        if not isinstance(v, types):
            want = " or ".join("string" if t is str else "list of messages" for t in types)
            raise DataError(
                f"{name}: {where}: field {fld!r} must be a {want}, got {_type_name(v)} ({str(v)[:40]!r}). "
                "Fix the row or set `format` to the right one."
            )
        if isinstance(v, list):
            _validate_messages(v, name, where, fld)
    if fmt == "messages":
        msgs = row["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{name}: {where}: field 'messages' must end with an assistant message "
                f"(the trained response); got "
                f"{'no messages' if not msgs else 'last role ' + repr(msgs[-1]['role'])}. "
                "Fix or drop the row."
            )


def _validate(raw: _Raw, fmt: str) -> None:
    cols = list(_required_fields(fmt)) + list(_optional_fields(fmt))
    for i, row in enumerate(raw.iter_rows(cols)):
        _validate_row(row, fmt, raw.name, raw.where(i))


# ------------------------------------------------------------------------------------------ formatting


def format_sft_row(
    row: dict, fmt: str, template: str | None = None, chat: bool = False
) -> tuple[str | list, str | list]:
    """Split one SFT row into ``(prompt, response)``.

    Text formats give two strings. Chat rows give ``(prompt_messages, response)`` where the prompt is a
    list of ``{role, content}`` messages and the response the final assistant message's content (or the
    ``completion`` message list of a conversational prompt_completion row). With ``chat`` a text row becomes
    a chat row: an alpaca row is one user message (the filled ``template``, else the instruction, plus a
    blank line and the input when there is one); a text prompt is an HH dialogue's turns or one user message.
    """
    if fmt == "alpaca":
        inp = row.get("input") or ""
        fields = {"instruction": row["instruction"], "input": inp}
        if chat:
            text = _fill(template, fields) if template is not None else _join_input(row["instruction"], inp)
            return [{"role": "user", "content": text}], row["output"]
        if template is None:
            template = ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        return _fill(template, fields), row["output"]
    if fmt in ("prompt_completion", "prompt_chosen"):  # prompt_chosen: SFT on a preference set's chosen answers
        prompt, completion = row["prompt"], row["completion" if fmt == "prompt_completion" else "chosen"]
        if isinstance(prompt, str) and template is not None:
            prompt = _fill(template, {"prompt": prompt})
        if chat and isinstance(prompt, str):
            return _text_as_chat(prompt, [completion])
        if isinstance(prompt, list) or isinstance(completion, list):
            return _as_messages(prompt), completion
        return prompt, completion
    if fmt == "messages":
        msgs = row["messages"]
        return [_clean_message(m) for m in msgs[:-1]], msgs[-1]["content"]
    raise DataError(f"unknown SFT format {fmt!r}. Valid formats: {', '.join(SFT_FORMATS[1:])}.")


def format_preference_row(
    row: dict, fmt: str, template: str | None = None, chat: bool = False
) -> tuple[str | list, str | list, str | list] | None:
    """Split one preference row into ``(prompt, chosen, rejected)``.

    Strings for prompt_chosen_rejected and hh; for conversational the prompt is a message list and the
    responses are message lists. Returns ``None`` when chosen and rejected share no prompt (hh without a
    common ``"\\n\\nAssistant:"``, conversational whole dialogues without a common prefix). For text rows,
    ``template`` (with ``{prompt}``) is filled with the prompt, and ``chat`` turns the prompt into messages
    (an HH dialogue's turns, else one user message; HH responses lose their leading space).
    """
    parts = _split_preference_row(row, fmt)
    if parts is None or fmt == "conversational":
        return parts
    prompt, chosen, rejected = parts
    if template is not None:
        prompt = _fill(template, {"prompt": prompt})
    if chat:
        return _text_as_chat(prompt, [chosen, rejected])
    return prompt, chosen, rejected


def _split_preference_row(row: dict, fmt: str) -> tuple[str | list, str | list, str | list] | None:
    if fmt == "prompt_chosen_rejected":
        return row["prompt"], row["chosen"], row["rejected"]
    if fmt == "hh":
        chosen, rejected = row["chosen"], row["rejected"]
        n = len(os.path.commonprefix([chosen, rejected]))
        cut = chosen.rfind(HH_ASSISTANT, 0, n)
        if cut < 0 or cut + len(HH_ASSISTANT) > n:
            return None
        cut += len(HH_ASSISTANT)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if fmt == "conversational":
        chosen = [_clean_message(m) for m in row["chosen"]]
        rejected = [_clean_message(m) for m in row["rejected"]]
        prompt = row.get("prompt")
        if prompt is not None:
            return _as_messages(prompt), chosen, rejected
        # whole conversations: the prompt is the shared message prefix, ending before an assistant turn
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        while k > 0 and not (
            k < len(chosen)
            and k < len(rejected)
            and chosen[k]["role"] == "assistant"
            and rejected[k]["role"] == "assistant"
        ):
            k -= 1
        if k == 0:
            return None
        return chosen[:k], chosen[k:], rejected[k:]
    raise DataError(f"unknown preference format {fmt!r}. Valid formats: {', '.join(PREFERENCE_FORMATS[1:])}.")


def _join_input(instruction: str, inp: str) -> str:
    return instruction + (f"\n\n{inp}" if inp.strip() else "")


def _text_as_chat(prompt: str, responses: list) -> tuple:
    msgs, is_hh = text_to_messages(prompt)
    return (msgs, *[r.strip() if is_hh and isinstance(r, str) else r for r in responses])


def _fill(template: str, fields: dict[str, str]) -> str:
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(
            f"prompt_template {template[:60]!r}... cannot be filled ({type(e).__name__}: {e}). Use only the "
            f"placeholders {sorted('{' + k + '}' for k in fields)} and write literal braces "
            "as '{{' / '}}'."
        ) from None


def _check_prompt_template(template: str | None, fmt: str, name: str) -> None:
    """A ``prompt_template`` that does not fit the rows' format is an error naming the source and the fix."""
    if template is None:
        return
    if fmt in ("messages", "conversational"):
        raise DataError(
            f"{name}: prompt_template is set, but format {fmt!r} rows are message lists, which the tokenizer's "
            "chat template formats. Remove prompt_template (or give text rows)."
        )
    fields = ("instruction", "input") if fmt == "alpaca" else ("prompt",)
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        used = {f"<{e}>"}
    if used - set(fields) or fields[0] not in used:
        raise DataError(
            f"{name}: prompt_template {template[:60]!r} does not fit format {fmt!r} rows: it must contain "
            f"{{{fields[0]}}} and may use only {', '.join('{' + f + '}' for f in fields)} (it uses "
            f"{', '.join(sorted('{' + f + '}' for f in used)) or 'no placeholder'}). Write literal braces as "
            "'{{' / '}}'."
        )


def _clean_message(m: dict) -> dict:
    # Arrow-backed rows carry every key seen in the column, with None where a message lacks it.
    return {k: v for k, v in m.items() if v is not None}


def _as_messages(x: str | list) -> list[dict]:
    if isinstance(x, str):
        return [{"role": "user", "content": x}]
    return [_clean_message(m) for m in x]


def _response_text(x: str | list) -> str:
    return x if isinstance(x, str) else "".join(m.get("content") or "" for m in x)


def _raw_sft_prompt(row: dict, fmt: str) -> str | list:
    if fmt == "alpaca":
        return row["instruction"] + (row.get("input") or "")
    if fmt == "messages":
        return row["messages"][:-1]
    return row["prompt"]


def _prompt_is_empty(prompt: str | list) -> bool:
    """Whether a row's own prompt text (before templates; HH ``Human:``/``Assistant:`` markers are structure,
    not text) is empty or whitespace."""
    if isinstance(prompt, str):
        return not HH_TURN.sub("", prompt).strip()
    return not "".join(m.get("content") or "" for m in prompt).strip()


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


def eval_source(cfg: SFTData | PreferenceData) -> tuple[str, str | None] | None:
    """``(path, split)`` of the held-out data of ``cfg`` (its eval file or split), or None when the validation
    rows are a ``val_fraction`` of the training source."""
    if cfg.eval_path is None and cfg.eval_split is None:
        return None
    return (
        cfg.eval_path if cfg.eval_path is not None else cfg.path,
        cfg.eval_split if cfg.eval_split is not None else cfg.split,
    )


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
