"""The answers file: AlpacaEval's ``model_outputs`` format, written atomically, and resumed only with the same
prompts, generator, generation settings and weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from xright_pl.core.assets import resolve
from xright_pl.core.errors import DataError
from xright_pl.inference.prompts import PromptItem

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ output


def read_answers(path: str) -> list[dict]:
    """The entries of an answers file written by :func:`generate` (a JSON list; missing file: empty)."""
    if not os.path.exists(path):
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); it cannot be resumed. Delete it or pass "
            "--overwrite true."
        ) from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "output" in r for r in data):
        raise DataError(f"{path}: not an answers file (a JSON list of objects with 'output'). Use another --output.")
    return data


def write_json_atomic(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _check_resume(done: list[dict], items: list[PromptItem], generator: str, output: str) -> None:
    if len(done) > len(items):
        raise DataError(
            f"{output}: holds {len(done)} answers but there are only {len(items)} prompts: it was written for "
            "other prompts. Use another --output or pass --overwrite true."
        )
    for i, (entry, item) in enumerate(zip(done, items)):
        if entry.get("instruction") != item.instruction:
            raise DataError(
                f"{output}: answer {i} is for the instruction {str(entry.get('instruction'))[:60]!r}, but prompt "
                f"{i} is {item.instruction[:60]!r}: the file was written for other prompts. Use another --output "
                "or pass --overwrite true."
            )
        if entry.get("generator") != generator:
            raise DataError(
                f"{output}: answer {i} was written by generator {entry.get('generator')!r}, not {generator!r}. "
                "Use another --output, the same --generator, or pass --overwrite true."
            )


def model_version(model: str) -> dict[str, Any]:
    """Cheap identity of the weights behind ``model`` (a .ckpt or an exported folder): size and modification
    time of its weight files, so a resumed answers file is not continued with other weights (e.g. a newer
    ``last.ckpt``)."""
    path = Path(resolve(model))
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix in (".safetensors", ".bin"))
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()}


def _check_settings(output: str, settings: dict[str, Any], fresh: bool) -> None:
    """Refuse to resume ``output`` with other generation settings or other weights than it was started with
    (recorded in ``<output>.settings.json``); record them when starting afresh."""
    sidecar = f"{output}.settings.json"
    if fresh or not os.path.exists(sidecar):
        if not fresh:
            log.warning("%s has answers but no %s: cannot check that the settings are the same", output, sidecar)
        write_json_atomic(sidecar, settings)
        return
    try:
        before = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{sidecar}: unreadable ({e}). Delete it, or pass --overwrite true.") from None
    changed = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
        raise DataError(
            f"{output}: its answers were generated with other settings or weights ({diff}); resuming would mix"
            " them in one file. Use another --output, the same settings, or pass --overwrite true."
        )
