"""Containers: where dataset rows come from — a ``.json`` array or ``.jsonl`` file (read by
`llavakit.data.jsonrows`), or a Hugging Face ``datasets`` source (object, ``save_to_disk`` folder,
parquet / arrow files, optionally streamed). Each yields ``(index, row)`` pairs, a row that cannot
be read as a `RowError` in its place; turning a row into a conversation is `llavakit.data.formats`'."""

from __future__ import annotations

import os
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
    if not isinstance(source, (str, os.PathLike)) and is_hf_object(source):  # (a path: no `datasets` import, ~80 MB)
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
