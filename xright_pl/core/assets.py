"""Files shipped inside the package (the embedded demo tokenizer and data).

A path written as ``builtin:<relative path>`` in a config refers to ``xright_pl/assets/<relative path>``,
so configs work from any working directory and from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
BUILTIN_PREFIX = "builtin:"


def resolve(path: str) -> str:
    """Return ``path`` with a leading ``builtin:`` replaced by the package's asset folder."""
    if isinstance(path, str) and path.startswith(BUILTIN_PREFIX):
        return str(ASSETS_DIR / path[len(BUILTIN_PREFIX) :])
    return path
