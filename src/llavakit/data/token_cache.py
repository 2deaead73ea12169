"""The start-up cache: what reading, validating and tokenizing the training data produced, on disk.

A training run reads every row, checks every image and tokenizes every conversation before its
first step. `prepare` does that once and writes the result — the `TokenStore` arrays, the problems
found and the report — to one file; the next run with the same inputs memory-maps it instead.
The first run builds it streaming (`llavakit.data.startup_build`): JSON/JSONL rows are read, checked and
tokenized a chunk at a time into compact arrays, so its memory does not grow with a Python object per row.

**The key** is a hash of everything that changes the result: each data file's content (and a mixture YAML's),
``data.train`` / ``image_folder`` / ``format`` / ``seed``, the tokenizer (its full serialized form:
vocabulary, merges, added tokens, normalizer...), the template, the processor's image-token policy and video
sampling (``video_max_frames`` / ``video_fps``: every plain processor setting), ``max_length`` / ``overflow``,
the image and video limits and ``check_images``, and this module's `CACHE_VERSION`. Images and videos (files and frame
files) are not hashed: their size and mtime are stored, and a hit whose images or videos changed on disk is
rebuilt (a video's frame count, read from its metadata, is cached with it). A file that is truncated or
corrupt (magic, header, sizes, CRC-32 of the arrays) is rebuilt too, with a log line; a hit is logged.

**The file** (``startup-<key>.llkt``): 8 magic bytes, the header length, a JSON header (key, meta,
each array's dtype / shape / offset, the CRC), then the arrays, each 64-byte aligned so that
``numpy.memmap`` maps them in place. It is written to a temporary name and moved into place with
``os.replace``, so a reader never sees half a file. Only JSON/JSONL sources whose images are paths
are cached (a datasets folder or in-memory rows are read every time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .conversation import Problem
from .token_store import Strings, TokenStore

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # bump when what the cache holds, or how the data is tokenized, changes (2: anyres_max
# recounts an image left alone by truncation, `dataset.encode_sample`; 3: video columns and counts; 4: a source is
# a name index + a row column, not one name per mixture row)
ENV_DIR = "LLAVAKIT_DATA_CACHE"  # default cache folder for every run (data.cache_dir wins)
MAGIC = b"LLKTOK01"
ALIGN = 64
_CHUNK = 8 << 20


class CacheUnusable(Exception):
    """The cache file cannot be trusted (the message says why); it is rebuilt."""


# --- the file ----------------------------------------------------------------------------------------
def write_arrays(path: Path, arrays: dict[str, np.ndarray], header: dict) -> None:
    """`arrays` and a JSON `header` into `path`, atomically (temporary file + ``os.replace``)."""
    layout, offset = {}, 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes}
        offset += -(-a.nbytes // ALIGN) * ALIGN
    crc = 0
    for name, a in arrays.items():
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)
        crc = zlib.crc32(b"\0" * (-a.nbytes % ALIGN), crc)
    head = json.dumps({**header, "arrays": layout, "data_bytes": offset, "crc32": crc}).encode()
    start = -(-(len(MAGIC) + 8 + len(head)) // ALIGN) * ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(head).to_bytes(8, "little") + head)
            f.write(b"\0" * (start - f.tell()))
            for name, a in arrays.items():
                f.write(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
                f.write(b"\0" * (-a.nbytes % ALIGN))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_arrays(path: Path, verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays memory-mapped read-only, header) of a file `write_arrays` wrote; `CacheUnusable` when it is
    truncated or corrupt. ``verify`` checks the CRC of the arrays (reading the file once, not into memory)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(len(MAGIC) + 8)
            if len(first) < len(MAGIC) + 8 or first[:len(MAGIC)] != MAGIC:
                raise CacheUnusable("not a llavakit start-up cache file (bad magic bytes)")
            n = int.from_bytes(first[len(MAGIC):], "little")
            if n > size:
                raise CacheUnusable("truncated (header longer than the file)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CacheUnusable(f"corrupt header ({e})") from None
            start = -(-(len(MAGIC) + 8 + n) // ALIGN) * ALIGN
            if size != start + header["data_bytes"]:
                raise CacheUnusable(f"truncated or padded: {size} bytes, expected {start + header['data_bytes']}")
            if verify:
                f.seek(start)
                crc = 0
                while chunk := f.read(_CHUNK):
                    crc = zlib.crc32(chunk, crc)
                if crc != header["crc32"]:
                    raise CacheUnusable("corrupt (CRC-32 of the arrays does not match)")
        arrays = {}
        for name, spec in header["arrays"].items():
            shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
            if spec["nbytes"] == 0:
                arrays[name] = np.zeros(shape, dtype=dtype)
            else:
                arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + spec["offset"], shape=shape)
        return arrays, header
    except (KeyError, TypeError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CacheUnusable(f"unreadable ({type(e).__name__}: {e})") from None


# --- the key -----------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b of a file's content, read in chunks (the page cache, not this process, holds it)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"special": getattr(tokenizer, "special_tokens_map", {}), "len": len(tokenizer),
             "chat_template": getattr(tokenizer, "chat_template", None),
             "init": {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                      if isinstance(v, (str, int, float, bool, type(None)))}}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def processor_fingerprint(processor) -> dict:
    """The processor's settings (image-token policy, tokenization mode, ...) and its image processor's config:
    every plain attribute, so a setting added later is part of the key without a change here."""
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    out = {k: v for k, v in sorted(vars(processor).items()) if isinstance(v, plain) and not k.startswith("_")}
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and hasattr(image_processor, "to_dict"):
        out["image_processor"] = image_processor.to_dict()
    return out


def template_fingerprint(template) -> dict:
    return {"name": template.name, "spec": repr(template.spec), "bos": template.bos, "eos": template.eos,
            "system": template.system}


def source_files(sources: Sequence, extra: Sequence[str | os.PathLike] = ()) -> list[str] | str:
    """The files behind a list of `llavakit.data.mixture.Source` (plus `extra`, e.g. the mixture YAML), or
    the reason they cannot be cached (only JSON/JSONL files can)."""
    from .sources import JSON_SUFFIXES

    files = [os.path.abspath(p) for p in extra]
    for s in sources:
        if not isinstance(s.path, (str, os.PathLike)):
            return "the data is not a file"
        p = Path(s.path)
        if not p.exists():
            return f"{p} does not exist"
        if s.format == "hf" or p.suffix.lower() not in JSON_SUFFIXES or not p.is_file():
            return f"{p} is not a JSON/JSONL file"
        files.append(os.path.abspath(p))
    return files


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --- what is cached ----------------------------------------------------------------------------------
@dataclass
class Prepared:
    """The training data before the first step: the dataset, every problem found, the mixture table."""

    dataset: Any  # a `SupervisedDataset`
    problems: list[Problem]
    mixture_table: str | None = None  # `Mixture.table(problems)` for a mixture, else None
    images: list[str] = dataclasses.field(default_factory=list)  # every image path the checks looked at
    cache_note: str = ""  # what the start-up cache did (hit, built, off and why)


def image_stats(paths: Sequence[str]) -> np.ndarray:
    """[n, 2] int64 (size, mtime_ns) of each path; (-1, -1) where it cannot be read."""
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for k, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[k] = (st.st_size, st.st_mtime_ns)
    return out


def _problem(d: dict) -> Problem:
    return Problem(d["index"], d["id"], d["severity"], d["reason"], d["hint"], d["source"])


class StartupCache:
    """One cache file: `load` it (None on a miss or an unusable file) or `save` a `Prepared`."""

    def __init__(self, directory: str | os.PathLike, description: dict):
        self.description = description
        self.key = cache_key(description)
        self.path = Path(directory) / f"startup-{self.key}.llkt"

    def load(self, processor, template, limits, say=print, video_limits=None) -> Prepared | None:
        from .dataset import DatasetReport, SupervisedDataset

        if not self.path.is_file():
            return None
        try:
            arrays, header = read_arrays(self.path)
            if header.get("key") != self.key or header.get("version") != CACHE_VERSION:
                raise CacheUnusable("written for other inputs")
            checked = Strings.of(arrays, "checked")
            paths = [checked[k] for k in range(len(checked))]
            now = image_stats(paths)
            changed = np.flatnonzero((now != np.asarray(arrays["checked.stats"])).any(axis=1))
            if len(changed):
                raise CacheUnusable(f"{len(changed)} image(s) changed since it was built, e.g. {paths[changed[0]]}")
            meta = header["meta"]
            rep = meta["report"]
            report = DatasetReport(total=rep["total"], truncated=rep["truncated"], dropped=rep["dropped"],
                                   skipped=rep["skipped"], problems=[_problem(p) for p in rep["problems"]],
                                   skipped_indices=list(rep["skipped_indices"]))
            store = TokenStore({k: v for k, v in arrays.items() if not k.startswith("checked")})
            dataset = SupervisedDataset.from_store(store, report, processor, template, image_limits=limits,
                                                   video_limits=video_limits)
        except (CacheUnusable, KeyError, TypeError, ValueError) as e:
            say(f"start-up cache: {self.path} is unusable ({e or type(e).__name__}); rebuilding it")
            self.path.unlink(missing_ok=True)
            return None
        note = f"start-up cache: hit {self.path} ({len(dataset)} samples; built by the first run on this data)"
        say(note)
        return Prepared(dataset, [_problem(p) for p in meta["problems"]], meta["mixture_table"], paths, note)

    def save(self, prepared: Prepared, say=print) -> bool:
        """Write `prepared` (False, with a log line, when it cannot be cached or the write fails)."""
        store = prepared.dataset.store
        if not store.cacheable:
            return False
        report = prepared.dataset.report
        meta = {"problems": [dataclasses.asdict(p) for p in prepared.problems],
                "mixture_table": prepared.mixture_table,
                "report": {"total": report.total, "truncated": report.truncated, "dropped": report.dropped,
                           "skipped": report.skipped, "problems": [dataclasses.asdict(p) for p in report.problems],
                           "skipped_indices": list(report.skipped_indices)}}
        arrays = dict(store.arrays)
        arrays.update(Strings.pack(prepared.images).arrays("checked"))
        arrays["checked.stats"] = image_stats(prepared.images)
        try:
            write_arrays(self.path, arrays, {"key": self.key, "version": CACHE_VERSION, "meta": meta,
                                             "inputs": self.description})
        except OSError as e:
            say(f"start-up cache: could not write {self.path} ({e}); the next run reads the data again")
            return False
        return True

    def reopen(self, prepared: Prepared, processor, template, limits, video_limits=None) -> Prepared:
        """`prepared` with its token arrays memory-mapped from the file just written (frees the copies)."""
        from .dataset import SupervisedDataset

        arrays, _ = read_arrays(self.path, verify=False)
        store = TokenStore({k: v for k, v in arrays.items() if not k.startswith("checked")})
        dataset = SupervisedDataset.from_store(store, prepared.dataset.report, processor, template, image_limits=limits,
                                               video_limits=video_limits)
        return dataclasses.replace(prepared, dataset=dataset)


# --- the training data, read or loaded ---------------------------------------------------------------
def prepare(train: Any, processor, template, *, image_folder: str | None = None, format: str = "auto",
            seed: int = 0, max_length: int | None = None, overflow: str = "truncate", limits=None,
            check_images: bool = True, cache_dir: str | os.PathLike | None = None, workers: int = 1,
            say=print, video_limits=None) -> Prepared:
    """Read, validate (`llavakit.data.validate`) and tokenize ``train`` (``data.train``: a file or a
    mixture) — or load all of that from the start-up cache in ``cache_dir`` (None: no cache). Problems
    are returned, never raised: what to refuse is the caller's policy. ``workers``: see `SupervisedDataset`;
    ``limits`` / ``video_limits``: `ImageLimits` / `VideoLimits` (None = the defaults)."""
    from .images import ImageLimits
    from .mixture import is_mixture_file, read_sources
    from .startup_build import build_streaming, build_whole
    from .video import VideoLimits

    limits, video_limits = limits or ImageLimits(), video_limits or VideoLimits()
    cache, note = None, "start-up cache: off"
    files = source_files(read_sources(train, image_folder, format), [train] if is_mixture_file(train) else [])
    if cache_dir is not None:
        if isinstance(files, str):
            note = f"start-up cache: off ({files})"
            say(note)
        else:
            description = {
                "version": CACHE_VERSION, "train": train, "files": {f: file_digest(f) for f in files},
                "image_folder": os.path.abspath(image_folder) if image_folder else None, "format": format,
                "seed": seed, "template": template_fingerprint(template),
                "tokenizer": tokenizer_fingerprint(processor.tokenizer), "processor": processor_fingerprint(processor),
                "max_length": max_length, "overflow": overflow, "limits": limits.as_kwargs(),
                "video_limits": dataclasses.asdict(video_limits), "check_images": check_images}
            cache = StartupCache(cache_dir, description)
            hit = cache.load(processor, template, limits, say, video_limits)
            if hit is not None:
                return hit
    # JSON/JSONL files stream (bounded memory, `startup_build`); other sources are read whole
    build = build_whole if isinstance(files, str) else build_streaming
    built = build(train, processor, template, image_folder=image_folder, format=format, seed=seed,
                  max_length=max_length, overflow=overflow, limits=limits, check_images=check_images, workers=workers,
                  video_limits=video_limits)
    dataset, paths, took = built.dataset, built.paths, built.took
    prepared = Prepared(dataset, built.problems, built.mixture_table, paths or [], f"{note} ({took})")
    del built
    if cache is not None:
        if paths is None or not dataset.store.cacheable:
            prepared.cache_note = "start-up cache: off (some images are not file paths)"
        elif cache.save(prepared, say):
            del dataset  # the arrays now live in the file: map them and drop the copies
            prepared = cache.reopen(prepared, processor, template, limits, video_limits)
            prepared.cache_note = f"start-up cache: wrote {cache.path} ({took})"
        say(prepared.cache_note)
    return prepared
