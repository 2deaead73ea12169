"""Containers: where dataset rows come from — a ``.json`` array or ``.jsonl`` file, or a Hugging Face
``datasets`` source (object, ``save_to_disk`` folder, parquet / arrow files, optionally streamed).
Each yields ``(index, row)`` pairs; turning a row into a conversation is `llavakit.data.formats`'."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

FORMATS = ("auto", "llava", "messages", "hf")
JSON_SUFFIXES = (".json", ".jsonl")
HF_SUFFIXES = (".parquet", ".arrow")


class DataSourceError(ValueError):
    """The source as a whole cannot be read (missing file, unknown format, broken JSON array)."""


class RowError(Exception):
    """One row that cannot be read or normalised: why, what to do, and its id when known."""

    def __init__(self, reason: str, hint: str, id: str | None = None):
        self.reason, self.hint, self.id = reason, hint, id


def is_hf_object(source: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(source, (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict,
                               datasets.IterableDatasetDict))


def container_kind(source: Any, format: str) -> str:
    if isinstance(source, (list, tuple)):
        return "list"
    if is_hf_object(source):
        return "hf"
    path = Path(source)
    if not path.exists():
        raise DataSourceError(f"{path}: no such file or folder")
    if path.is_dir() or path.suffix.lower() in HF_SUFFIXES or format == "hf":
        return "hf"
    if path.suffix.lower() in JSON_SUFFIXES:
        return "json"
    raise DataSourceError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                          f"use .json/.jsonl, a datasets folder or parquet, or pass --format {'|'.join(FORMATS[1:])}")


def first_line(path: Path) -> str:
    with path.open(encoding="utf-8-sig") as f:
        return next((line.strip() for line in f if line.strip()), "")


def json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, row) pairs; a row that is not valid JSON comes back as a `RowError`.

    A JSON array is indexed by position, JSONL by line (index = line number - 1) and read lazily,
    line by line. A ``.json`` that is really JSONL, or the reverse, is read for what it is.
    """
    first = first_line(path)
    if first.startswith("[") or (first.startswith("{") and not parses_as_json(first)):
        text = path.read_text(encoding="utf-8-sig")
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            if first.startswith("["):
                raise DataSourceError(
                    f"{path}: unreadable JSON at line {e.lineno} column {e.colno}: {e.msg}; "
                    "fix the file (a JSON array must parse as a whole) or convert it to JSONL") from None
            whole = None  # JSONL whose first line is broken
        if isinstance(whole, list):
            yield from enumerate(whole)
            return
        if isinstance(whole, dict):  # one pretty-printed object
            yield 0, whole
            return
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno - 1, json.loads(line)
            except json.JSONDecodeError as e:
                # Salvage the id from the broken text, so the report can still name the sample.
                m = re.search(r'"id"\s*:\s*"?([^",}]*)', line)
                yield lineno - 1, RowError(
                    f"unreadable json: line {lineno}, column {e.colno}: {e.msg}",
                    f"fix line {lineno} of {path.name} (each JSONL line must be one complete JSON object)",
                    id=m.group(1) if m else None)


def parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def hf_dataset(source: Any, split: str, streaming: bool):
    import datasets

    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            source = datasets.load_from_disk(str(path))
        elif path.is_dir():
            source = datasets.load_dataset(str(path), split=split, streaming=streaming)
        else:
            builder = {".json": "json", ".jsonl": "json"}.get(path.suffix.lower(), path.suffix.lower().lstrip("."))
            source = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=streaming)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in source:
            raise DataSourceError(f"the dataset has no split {split!r}; splits: {sorted(source)}")
        source = source[split]
    if streaming and isinstance(source, datasets.Dataset):
        source = source.to_iterable_dataset()
    return source


def hf_rows(ds) -> Iterator[tuple[int, Any]]:
    """Rows as plain dicts. Through the arrow format, image columns stay ``{"bytes", "path"}``:
    nothing is decoded here, workers decode later."""
    try:
        batches = ds.with_format("arrow").iter(batch_size=256)
    except Exception:  # a dataset that cannot be formatted as arrow: plain rows (images as PIL)
        yield from enumerate(ds)
        return
    index = 0
    for table in batches:
        for row in table.to_pylist():
            yield index, row
            index += 1


def describe_source(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (list, tuple)):
        return "<list>"
    name = getattr(getattr(source, "info", None), "dataset_name", None)
    return f"<{type(source).__name__}{' ' + name if name else ''}>"
