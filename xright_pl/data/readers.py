"""Reading one data source into raw rows.

Local ``.jsonl``/``.json`` files are parsed here (a :class:`DataError` names the file, the line or row, and the
fix); ``.parquet`` files and hub dataset names go through :func:`datasets.load_dataset`; ``builtin:`` names resolve
to the package assets. The result is a :class:`_Raw`: parsed dicts or a ``datasets.Dataset``, not yet validated
(:mod:`xright_pl.data.formats`) or tokenized (:mod:`xright_pl.data.encoding`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets

from xright_pl.core.assets import resolve
from xright_pl.core.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _looks_like_path(s: str) -> bool:
    if s.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    # hub ids are "name" or "owner/name": a second separator (or a Windows one) means a path
    return s.count("/") >= 2 or (os.sep != "/" and os.sep in s)


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
