"""Chat rows: rendering with the tokenizer's chat template, where a turn ends, and prompt truncation.

A chat row is a prompt (a list of ``{role, content}`` messages) and one or more responses (an assistant
content string, or a list of messages). The prompt is rendered with ``add_generation_prompt=True``; a
response is the rendering of the whole conversation minus the prompt's rendering.

**End of turn.** The template's end-of-turn token is found once per tokenizer by rendering a conversation
whose assistant content is a sentinel and reading what follows it: the first special token there (ChatML:
``<|im_end|>``; Llama 3: ``<|eot_id|>``). A response is trained through that token, and what the template
puts after it (ChatML: ``"\\n"``) is dropped from the sequence; no EOS is appended, so a template whose
end-of-turn token is the tokenizer's EOS gets no second EOS. A template with no special token after the
assistant content keeps its rendering and gets the tokenizer's EOS appended (unless it already ends so).

**Truncation.** A prompt longer than ``max_prompt_length`` tokens loses whole earlier turns, oldest first (a
turn is a user message and the messages up to the next one); the leading system message(s) and the last turn
stay, and the template still renders its own default system turn and the generation prompt (the assistant
header), so the turn structure stays intact. If that is still too long, tokens are dropped from the start of
the first remaining user message's content. If not even one token of that content fits, the row is skipped
and counted as ``prompt_too_long``.

HH text dialogues (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) become user/assistant messages with
:func:`parse_hh`.
"""

from __future__ import annotations

import re

from xright_pl.core.errors import DataError

SENTINEL = "XRIGHTPLSENTINEL"
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the special token the chat template ends an assistant turn with, or None if there is none.

    Renders ``[user, assistant=SENTINEL]`` and returns the first special (or added) token the template puts
    after the sentinel. Templates that refuse this conversation give None.
    """
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - a template with its own rules: fall back to appending EOS
        return None
    if SENTINEL not in text:
        return None
    after = text[text.rindex(SENTINEL) + len(SENTINEL) :]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    return next((i for i in ids if i in special), None)


def parse_hh(text: str) -> list[dict] | None:
    """Messages of an HH text prompt (``"\\n\\nHuman: ...\\n\\nAssistant:"``, ending with an empty assistant
    turn), or None when ``text`` is not one. Contents are stripped; consecutive turns of one role are joined
    with a blank line (templates that require alternating roles accept the result)."""
    if not re.match(r"\s*Human:", text) or not text.rstrip().endswith("Assistant:"):
        return None
    parts = HH_TURN.split(text.strip())
    # parts = [before, role1, content1, role2, content2, ...]; the final content is the empty generation turn
    if parts[0].strip() or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    msgs: list[dict] = []
    for role, content in zip(parts[1:-2:2], parts[2:-2:2]):
        role, content = HH_ROLES[role], content.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n\n" + content
        else:
            msgs.append({"role": role, "content": content})
    return msgs or None


def text_to_messages(prompt: str) -> tuple[list[dict], bool]:
    """A text prompt as chat messages: the turns of an HH dialogue, else one user message. The flag says
    whether it was an HH dialogue (whose responses carry a leading space to strip)."""
    msgs = parse_hh(prompt)
    if msgs is not None:
        return msgs, True
    return [{"role": "user", "content": prompt}], False


def split_turns(msgs: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """``(system, turns)``: the leading system messages, and the rest cut before each user message."""
    n = 0
    while n < len(msgs) and msgs[n]["role"] == "system":
        n += 1
    turns: list[list[dict]] = []
    for m in msgs[n:]:
        if m["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(m)
    return msgs[:n], turns


class ChatEncoder:
    """Token ids of chat prompts (fitted to ``max_prompt_length``) and responses (ending at the end of turn)."""

    def __init__(self, tokenizer, max_prompt_length: int, name: str) -> None:
        self.tok = tokenizer
        self.max_prompt_length = max_prompt_length
        self.name = name
        self.eot_id = end_of_turn_id(tokenizer)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def render_prompt(self, msgs: list[dict]) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, msgs: list[dict]) -> tuple[list[dict], list[int]] | None:
        """``(kept messages, ids)`` of the prompt fitted to ``max_prompt_length`` (see the module docstring),
        or None when not one token of the user's text fits."""
        ids = self._ids(self.render_prompt(msgs))
        if len(ids) <= self.max_prompt_length:
            return msgs, ids
        system, turns = split_turns(msgs)
        while len(turns) > 1:
            turns = turns[1:]
            msgs = system + [m for t in turns for m in t]
            ids = self._ids(self.render_prompt(msgs))
            if len(ids) <= self.max_prompt_length:
                return msgs, ids
        return self._cut_user_content(msgs, len(ids) - self.max_prompt_length)

    def _cut_user_content(self, msgs: list[dict], over: int) -> tuple[list[dict], list[int]] | None:
        j = next((k for k, m in enumerate(msgs) if m["role"] == "user"), None)
        if j is None:
            return None
        content = self._ids(msgs[j]["content"])
        drop = over
        while drop < len(content):
            text = self.tok.decode(content[drop:]).lstrip("\ufffd")  # no half character at the cut
            kept = [*msgs[:j], {**msgs[j], "content": text}, *msgs[j + 1 :]]
            ids = self._ids(self.render_prompt(kept))
            if len(ids) <= self.max_prompt_length:
                return kept, ids
            drop += len(ids) - self.max_prompt_length
        return None

    def response_text(self, prompt: list[dict], response: str | list, prompt_text: str, where: str) -> str:
        """The rendering of ``prompt + response`` after the prompt's rendering ``prompt_text``."""
        resp = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
        full = self.tok.apply_chat_template(prompt + resp, tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(
                f"{self.name}: {where}: the chat template's rendering of the prompt with "
                "add_generation_prompt=True is not a prefix of the rendering of the whole conversation, "
                "so the response cannot be split off. Use a chat template whose generation prompt "
                "matches how assistant turns start (pass `chat_template`)."
            )
        return full[len(prompt_text) :]

    def response_ids(self, text: str) -> list[int]:
        """Token ids of a rendered response, through its last end-of-turn token (nothing after it); without
        an end-of-turn token, the rendering plus the tokenizer's EOS (unless it already ends with it)."""
        ids = self._ids(text)
        if self.eot_id is not None and self.eot_id in ids:
            return ids[: len(ids) - ids[::-1].index(self.eot_id)]
        if not text.rstrip().endswith(self.tok.eos_token):
            ids.append(self.tok.eos_token_id)
        return ids

    def encode(
        self, prompt: list[dict], responses: list[str | list], where: str
    ) -> tuple[list[int], list[list[int]]] | None:
        """Prompt ids and one id list per response, or None when the prompt cannot be fitted."""
        fitted = self.prompt_ids(prompt)
        if fitted is None:
            return None
        msgs, p_ids = fitted
        p_text = self.render_prompt(msgs)
        return p_ids, [self.response_ids(self.response_text(msgs, r, p_text, where)) for r in responses]
