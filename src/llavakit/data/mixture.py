"""Mixtures: training data made of several sources, each with its own path, image folder, format and
sampling rule — what LLaVA-665K (eight sources) and LLaVA-NeXT / OneVision recipes (dozens of JSON
files, ``sampling_strategy: "first:10%"``) train on.

``data.train`` (and ``llavakit data check/stats/convert DATA``) may be

* one path (JSON/JSONL, datasets folder, parquet): one source, sampled ``all`` (as before);
* a list of sources, each a path or ``{path, image_folder, format, sampling, split, name}``;
* a YAML file holding ``datasets: [{json_path, sampling_strategy}, ...]`` — LLaVA-NeXT's data YAML,
  read as is (``path`` / ``sampling`` and the other keys above are accepted too). Relative paths in it
  are taken from the YAML's folder when they exist there, else from the working directory.

Sampling rules (`SAMPLING_RULES`): ``all``; ``first:N`` / ``first:P%`` and ``end:N`` / ``end:P%`` (rows
in file order, as LLaVA-NeXT); ``random:N`` / ``random:P%`` (drawn with ``data.seed`` and the source's
position in the list, so every process and every resume draws the same rows); ``repeat:K`` (every row
K times). ``P%`` rounds up, like LLaVA-NeXT. A rule counts *rows*, readable or not: a row with an error
stays an error of the mixture. Asking for more rows than a source has takes all of them, with a note.

The mixture is one list: samples get consecutive indices (source after source) and name their origin
as ``PATH row R``, so every error still points at a file and a row. Everything is deterministic, so
the exact-length sampler, resume and multi-process sharding see the same dataset in every process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .conversation import Conversation, Problem
from .sources import FORMATS, DataSourceError, describe_source

SAMPLING_RULES = ("all", "first:N", "first:P%", "end:N", "end:P%", "random:N", "random:P%", "repeat:K")
SOURCE_KEYS = ("path", "image_folder", "format", "sampling", "split", "name")
ALIASES = {"json_path": "path", "sampling_strategy": "sampling"}  # LLaVA-NeXT's spelling
MIXTURE_SUFFIXES = (".yaml", ".yml")
_RULE = re.compile(r"^(first|end|random|repeat):(\d+(?:\.\d+)?)(%?)$")


@dataclass
class Source:
    """One entry of a mixture."""

    path: Any  # file / folder path, or a datasets object
    image_folder: str | None = None
    format: str = "auto"
    sampling: str = "all"
    split: str = "train"
    name: str = ""


@dataclass
class SourceReport:
    """What a source gave the mixture: ``rows`` read, ``samples`` taken (indices ``start..stop-1``)."""

    name: str
    sampling: str
    rows: int
    samples: int
    start: int
    stop: int
    note: str = ""


@dataclass
class Mixture:
    conversations: list[Conversation]
    problems: list[Problem]
    sources: list[SourceReport] = field(default_factory=list)

    @property
    def is_mixture(self) -> bool:
        """More than one source, or one that is sampled: samples are named by file and row."""
        return len(self.sources) > 1 or any(s.sampling != "all" for s in self.sources)

    def table(self, problems: Sequence[Problem] | None = None) -> str:
        """Per source: rule, rows, samples, samples with errors / with warnings."""
        problems = self.problems if problems is None else problems
        width = max([len(s.name) for s in self.sources] + [6])
        lines = [f"{'source':<{width}}  {'sampling':<12}{'rows':>9}{'samples':>9}{'errors':>8}{'warnings':>10}"]
        for s in self.sources:
            mine = [p for p in problems if s.start <= p.index < s.stop]
            errors = len({p.index for p in mine if p.severity == "error"})
            warnings = len({p.index for p in mine if p.severity == "warning"})
            lines.append(f"{s.name:<{width}}  {s.sampling:<12}{s.rows:>9}{s.samples:>9}{errors:>8}{warnings:>10}"
                         + (f"  ({s.note})" if s.note else ""))
        return "\n".join(lines)


def parse_sampling(rule: Any, where: str = "sampling") -> tuple[str, float | None, bool]:
    """``"first:10%"`` -> ``("first", 10.0, True)``; ``"all"`` -> ``("all", None, False)``."""
    text = str(rule).strip().lower() if isinstance(rule, (str, int)) else None
    if text == "all":
        return "all", None, False
    m = _RULE.match(text or "")
    if not m or (m.group(1) == "repeat" and (m.group(3) or "." in m.group(2))):
        raise DataSourceError(f"{where}={rule!r} is not a sampling rule; use one of {list(SAMPLING_RULES)} "
                              "(N, K whole numbers, P a percentage, e.g. first:10%)")
    value = float(m.group(2))
    if m.group(3) and not 0 < value <= 100:
        raise DataSourceError(f"{where}={rule!r}: a percentage must be in (0, 100]")
    return m.group(1), value, bool(m.group(3))


def select_rows(rule: str, n_rows: int, seed: int = 0, position: int = 0) -> tuple[list[int], str]:
    """Row indices (in order, repeats included) a rule takes from ``n_rows`` rows, and a note."""
    kind, value, percent = parse_sampling(rule)
    if kind == "all":
        return list(range(n_rows)), ""
    if kind == "repeat":
        return [r for _ in range(int(value)) for r in range(n_rows)], ""
    want = math.ceil(value * n_rows / 100) if percent else int(value)
    note = f"asked for {want} rows, the source has {n_rows}" if want > n_rows else ""
    want = min(want, n_rows)
    if kind == "first":
        return list(range(want)), note
    if kind == "end":
        return list(range(n_rows - want, n_rows)), note
    import numpy as np

    rng = np.random.default_rng([int(seed), int(position)])
    return sorted(rng.choice(n_rows, size=want, replace=False).tolist()), note


def _entry(raw: Any, k: int, where: str, base: Path | None, image_folder, format, split) -> Source:
    if isinstance(raw, (str, os.PathLike)) or not isinstance(raw, dict):
        raw = {"path": raw}
    entry = {ALIASES.get(key, key): value for key, value in raw.items()}
    unknown = sorted(set(entry) - set(SOURCE_KEYS), key=str)
    if unknown:
        raise DataSourceError(f"{where}[{k}]: unknown key(s) {unknown}; valid keys: {list(SOURCE_KEYS)} "
                              f"(or LLaVA-NeXT's {sorted(ALIASES)})")
    if entry.get("path") is None:
        raise DataSourceError(f"{where}[{k}] has no path; give 'path' (or LLaVA-NeXT's 'json_path')")
    path = entry["path"]
    if isinstance(path, (str, os.PathLike)) and base is not None and not Path(path).is_absolute():
        near = base / path
        path = str(near) if near.exists() or not Path(path).exists() else str(path)
    src = Source(path=path, image_folder=entry.get("image_folder", image_folder),
                 format=entry.get("format", format), sampling=str(entry.get("sampling", "all")),
                 split=entry.get("split", split), name=str(entry.get("name") or ""))
    if src.format not in FORMATS:
        raise DataSourceError(f"{where}[{k}].format={src.format!r} is not one of {list(FORMATS)}")
    parse_sampling(src.sampling, f"{where}[{k}].sampling")
    return src


def is_mixture_file(train: Any) -> bool:
    return isinstance(train, (str, os.PathLike)) and Path(train).suffix.lower() in MIXTURE_SUFFIXES


def read_sources(train: Any, image_folder: str | None = None, format: str = "auto",
                 split: str = "train") -> list[Source]:
    """The sources ``train`` names (see the module docstring); a `DataSourceError` saying what is wrong."""
    if train is None:
        raise DataSourceError("no training data given")
    where, base, entries = "data.train", None, train
    if is_mixture_file(train):
        import yaml

        path = Path(train)
        if not path.is_file():
            raise DataSourceError(f"{path}: no such mixture file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise DataSourceError(f"{path}: not YAML ({e})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("data"), dict) and "train" in loaded["data"]:
            d = loaded["data"]  # a training recipe: its data section
            image_folder, format = d.get("image_folder", image_folder), d.get("format", format)
            loaded = d["train"] if not isinstance(d["train"], str) or is_mixture_file(d["train"]) else [d["train"]]
            if isinstance(loaded, str):
                return read_sources(path.parent / loaded, image_folder, format, split)
        if isinstance(loaded, dict):
            loaded = loaded.get("datasets")
        if not isinstance(loaded, list) or not loaded:
            raise DataSourceError(f"{path}: a mixture file holds 'datasets: [{{json_path, sampling_strategy}}, ...]' "
                                  "(LLaVA-NeXT's data YAML) or a training recipe with data.train")
        where, base, entries = str(path), path.parent, loaded
    elif not isinstance(train, (list, tuple)):
        return [Source(train, image_folder, format, "all", split, describe_source(train))]
    if not entries:
        raise DataSourceError(f"{where} is an empty list of sources")
    sources = [_entry(raw, k, where, base, image_folder, format, split) for k, raw in enumerate(entries)]
    names: dict[str, int] = {}
    for s in sources:  # unique names for the per-source reports
        name = s.name or describe_source(s.path)
        names[name] = names.get(name, 0) + 1
        s.name = name if names[name] == 1 else f"{name} #{names[name]}"
    return sources


def check_train_entries(train: Any) -> None:
    """Structural check of a ``data.train`` list (keys, rules) without touching the disk."""
    if isinstance(train, (list, tuple)):
        for k, raw in enumerate(train):
            _entry(raw, k, "data.train", None, None, "auto", "train")


def load_mixture(train: Any, image_folder: str | None = None, format: str = "auto", *, seed: int = 0,
                 split: str = "train", streaming: bool = False) -> Mixture:
    """Read every source and apply its sampling rule: one `Mixture` (problems collected, never raised
    for a bad row; `DataSourceError` for a source that cannot be read at all)."""
    from .formats import load_conversations

    sources = read_sources(train, image_folder, format, split)
    if len(sources) == 1 and sources[0].sampling == "all" and not is_mixture_file(train) \
            and not isinstance(train, (list, tuple)):
        s = sources[0]  # one plain source: indices and labels exactly as the reader gives them
        convs, problems = load_conversations(s.path, s.format, s.image_folder, on_error="collect", split=s.split,
                                             streaming=streaming)
        n = _row_count(convs, problems)
        return Mixture(convs, problems, [SourceReport(s.name, "all", n, n, 0, n)])
    out = Mixture([], [])
    for position, s in enumerate(sources):
        try:
            convs, problems = load_conversations(s.path, s.format, s.image_folder, on_error="collect",
                                                 split=s.split, streaming=streaming)
        except DataSourceError as e:
            raise DataSourceError(f"mixture source {position} ({s.name}): {e}") from None
        n = _row_count(convs, problems)
        rows, note = select_rows(s.sampling, n, seed, position)
        by_row = {c.index: c for c in convs}
        row_problems: dict[int, list[Problem]] = {}
        for p in problems:
            row_problems.setdefault(p.index, []).append(p)
        start = out.sources[-1].stop if out.sources else 0
        seen: dict[int, int] = {}
        for offset, row in enumerate(rows):
            index, label = start + offset, f"{describe_source(s.path)} row {row}"
            copy = seen.get(row, 0)
            seen[row] = copy + 1
            conv = by_row.get(row)
            if conv is not None:
                out.conversations.append(dataclasses.replace(
                    conv, index=index, source=label,
                    meta={**conv.meta, "mixture_source": position, "row": row, "repeat": copy}))
            out.problems += [dataclasses.replace(p, index=index, source=label) for p in row_problems.get(row, [])]
        out.sources.append(SourceReport(s.name, s.sampling, n, len(rows), start, start + len(rows), note))
    return out


def _row_count(convs: Sequence[Conversation], problems: Sequence[Problem]) -> int:
    return max([c.index for c in convs] + [p.index for p in problems], default=-1) + 1
