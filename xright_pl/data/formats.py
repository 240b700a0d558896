"""Row formats: their names, detection from a row's fields, validation, and splitting a row into its parts.

An SFT row becomes ``(prompt, response)`` (:func:`format_sft_row`), a preference row ``(prompt, chosen,
rejected)`` (:func:`format_preference_row`): strings for text rows (filled into the ``prompt_template`` or the
standard Alpaca prompts), message lists for chat rows. A row whose fields or types do not fit its format is a
:class:`DataError` naming the source, the row, the field and the fix.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from typing import Any

from xright_pl.core.errors import DataError
from xright_pl.data.chat import HH_TURN, text_to_messages
from xright_pl.data.readers import _Raw

SFT_FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "prompt_chosen")
PREFERENCE_FORMATS = ("auto", "prompt_chosen_rejected", "hh", "conversational")
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
