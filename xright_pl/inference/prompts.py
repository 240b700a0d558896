"""Prompts to answer: read from a file or hub dataset in any format the data module reads (or as prompt-only
rows), and encoded exactly as in training (the run's tokenizer, prompt template, chat template and
``max_prompt_length``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from xright_pl.core.errors import DataError
from xright_pl.data.chat import ChatEncoder, text_to_messages
from xright_pl.data.encoding import _Encoder
from xright_pl.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    _response_text,
    _split_preference_row,
    _validate,
    detect_preference_format,
    detect_sft_format,
    format_preference_row,
    format_sft_row,
)
from xright_pl.data.readers import _read_source

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("auto", *SFT_FORMATS[1:], *PREFERENCE_FORMATS[1:], "prompt")


# --------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptItem:
    """One prompt to answer.

    Attributes:
        instruction: the text written to the output's ``instruction`` field (what a judge reads): the alpaca
            instruction (with ``input`` appended after a blank line), the prompt string, or a chat prompt as
            an HH-style transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; a single user turn is its text).
        prompt: what the model is conditioned on: a string (the training prompt template already applied)
            or a list of ``{role, content}`` messages (rendered with the tokenizer's chat template).
        reference: the data set's answer (SFT output / completion, preference ``chosen``), None for
            prompt-only rows.
        prompt_id: the row's position in the source.
        dataset: the row's own ``dataset`` field (AlpacaEval's evaluation set has one), if a string.
    """

    instruction: str
    prompt: str | list[dict]
    reference: str | None
    prompt_id: int
    dataset: str | None = None


def messages_to_instruction(messages: list[dict]) -> str:
    """A chat prompt as text: a lone user turn is its content; longer prompts an HH-style transcript."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


def _fitting_template(template: str | None, kind: str, strict: bool) -> str | None:
    """``template`` if its placeholders fit rows of ``kind`` (``alpaca``: ``{instruction}``/``{input}``;
    ``prompt``: ``{prompt}``), else (not ``strict``: a template taken from the run's config) None."""
    if template is None or strict:
        return template
    fits = "{prompt}" in template if kind == "prompt" else "{prompt}" not in template
    if not fits:
        log.info(
            "the run's SFT prompt_template %r does not fit %s rows: their prompts are used as they are", template, kind
        )
    return template if fits else None


def _prompt_only(
    row: dict, name: str, i: int, template: str | None, strict: bool = True, chat: bool = False
) -> tuple[str, str | list, str | None]:
    """(instruction, prompt, answer if the row has one) of a prompt row (``chat``: text prompts as messages,
    as the data module's ``use_chat_template`` builds them)."""
    if isinstance(row.get("instruction"), str):
        template = _fitting_template(template, "alpaca", strict)
        inp = row.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{name}: row {i}: field 'input' must be a string, got {type(inp).__name__}.")
        prompt, _ = format_sft_row({**row, "input": inp, "output": ""}, "alpaca", template, chat)
        answer = row.get("output") if isinstance(row.get("output"), str) else None
        return (row["instruction"] + (f"\n\n{inp}" if inp.strip() else "")), prompt, answer
    if isinstance(row.get("prompt"), str):
        p = row["prompt"]
        template = _fitting_template(template, "prompt", strict)
        prompt = format_sft_row({"prompt": p, "completion": ""}, "prompt_completion", template, chat)[0]
        answer = row.get("completion") if isinstance(row.get("completion"), str) else None
        return p, prompt, answer
    msgs = row.get("messages", row.get("prompt"))
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
        msgs = [{k: v for k, v in m.items() if v is not None} for m in msgs]
        answer = None
        if msgs[-1].get("role") == "assistant":
            answer, msgs = msgs[-1].get("content"), msgs[:-1]
        if msgs and all(isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in msgs):
            return messages_to_instruction(msgs), msgs, answer
    raise DataError(
        f"{name}: row {i} has keys {sorted(row)}, which hold no prompt. A prompt row needs 'instruction' "
        "(optional 'input'), 'prompt' (a string or a list of messages) or 'messages'; SFT and preference "
        "rows are read too. Fix the row or set `format`."
    )


def read_prompts(
    path: str,
    format: str = "auto",
    prompt_template: str | None = None,
    limit: int | None = None,
    split: str | None = None,
    strict_template: bool = True,
    chat: bool = False,
) -> list[PromptItem]:
    """Read the prompts (and the data set's answers, when there are any) of a prompts file.

    Args:
        path: a local ``.jsonl``/``.json``/``.parquet`` file, a ``builtin:`` asset or a hub dataset name.
        format: ``auto`` (from the first row's keys), an SFT or preference format of the data module, or
            ``prompt`` (prompt-only rows).
        prompt_template: the SFT prompt template of training (``{instruction}``/``{input}`` or ``{prompt}``);
            None: the standard Alpaca template for alpaca rows, the prompt as-is otherwise.
        limit: read only the first N rows.
        split: split of a hub dataset (default ``train``).
        strict_template: a template whose placeholders do not fit the rows is an error (False: prompt-only rows
            it does not fit are used as they are; for a template taken from the run's config).
        chat: text prompts become chat messages, as the data module's ``use_chat_template`` makes them (an
            alpaca row one user message, an HH dialogue its turns); ``prompt_template`` applies to preference
            rows' prompts too (``{prompt}``), as ``PreferenceData.prompt_template`` does.
    """
    if format not in PROMPT_FORMATS:
        raise DataError(f"{path}: unknown format {format!r}. Valid formats: {', '.join(PROMPT_FORMATS)}.")
    raw = _read_source(path, split, limit)
    rows = raw.rows if raw.rows is not None else [dict(r) for r in raw.dataset]
    fmt = format
    if fmt == "auto":
        first = rows[0]
        if "chosen" in first and "rejected" in first:
            fmt = detect_preference_format(first, raw.name)
        else:
            try:
                fmt = detect_sft_format(first, raw.name)
            except DataError:
                fmt = "prompt"
            if fmt == "messages" and (first["messages"] or [{}])[-1].get("role") != "assistant":
                fmt = "prompt"
    if fmt != "prompt":
        _validate(raw, fmt)
    items: list[PromptItem] = []
    for i, row in enumerate(rows):
        reference: Any = None
        if fmt == "prompt":
            instruction, prompt, reference = _prompt_only(row, raw.name, i, prompt_template, strict_template, chat)
        elif fmt in PREFERENCE_FORMATS:
            text_prompt = _split_preference_row(row, fmt)
            parts = format_preference_row(row, fmt, prompt_template if fmt != "conversational" else None, chat)
            if parts is None:
                raise DataError(
                    f"{raw.name}: {raw.where(i)}: chosen and rejected share no prompt (no common "
                    "'\\n\\nAssistant:' / message prefix), so there is nothing to answer. Fix or drop the row."
                )
            prompt, reference, _ = parts
            shown = text_prompt[0] if text_prompt is not None else prompt
            instruction = shown if isinstance(shown, str) else messages_to_instruction(shown)
        else:
            prompt, reference = format_sft_row(row, fmt, prompt_template if fmt != "messages" else None, chat)
            if fmt == "alpaca":
                inp = row.get("input") or ""
                instruction = row["instruction"] + (f"\n\n{inp}" if inp.strip() else "")
            elif isinstance(prompt, str):
                instruction = row["prompt"] if isinstance(row.get("prompt"), str) else prompt
            else:
                instruction = messages_to_instruction(prompt)
        if reference is not None:
            reference = _response_text(reference).strip()
        source = row.get("dataset") if isinstance(row.get("dataset"), str) else None
        items.append(PromptItem(instruction, prompt, reference, i, source))
    return items


class PromptEncoder:
    """Token ids of prompts, built like the prompt part of a training sequence.

    Text prompts are the tokenizer's leading special tokens (e.g. BOS) + the prompt's tokens, cut from the left
    (keeping the leading BOS) when longer than ``max_prompt_length``. Chat prompts are the chat template's
    rendering with ``add_generation_prompt=True``, fitted to ``max_prompt_length`` as in training (whole earlier
    turns dropped first, the system turn and the assistant header kept; see :mod:`xright_pl.data.chat`). With
    ``use_chat_template`` text prompts are turned into messages first.
    """

    def __init__(self, tokenizer, max_prompt_length: int | None = None, use_chat_template: bool = False) -> None:
        self.tok = tokenizer
        self.max_prompt_length = max_prompt_length
        self.use_chat_template = use_chat_template
        enc = _Encoder(tokenizer, 2**31, 2**31, "prompts")
        self.prefix = list(enc.prefix)
        self.bos_id = enc.bos_id
        self.chat = ChatEncoder(tokenizer, max_prompt_length or 2**31, "prompts")

    def __call__(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str) and self.use_chat_template:
            prompt = text_to_messages(prompt)[0]
        if isinstance(prompt, list):
            if not getattr(self.tok, "chat_template", None):
                raise DataError(
                    "chat prompts need a chat template, but the tokenizer has none. Use a chat (instruct) "
                    "tokenizer or pass `chat_template`."
                )
            fitted = self.chat.prompt_ids(prompt)
            if fitted is None:
                raise DataError(
                    f"a chat prompt does not fit max_prompt_length={self.max_prompt_length}: not one token of the"
                    " user's text fits beside the system turn and the headers (training skips such rows as"
                    " prompt_too_long). Raise --max_prompt_length."
                )
            return fitted[1]
        ids = self.prefix + self.tok(prompt, add_special_tokens=False)["input_ids"]
        n = self.max_prompt_length
        if n is not None and len(ids) > n:
            head = self.prefix
            keep = len(head) if head else int(bool(ids) and self.bos_id is not None and ids[0] == self.bos_id)
            tail = n - keep
            ids = (ids[:keep] + (ids[len(ids) - tail :] if tail > 0 else []))[:n]
        return ids
