"""What a data source is: the SFT and preference data configurations (LightningCLI builds ``--help`` from their
attribute docstrings) and where their held-out rows come from."""

from __future__ import annotations

from dataclasses import dataclass


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


def eval_source(cfg: SFTData | PreferenceData) -> tuple[str, str | None] | None:
    """``(path, split)`` of the held-out data of ``cfg`` (its eval file or split), or None when the validation
    rows are a ``val_fraction`` of the training source."""
    if cfg.eval_path is None and cfg.eval_split is None:
        return None
    return (
        cfg.eval_path if cfg.eval_path is not None else cfg.path,
        cfg.eval_split if cfg.eval_split is not None else cfg.split,
    )
