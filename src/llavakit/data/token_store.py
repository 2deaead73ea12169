"""`TokenStore`: a tokenized dataset as a few flat numpy arrays, not Python lists of ints.

One ``int32`` array holds the token ids of every sample back to back (``offsets`` [N+1] cut it); labels are not
stored: a sample's supervised positions are a few ``[start, end)`` spans (``spans`` [S, 2], cut by ``span_offsets``
[N+1]), and a label is its token id there and ``IGNORE_INDEX`` elsewhere. Image and video references are indices
into one table of distinct paths (a video given as frames is one entry: its frame paths joined by NUL after a
leading NUL, `video_entry`), with each video's sampled frame count beside it; sample ids are packed UTF-8
(`Strings`); a sample's source is an index into a table of distinct source names plus a row number (a mixture's
``"<file> row N"``, `source_of`), so the store holds no string per sample for it. Every column is a plain array, so the start-up cache (`llavakit.data.token_cache`) writes them
to one file and memory-maps them back: a re-run holds almost nothing resident until a sample is read.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .conversation import Conversation

IGNORE_INDEX = -100
FRAMES = "\x00"  # no path holds a NUL: a table entry starting with one is a video's frame paths, NUL-separated


def video_entry(ref: Any) -> Any:
    """A video reference as a table entry: a path as is, a list of frame paths as one string (`video_of` reverses
    it); anything else (frames held as bytes or PIL images) as the object itself (then not cacheable)."""
    if isinstance(ref, (list, tuple)) and all(isinstance(f, str) for f in ref):
        return FRAMES + FRAMES.join(ref)
    return ref


def video_of(entry: Any) -> Any:
    """The video reference a table entry stands for (`video_entry`)."""
    if isinstance(entry, str) and entry.startswith(FRAMES):
        return entry[1:].split(FRAMES)
    return entry


def source_parts(conv: Conversation) -> tuple[str, int]:
    """(name, row) of a conversation's source: a mixture's ``"<label> row N"`` (``meta["row"]`` N) as its label
    and N, anything else as itself and -1. `source_of` puts it back together exactly."""
    row = conv.meta.get("row") if conv.meta else None
    if isinstance(row, int) and row >= 0:
        tail = f" row {row}"
        if conv.source.endswith(tail):
            return conv.source[:-len(tail)], row
    return conv.source, -1


def source_of(name: str | None, row: int) -> str:
    """The source string of (name, row) (`source_parts`)."""
    return (name or "") + (f" row {row}" if row >= 0 else "")


class Strings:
    """A read-only sequence of ``str | None`` packed as UTF-8 bytes + offsets (``None``: ``present`` False)."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, present: np.ndarray):
        self.blob, self.offsets, self.present = blob, offsets, present

    @classmethod
    def pack(cls, values: Sequence[str | None]) -> "Strings":
        encoded = [b"" if v is None else v.encode("utf-8", "surrogatepass") for v in values]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(blob, offsets, np.array([v is not None for v in values], dtype=bool))

    def __len__(self) -> int:
        return len(self.present)

    def __getitem__(self, i: int) -> str | None:
        if not self.present[i]:
            return None
        return bytes(self.blob[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8", "surrogatepass")

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.blob": self.blob, f"{prefix}.offsets": self.offsets, f"{prefix}.present": self.present}

    @classmethod
    def of(cls, arrays: dict[str, np.ndarray], prefix: str) -> "Strings":
        return cls(arrays[f"{prefix}.blob"], arrays[f"{prefix}.offsets"], arrays[f"{prefix}.present"])


def supervised_spans(labels: Sequence[int]) -> np.ndarray:
    """[S, 2] int32 ``[start, end)`` runs of positions whose label is not IGNORE_INDEX."""
    sup = np.asarray(labels, dtype=np.int64) != IGNORE_INDEX
    edges = np.diff(np.concatenate(([False], sup, [False])).astype(np.int8))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).astype(np.int32)


class Column:
    """A numpy array grown in place with ``ndarray.resize`` (``realloc``: a large block is moved by ``mremap``, not
    copied), so building a column of N values never holds two copies of it. numpy zero-fills what a resize adds
    (resident at once), so the capacity grows by 1/16 at a time: at most 1/16 of the column is slack."""

    def __init__(self, dtype, tail: tuple = ()):
        self.data = np.empty((16, *tail), dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self.data):
            self.data.resize((max(need, len(self.data) + len(self.data) // 16), *self.data.shape[1:]), refcheck=False)
        self.data[self.size:need] = values
        self.size = need

    def finish(self) -> np.ndarray:
        """The values (the column is done: its buffer is shrunk to them and handed over)."""
        self.data.resize((self.size, *self.data.shape[1:]), refcheck=False)
        data, self.data = self.data, None
        return data


class StoreBuilder:
    """Collects encoded samples (in dataset order) into the arrays of a `TokenStore`.

    Every `SEAL_EVERY` samples what was added is appended to one growing numpy `Column` per array, so the
    builder holds a few Python objects per sample only for the samples since the last seal, and no copy of
    its arrays when it finishes: a build over millions of samples costs its arrays, not a list of small
    objects per sample. The distinct image references (`table`) stay Python strings (one per distinct image)."""

    SEAL_EVERY = 4096

    def __init__(self, with_sizes: bool):
        self.with_sizes = with_sizes
        self.table: list[Any] = []  # distinct image references
        self._where: dict[Any, int] = {}
        self._source_names: dict[str, int] = {}
        i32, i64 = np.int32, np.int64
        self._columns = {name: Column(dtype, tail) for name, dtype, tail in (
            ("ids", i32, ()), ("lengths", i64, ()), ("spans", i32, (2,)), ("n_spans", i64, ()), ("n_images", i32, ()),
            ("images", i32, ()), ("n_videos", i32, ()), ("videos", i32, ()), ("video_frames", i32, ()),
            ("index", i64, ()), ("source", i32, ()), ("source_row", i64, ()), ("id.blob", np.uint8, ()), ("id.lengths", i64, ()),
            ("id.present", bool, ()), ("sizes", i64, (2,)))}
        self._start()

    def _start(self) -> None:
        self.ids: list[np.ndarray] = []
        self.spans: list[np.ndarray] = []
        self.n_images: list[int] = []
        self.images: list[int] = []  # table positions, sample after sample
        self.sizes: list[tuple[int, int]] | None = [] if self.with_sizes else None
        self.n_videos: list[int] = []
        self.videos: list[int] = []  # table positions of the videos, sample after sample
        self.video_frames: list[int] = []  # each video's sampled frame count (its placeholders follow from it)
        self.index: list[int] = []
        self.sample_ids: list[str | None] = []
        self.sources: list[int] = []  # positions in the distinct source names
        self.source_rows: list[int] = []  # a mixture's row number, -1 for none

    def __len__(self) -> int:
        return self._columns["n_images"].size + len(self.n_images)

    def _ref(self, ref: Any) -> int:
        key = ref if isinstance(ref, str) else ("object", id(ref))
        k = self._where.get(key)
        if k is None:
            k = self._where[key] = len(self.table)
            self.table.append(ref)
        return k

    def add(self, conv: Conversation, ids: np.ndarray, spans: np.ndarray, n_images: int,
            sizes: Sequence[tuple[int, int]] | None, n_videos: int = 0, frames: Sequence[int] = ()) -> None:
        self.ids.append(ids)
        self.spans.append(spans)
        self.n_images.append(n_images)
        self.images += [self._ref(ref) for ref in conv.images[:n_images]]
        if self.sizes is not None:
            self.sizes += [tuple(s) for s in (sizes or [])[:n_images]]
        self.n_videos.append(n_videos)
        self.videos += [self._ref(video_entry(ref)) for ref in conv.videos[:n_videos]]
        self.video_frames += [int(f) for f in list(frames)[:n_videos]]
        self.index.append(conv.index)
        self.sample_ids.append(conv.id)
        name, row = source_parts(conv)  # a mixture's "<file> row N": the file's name once, N in a column
        self.sources.append(self._source_names.setdefault(name, len(self._source_names)))
        self.source_rows.append(row)
        if len(self.n_images) >= self.SEAL_EVERY:
            self.seal()

    def seal(self) -> None:
        """Append the samples added since the last seal to the columns (nothing changes in the result)."""
        if not self.n_images:
            return
        encoded = [b"" if v is None else v.encode("utf-8", "surrogatepass") for v in self.sample_ids]
        parts = {
            "ids": np.concatenate(self.ids),
            "lengths": [len(p) for p in self.ids],
            "spans": np.concatenate(self.spans).reshape(-1, 2),
            "n_spans": [len(p) for p in self.spans],
            "n_images": self.n_images, "images": self.images, "n_videos": self.n_videos, "videos": self.videos,
            "video_frames": self.video_frames, "index": self.index, "source": self.sources,
            "source_row": self.source_rows,
            "id.blob": np.frombuffer(b"".join(encoded), dtype=np.uint8),
            "id.lengths": [len(b) for b in encoded],
            "id.present": [v is not None for v in self.sample_ids],
            "sizes": np.asarray(self.sizes or [], dtype=np.int64).reshape(-1, 2),
        }
        for name, values in parts.items():
            column = self._columns[name]
            column.extend(np.asarray(values, dtype=column.data.dtype))
        self._start()

    def finish(self) -> "TokenStore":
        self.seal()
        done = {name: column.finish() for name, column in self._columns.items()}
        self._columns = {}

        def cuts(lengths):
            return np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))

        arrays = {
            "ids": done["ids"], "offsets": cuts(done["lengths"]),
            "spans": done["spans"], "span_offsets": cuts(done["n_spans"]),
            "n_images": done["n_images"], "image_offsets": cuts(done["n_images"]), "images": done["images"],
            "n_videos": done["n_videos"], "video_offsets": cuts(done["n_videos"]), "videos": done["videos"],
            "video_frames": done["video_frames"], "index": done["index"], "source": done["source"],
            "source_row": done["source_row"],
        }
        if self.with_sizes:
            arrays["sizes"] = done["sizes"]
        arrays.update({"id.blob": done["id.blob"], "id.offsets": cuts(done["id.lengths"]),
                       "id.present": done["id.present"]})
        arrays.update(Strings.pack(list(self._source_names)).arrays("source_names"))
        if all(isinstance(r, str) for r in self.table):  # paths: packed (and cacheable)
            arrays.update(Strings.pack(self.table).arrays("table"))
            return TokenStore(arrays)
        return TokenStore(arrays, table=list(self.table))


class TokenStore:
    """The columns of a tokenized dataset (see the module docstring); ``arrays`` may be memory-maps.

    ``table`` is given only when some image reference is not a path (bytes, a PIL image): such a
    store lives in memory and is not written to the start-up cache (`cacheable` is False)."""

    def __init__(self, arrays: dict[str, np.ndarray], table: list | None = None):
        self.arrays = arrays
        self._ids, self._offsets = arrays["ids"], arrays["offsets"]
        self._spans, self._span_offsets = arrays["spans"], arrays["span_offsets"]
        self._images, self._image_offsets = arrays["images"], arrays["image_offsets"]
        self._sizes = arrays.get("sizes")
        self.table = table if table is not None else Strings.of(arrays, "table")
        self.cacheable = table is None
        self._sample_ids = Strings.of(arrays, "id")
        self._source_names = Strings.of(arrays, "source_names")
        self._source_rows = arrays.get("source_row")  # absent in a store built before it: names are whole
        self.n_images = arrays["n_images"]
        n = len(self.n_images)  # a store without video columns (built before videos) has none
        self.n_videos = arrays.get("n_videos", np.zeros(n, np.int32))
        self._video_offsets = arrays.get("video_offsets", np.zeros(n + 1, np.int64))
        self._videos = arrays.get("videos", np.zeros(0, np.int32))
        self._video_frames = arrays.get("video_frames", np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.n_images)

    @property
    def has_sizes(self) -> bool:
        return self._sizes is not None

    def lengths(self) -> list[int]:
        return np.diff(self._offsets).tolist()

    def tokens(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [L], labels [L]) of sample i (int64)."""
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        ids = torch.from_numpy(np.array(self._ids[a:b], dtype=np.int64))  # copy out of a memory-map
        labels = torch.full_like(ids, IGNORE_INDEX)
        for start, end in self._spans[self._span_offsets[i]:self._span_offsets[i + 1]]:
            labels[start:end] = ids[start:end]
        return ids, labels

    def images(self, i: int) -> list[Any]:
        """The references of sample i's images that survived truncation, in placeholder order."""
        a, b = int(self._image_offsets[i]), int(self._image_offsets[i + 1])
        return [self.table[int(k)] for k in self._images[a:b]]

    def videos(self, i: int) -> list[Any]:
        """The references of sample i's videos that survived truncation (a path or a list of frame paths)."""
        a, b = int(self._video_offsets[i]), int(self._video_offsets[i + 1])
        return [video_of(self.table[int(k)]) for k in self._videos[a:b]]

    def video_frames(self, i: int) -> list[int]:
        """Sampled frames of each of sample i's videos, as counted when it was tokenized."""
        a, b = int(self._video_offsets[i]), int(self._video_offsets[i + 1])
        return [int(f) for f in self._video_frames[a:b]]

    def sizes(self, i: int) -> list[tuple[int, int]] | None:
        if self._sizes is None:
            return None
        a, b = int(self._image_offsets[i]), int(self._image_offsets[i + 1])
        return [tuple(int(v) for v in s) for s in self._sizes[a:b]]

    def sample(self, i: int) -> Conversation:
        """Sample i's identity and images as a `Conversation` without turns (the text is not kept)."""
        return Conversation([], self.images(i), id=self._sample_ids[i], index=int(self.arrays["index"][i]),
                            source=source_of(self._source_names[int(self.arrays["source"][i])],
                                             -1 if self._source_rows is None else int(self._source_rows[i])),
                            videos=self.videos(i))
