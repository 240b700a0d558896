"""The data API in one place: every public name of the data modules, so that ``from xright_pl.data.sources
import ...`` keeps working.

Each name lives in the module with its one job: :mod:`~xright_pl.data.specs` (the ``SFTData``/``PreferenceData``
configurations), :mod:`~xright_pl.data.readers` (local files, builtin assets and hub datasets into raw rows),
:mod:`~xright_pl.data.formats` (format names, detection, row validation, templates, rows into prompt and
responses) and :mod:`~xright_pl.data.encoding` (the tokenizer, rows into token ids and labels, skip counting,
``load_sft``/``load_preference``).
"""

from xright_pl.core.errors import DataError
from xright_pl.data.encoding import (
    OPTIONAL_SKIP_KEYS,
    PREFERENCE_SKIP_KEYS,
    SFT_SKIP_KEYS,
    SKIP_REASONS,
    SOURCE_ROW_COLUMN,
    LoadedData,
    load_preference,
    load_sft,
    load_tokenizer,
)
from xright_pl.data.formats import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    HH_ASSISTANT,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    detect_preference_format,
    detect_sft_format,
    format_preference_row,
    format_sft_row,
)
from xright_pl.data.readers import LOCAL_SUFFIXES
from xright_pl.data.specs import PreferenceData, SFTData, eval_source

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "HH_ASSISTANT",
    "LOCAL_SUFFIXES",
    "OPTIONAL_SKIP_KEYS",
    "PREFERENCE_FORMATS",
    "PREFERENCE_SKIP_KEYS",
    "SFT_FORMATS",
    "SFT_SKIP_KEYS",
    "SKIP_REASONS",
    "SOURCE_ROW_COLUMN",
    "DataError",
    "LoadedData",
    "PreferenceData",
    "SFTData",
    "detect_preference_format",
    "detect_sft_format",
    "eval_source",
    "format_preference_row",
    "format_sft_row",
    "load_preference",
    "load_sft",
    "load_tokenizer",
]
