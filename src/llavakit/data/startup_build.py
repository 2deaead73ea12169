"""The cold build of the start-up data: read, validate and tokenize the training data — streaming for
JSON/JSONL sources.

`build_streaming` reads the rows `STREAM_ROWS` × ``workers`` at a time (`chunk_rows`), validates each chunk
(`validate` with one `ValidationState`, so duplicate ids and image verdicts carry across chunks), tokenizes the
chunk's valid samples (`encode_into`) into one `StoreBuilder`, and drops the chunk's conversations before reading
the next. Whether a chunk is tokenized over ``workers`` forked processes is decided for the build (the rows read so
far reach `dataset.PARALLEL_FROM`), not by the chunk's valid samples, so a chunk full of bad rows still goes to the
workers; its tasks are sized so that each worker gets about `TASKS_PER_WORKER` of them. Its memory is the compact
arrays being built, one chunk of Python objects, and per distinct image / per id state (a path set, image
verdicts, `SeenIds`: 16 bytes an id) — not a Python object per row. The result is exactly what
`build_whole` (everything read into one list, then validated, then tokenized) gives: the same store
arrays, report, problems (same order and text) and mixture table.

Mixtures stream too, source after source, with one limit: a sampled source (``first`` / ``end`` /
``random`` with ``N`` or ``P%``) needs its row count before its rows can be numbered, so such a file is
read twice — once to count its rows (JSON decoding only, nothing kept), once to take the chosen ones.
``all`` and ``repeat:K`` sources are read once per pass. Non-JSON sources (datasets folders, parquet,
in-memory rows) use `build_whole`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .conversation import Conversation, Problem
from . import dataset as dataset_module
from .dataset import DatasetReport, SupervisedDataset, encode_into
from .formats import iter_conversations
from .jsonrows import json_rows
from .mixture import Mixture, SourceReport, is_mixture_file, load_mixture, parse_sampling, read_sources, select_rows
from .sources import DataSourceError, describe_source
from .token_store import StoreBuilder
from .validate import ValidationState, validate

log = logging.getLogger(__name__)

STREAM_ROWS = 8192  # rows read, validated and tokenized at a time per worker process (`chunk_rows`)
TASKS_PER_WORKER = 4  # a chunk's samples are split into about this many tasks per worker process


def chunk_rows(workers: int) -> int:
    """Rows of a streamed chunk: `STREAM_ROWS` per worker process (1 to 8), so each gets several tasks a chunk and
    a pool is forked per `STREAM_ROWS` × ``workers`` rows, not per `STREAM_ROWS`."""
    return STREAM_ROWS * max(1, min(8, int(workers)))


def task_size(samples: int, workers: int) -> int:
    """Samples per worker task for a chunk of `samples`: about `TASKS_PER_WORKER` tasks per worker, at most
    `dataset.CHUNK`."""
    return max(1, min(dataset_module.CHUNK, -(-samples // (TASKS_PER_WORKER * max(1, workers)))))

Row = tuple[Conversation | None, list[Problem]]  # a row's conversation (None if unreadable) and its problems


def image_paths(convs: Sequence[Conversation]) -> list[str] | None:
    """Every distinct image and video path of `convs` (a video's frame files too), sorted; None if some image or
    frame is not a path (not cacheable)."""
    paths = set()
    for c in convs:
        refs = list(c.images)
        for v in c.videos:
            refs += list(v) if isinstance(v, (list, tuple)) else [v]
        for ref in refs:
            if not isinstance(ref, str):
                return None
            paths.add(ref)
    return sorted(paths)


# --- rows, in index order ---------------------------------------------------------------------------
def row_groups(path: Any, format: str, image_folder: str | None) -> Iterator[tuple[int, Conversation | None,
                                                                                   list[Problem]]]:
    """(row index, conversation or None, the reader's problems of that row) for each row of a source, in order."""
    pending: list[Problem] = []  # filled by the reader; drained at each conversation

    def before(index: int) -> Iterator[tuple[int, None, list[Problem]]]:
        group: list[Problem] = []
        for p in pending:
            if p.index >= index:
                break
            if group and group[0].index != p.index:
                yield group[0].index, None, group
                group = []
            group.append(p)
        if group:
            yield group[0].index, None, group

    for conv in iter_conversations(path, format, image_folder, on_error="collect", problems=pending):
        yield from before(conv.index)
        mine = [p for p in pending if p.index == conv.index]
        del pending[:]
        yield conv.index, conv, mine
    yield from before(float("inf"))


def count_rows(path: Any) -> int:
    """Rows of a JSON/JSONL source as the reader numbers them (the last index + 1), nothing kept."""
    n = 0
    for index, _ in json_rows(Path(path)):
        n = index + 1
    return n


class MixtureStream:
    """`load_mixture`'s conversations and problems, one row at a time (`rows`); ``reports`` holds each
    source's `SourceReport` once it has been read through."""

    def __init__(self, train: Any, image_folder: str | None, format: str, seed: int):
        self.sources = read_sources(train, image_folder, format)
        self.seed = seed
        s = self.sources[0]
        self.plain = (len(self.sources) == 1 and s.sampling == "all" and not is_mixture_file(train)
                      and not isinstance(train, (list, tuple)))  # as load_mixture: indices as the reader gives them
        self.reports: list[SourceReport] = []

    @property
    def is_mixture(self) -> bool:
        return Mixture([], [], self.reports).is_mixture

    def table(self, problems: list[Problem]) -> str:
        return Mixture([], [], self.reports).table(problems)

    def rows(self) -> Iterator[Row]:
        if self.plain:
            s, n = self.sources[0], 0
            for row, conv, found in row_groups(s.path, s.format, s.image_folder):
                n = row + 1
                yield conv, found
            self.reports.append(SourceReport(s.name, "all", n, n, 0, n))
            return
        for position, s in enumerate(self.sources):
            try:
                yield from self._source(position, s)
            except DataSourceError as e:
                raise DataSourceError(f"mixture source {position} ({s.name}): {e}") from None

    def _source(self, position: int, s) -> Iterator[Row]:
        start = self.reports[-1].stop if self.reports else 0
        label = describe_source(s.path)

        def placed(offset: int, row: int, copy: int, conv, found) -> Row:
            index, where = start + offset, f"{label} row {row}"
            if conv is not None:
                conv = dataclasses.replace(conv, index=index, source=where,
                                           meta={**conv.meta, "mixture_source": position, "row": row, "repeat": copy})
            return conv, [dataclasses.replace(p, index=index, source=where) for p in found]

        kind, value, _ = parse_sampling(s.sampling)
        note = ""
        if kind in ("all", "repeat"):  # row after row, pass after pass: no count needed first
            passes = 1 if kind == "all" else int(value)
            n = count_rows(s.path) if passes == 0 else 0
            for copy in range(passes):
                for row, conv, found in row_groups(s.path, s.format, s.image_folder):
                    if copy == 0:
                        n = row + 1
                    yield placed(copy * n + row, row, copy, conv, found)
            taken = passes * n
        else:  # the rule numbers rows from the end or draws among them: count first (a second read of the file)
            n = count_rows(s.path)
            chosen, note = select_rows(s.sampling, n, self.seed, position)
            chosen = np.asarray(chosen, dtype=np.int64)  # sorted, distinct
            taken, at = len(chosen), 0
            if taken:
                for row, conv, found in row_groups(s.path, s.format, s.image_folder):
                    at += int(np.searchsorted(chosen[at:], row))
                    if at < taken and chosen[at] == row:
                        yield placed(at, row, 0, conv, found)
                        at += 1
                    if at >= taken:
                        break  # the count pass read the whole file: a broken tail was already raised
        self.reports.append(SourceReport(s.name, s.sampling, n, taken, start, start + taken, note))


def chunks(rows: Iterator[Row], size: int) -> Iterator[tuple[list[Conversation], list[Problem], int]]:
    """(conversations, problems, rows) of `size` rows at a time (fewer in the last)."""
    convs: list[Conversation] = []
    found: list[Problem] = []
    count = 0
    for conv, problems in rows:
        if conv is not None:
            convs.append(conv)
        found += problems
        count += 1
        if count >= size:
            yield convs, found, count
            convs, found, count = [], [], 0
    if count:
        yield convs, found, count


# --- the builds ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    dataset: Any  # a `SupervisedDataset`
    problems: list[Problem]
    mixture_table: str | None
    paths: list[str] | None  # every image / video path the checks looked at, sorted; None: some are not paths
    took: str  # seconds per phase, for the log


def _took(spent: dict) -> str:
    return ", ".join(f"{what} {s:.1f} s" for what, s in spent.items())


def build_streaming(train: Any, processor, template, *, image_folder, format, seed, max_length, overflow, limits,
                    check_images, workers, video_limits) -> Built:
    """The JSON/JSONL data read, validated and tokenized `chunk_rows` rows at a time (see the module docstring)."""
    stream = MixtureStream(train, image_folder, format, seed)
    state, report = ValidationState(), DatasetReport()
    builder = StoreBuilder(with_sizes=processor.counts_depend_on_size)
    problems: list[Problem] = []
    paths: set[str] | None = set()
    spent = {"read": 0.0, "checks": 0.0, "tokenization": 0.0}
    rows_read = 0
    # closed on the way out, an exception included: the reader's file does not stay open
    with contextlib.closing(stream.rows()) as rows, contextlib.closing(chunks(rows, chunk_rows(workers))) as parts:
        while True:
            t = time.perf_counter()
            chunk = next(parts, None)
            spent["read"] += time.perf_counter() - t
            if chunk is None:
                break
            convs, read, count = chunk
            rows_read += count
            t = time.perf_counter()
            found = validate((convs, read), check_images=check_images, **limits.as_kwargs(),
                             video_limits=video_limits, state=state)
            problems += found
            bad = {p.index for p in found if p.severity == "error"}
            if paths is not None:
                mine = image_paths(convs)
                if mine is None:
                    paths = None
                else:
                    paths.update(mine)
            spent["checks"] += time.perf_counter() - t
            t = time.perf_counter()
            good = [c for c in convs if c.index not in bad]
            # parallel as the build is large (its rows so far), not as this chunk's valid samples are many
            encode_into(builder, report, good, processor, template, max_length, overflow, limits, workers,
                        video_limits, parallel=rows_read >= dataset_module.PARALLEL_FROM,
                        task=task_size(len(good), workers))
            spent["tokenization"] += time.perf_counter() - t
            del chunk, convs, read, found, good  # the chunk's Python objects go before the next chunk is read
    dataset = SupervisedDataset.from_store(builder.finish(), report, processor, template, image_limits=limits,
                                           video_limits=video_limits)
    if report.dropped or report.skipped or report.truncated:
        log.info("%s", report)
    return Built(dataset, problems, stream.table(problems) if stream.is_mixture else None,
                 None if paths is None else sorted(paths), _took(spent))


def build_whole(train: Any, processor, template, *, image_folder, format, seed, max_length, overflow, limits,
                check_images, workers, video_limits) -> Built:
    """Every row read into one list, validated, then tokenized (datasets folders, parquet, in-memory rows)."""
    clock = [time.perf_counter()]
    mixture = load_mixture(train, image_folder, format, seed=seed)
    convs = mixture.conversations
    clock.append(time.perf_counter())
    problems = validate((convs, mixture.problems), check_images=check_images, **limits.as_kwargs(),
                        video_limits=video_limits)
    bad = {p.index for p in problems if p.severity == "error"}
    clock.append(time.perf_counter())
    dataset = SupervisedDataset([c for c in convs if c.index not in bad], processor, template, max_length=max_length,
                                overflow=overflow, image_limits=limits, workers=workers, video_limits=video_limits)
    clock.append(time.perf_counter())
    spent = {what: b - a for what, a, b in zip(("read", "checks", "tokenization"), clock, clock[1:])}
    return Built(dataset, problems, mixture.table(problems) if mixture.is_mixture else None, image_paths(convs),
                 _took(spent))
