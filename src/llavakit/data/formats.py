"""Readers: every supported dataset row becomes one `Conversation` (or a `Problem` saying why not).

Two row schemas, read from three kinds of container:

* ``llava`` — ``{"id", "image": path | "images": [paths], "video": v | "videos": [v, ...], "conversations":
  [{"from", "value"}]}``;
  ``from`` is human / gpt / system (user / assistant also accepted). xtuner's spelling
  ``conversation`` is accepted, with either ``{from, value}`` turns or its own ``{system, input,
  output}`` exchanges. A row without an image is a text-only sample.
* ``messages`` (ShareGPT / OpenAI / TRL) — ``{"messages": [{"role", "content"}], "images": [...]}``;
  ``content`` is a string with ``<image>`` markers or a list of ``{"type": "image" | "video" | "text"}`` parts.

A video ``v`` is a file path or a list of frame image paths (``"video": [f0, f1, ...]`` is one video; ``"videos"``
lists videos), one ``<video>`` marker each. A row with one video and no ``<video>`` marker gets one at the start
of its first user turn (as a one-image row gets ``<image>``); a row with videos, no images and no ``<video>``
marker whose ``<image>`` markers match its videos (LLaVA-Video-178K's spelling) has them read as ``<video>``.

Containers: a ``.json`` array or ``.jsonl`` file, a Python list of rows, or a Hugging Face
``datasets`` source (a ``Dataset``/``IterableDataset`` object, a ``save_to_disk`` folder, parquet /
arrow files, optionally streamed). Image paths are resolved against ``image_folder`` (default: the
data file's folder). Images from ``datasets`` are kept as encoded bytes, so they are decoded lazily,
in dataloader workers, by `llavakit.data.images.open_image`.

Readers only normalise; what can be judged on a normalised conversation (alternating roles,
marker counts, images on disk, ...) is `llavakit.data.validate`'s job.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from .conversation import IMAGE_MARKER, Conversation, Problem, SampleError, Turn
from .jsonrows import json_rows
from .video import VIDEO_MARKER
from .sources import FORMATS, DataSourceError, RowError, container_kind, describe_source, hf_dataset, hf_rows
from .writers import ROW_SCHEMAS, write_conversations

__all__ = ["FORMATS", "ROW_SCHEMAS", "DataSourceError", "detect_format", "iter_conversations", "load_conversations",
           "parse_row", "write_conversations"]

log = logging.getLogger(__name__)

# Accepted role spellings -> our roles. Exact keys only: an unknown role is an error, never a guess.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SURROGATE = re.compile("[\ud800-\udfff]")  # no UTF-8 text holds one; tokenizers refuse them
KNOWN_KEYS = {
    "llava": {"id", "image", "images", "video", "videos", "conversations", "conversation"},
    "messages": {"id", "image", "images", "video", "videos", "messages"},
}


# --- schemas ----------------------------------------------------------------------------------
def _schema_of(row: Any) -> str | None:
    if isinstance(row, dict):
        if "conversations" in row or "conversation" in row:
            return "llava"
        if "messages" in row:
            return "messages"
    return None


def _detect_schema(rows: Iterator, label: str, peek: int = 100) -> tuple[str, Iterator]:
    """The row schema from the first recognisable row (rows read to decide are put back)."""
    seen = []
    for item in itertools.islice(rows, peek):
        seen.append(item)
        schema = _schema_of(item[1])
        if schema:
            return schema, itertools.chain(seen, rows)
    if not seen:  # an empty source: nothing to read, whatever its format
        return "llava", iter(())
    keys = next((sorted(r) for _, r in seen if isinstance(r, dict)), None)
    raise DataSourceError(
        f"{label}: cannot tell the row format (first row keys: {keys}); a 'llava' row has 'conversations', "
        "a 'messages' row has 'messages'. Pass --format llava|messages if the file is one of them")


def detect_format(source: Any) -> str:
    """'llava' or 'messages' for JSON/JSONL files and lists (from the first row); 'hf' for datasets."""
    container = container_kind(source, "auto")
    if container == "hf":
        return "hf"
    rows = json_rows(Path(source)) if container == "json" else enumerate(source)
    return _detect_schema(iter(rows), describe_source(source))[0]


# --- rows -> conversations ----------------------------------------------------------------------
def _wrong_type(what: str, value: Any, expected: str) -> RowError:
    return RowError(f"wrong type: {what} is {type(value).__name__}, expected {expected}",
                     f"make {what} {expected}")


def _text(value: Any, where: str) -> str:
    """`value` if it is text a tokenizer can take; else the `RowError` saying why not."""
    if not isinstance(value, str):
        raise _wrong_type(where, value, "a string")
    m = _SURROGATE.search(value)
    if m:
        raise RowError(f"not UTF-8: {where} holds the unpaired surrogate \\u{ord(m.group()):04x} at character "
                       f"{m.start()}", f"fix the text of {where} (a \\udXXX escape must be half of a pair)")
    return value


def _role(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise _wrong_type(where, name, "a string")
    role = ROLE_NAMES.get(name.strip().lower())
    if role is None:
        raise RowError(f"unknown role: {where} is {name!r}", f"use one of {sorted(ROLE_NAMES)}")
    return role


def _llava_turns(raw: Any, key: str) -> list[Turn]:
    if not isinstance(raw, list):
        raise _wrong_type(f"'{key}'", raw, "a list of turns")
    turns = []
    for k, t in enumerate(raw):
        if not isinstance(t, dict):
            raise _wrong_type(f"{key}[{k}]", t, "an object")
        if "from" not in t and ("input" in t or "output" in t):  # xtuner: one {system, input, output} exchange
            for field, role in (("system", "system"), ("input", "user"), ("output", "assistant")):
                value = t.get(field)
                if field == "system" and not value:
                    continue
                turns.append(Turn(role, _text(value, f"{key}[{k}].{field}")))
            continue
        for field in ("from", "value"):
            if field not in t:
                raise RowError(f"missing key: {key}[{k}] has no '{field}'",
                                "every turn needs 'from' (human/gpt/system) and 'value'")
        turns.append(Turn(_role(t["from"], f"{key}[{k}].from"), _text(t["value"], f"{key}[{k}].value")))
    return turns


def _message_turns(raw: Any) -> tuple[list[Turn], list[Any], list[Any]]:
    """Turns, plus images and videos given inline in ``{"type": "image", "image": ...}`` /
    ``{"type": "video", "video": ...}`` parts."""
    if not isinstance(raw, list):
        raise _wrong_type("'messages'", raw, "a list of messages")
    turns, inline, inline_videos = [], [], []
    for k, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _wrong_type(f"messages[{k}]", m, "an object")
        for field in ("role", "content"):
            if field not in m:
                raise RowError(f"missing key: messages[{k}] has no '{field}'",
                                "every message needs 'role' (user/assistant/system) and 'content'")
        role, content = _role(m["role"], f"messages[{k}].role"), m["content"]
        if isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    pieces.append(IMAGE_MARKER)
                    ref = part.get("image") or part.get("path") or part.get("url")
                    if ref is not None:
                        inline.append(ref)
                elif kind == "video":
                    pieces.append(VIDEO_MARKER)
                    ref = part.get("video") or part.get("path")
                    if ref is not None:
                        inline_videos.append(ref)
                elif kind == "text":
                    text = part.get("text")
                    pieces.append("" if text is None else _text(text, f"messages[{k}].content[{j}].text"))
                else:
                    raise RowError(f"wrong type: messages[{k}].content[{j}] is not an image, video or text part",
                                    "use {'type': 'image'}, {'type': 'video'} or {'type': 'text', 'text': ...} parts")
            content = "\n".join(pieces)
        elif not isinstance(content, str):
            raise _wrong_type(f"messages[{k}].content", content, "a string or a list of parts")
        else:
            _text(content, f"messages[{k}].content")
        turns.append(Turn(role, content))
    return turns, inline, inline_videos


def _image_ref(value: Any, where: str, base: str | None) -> Any:
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # datasets Image(decode=False)
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, Image.Image)):
        return value
    if isinstance(value, (str, Path)):
        value = str(value)
        if _SURROGATE.search(value):
            try:
                os.fsencode(value)  # bytes that were not UTF-8 name a real file on POSIX; other surrogates cannot
            except UnicodeError:
                raise RowError(f"not UTF-8: {where} holds an unpaired surrogate", "fix the image path") from None
        if not value.strip():
            raise RowError(f"wrong type: {where} is an empty path", "give the image's file name or drop the key")
        if "://" in value or os.path.isabs(value):
            return value
        return os.path.abspath(os.path.join(base or os.getcwd(), value))
    raise _wrong_type(where, value, "an image path")


def _empty_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and not value


def _images(row: dict, base: str | None) -> list[Any]:
    given = {k: row[k] for k in ("image", "images") if row.get(k) is not None and not _empty_list(row[k])}
    if len(given) == 2:
        raise RowError("wrong type: the row has both 'image' and 'images'", "keep one of them")
    if not given:
        return []
    key, value = given.popitem()
    values = value if isinstance(value, (list, tuple)) else [value]
    return [_image_ref(v, f"'{key}'" if len(values) == 1 else f"'{key}'[{i}]", base) for i, v in enumerate(values)]


def _video_ref(value: Any, where: str, base: str | None) -> Any:
    """A video file path (resolved against `base`), or a list of frame image references."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise RowError(f"wrong type: {where} is an empty list of frames", "give the video's frames, or drop it")
        return [_image_ref(f, f"{where}[{i}]", base) for i, f in enumerate(value)]
    if isinstance(value, (str, Path)):
        return _image_ref(value, where, base)
    raise _wrong_type(where, value, "a video path or a list of frame paths")


def _videos(row: dict, base: str | None) -> list[Any]:
    """``video``: one video (a path, or a list of frame paths); ``videos``: a list of videos."""
    given = {k: row[k] for k in ("video", "videos") if row.get(k) is not None and not _empty_list(row[k])}
    if len(given) == 2:
        raise RowError("wrong type: the row has both 'video' and 'videos'", "keep one of them")
    if "video" in given:
        return [_video_ref(given["video"], "'video'", base)]
    if "videos" in given:
        value = given["videos"]
        if not isinstance(value, (list, tuple)):
            raise _wrong_type("'videos'", value, "a list of videos (paths, or lists of frame paths)")
        return [_video_ref(v, f"'videos'[{i}]", base) for i, v in enumerate(value)]
    return []


def _insert_video_markers(conv: Conversation, problem) -> None:
    """A row with videos but no ``<video>`` marker: LLaVA-Video-style ``<image>`` markers standing for the videos
    are read as ``<video>``; else one video gets its marker at the start of the first user turn."""
    if not conv.videos or conv.num_video_markers():
        return
    if not conv.images and conv.num_markers() == len(conv.videos):
        for t in conv.turns:
            t.content = t.content.replace(IMAGE_MARKER, VIDEO_MARKER)
        conv.meta["video_markers_from_image"] = True
        return
    first_user = next((t for t in conv.turns if t.role == "user"), None)
    if len(conv.videos) == 1 and first_user is not None:
        first_user.content = f"{VIDEO_MARKER}\n{first_user.content}"
        conv.meta["video_marker_inserted"] = True
        problem("warning", "marker inserted: the row has one video but no <video> marker; one was put at the "
                "start of the first user turn", "write <video> where the video belongs to silence this")


def _sample_id(raw: Any) -> str | None:
    """The row's id as text (None when it has none, or one of the wrong type), printable as it is."""
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        return None
    try:
        text = str(raw)
    except ValueError:  # an integer with more digits than Python converts
        return f"<an integer of {raw.bit_length()} bits>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # unpaired surrogates written as \udXXX


def parse_row(row: Any, schema: str, *, index: int, source: str = "", image_folder: str | None = None,
              warn_unknown_keys: bool = True) -> tuple[Conversation | None, list[Problem]]:
    """One raw row -> (conversation or None, problems). Never raises on bad data."""
    if schema not in ROW_SCHEMAS:
        raise ValueError(f"unknown row schema {schema!r}; valid: {list(ROW_SCHEMAS)}")
    raw_id = row.get("id") if isinstance(row, dict) else getattr(row, "id", None)
    sid = _sample_id(raw_id)
    problems: list[Problem] = []

    def problem(severity: str, reason: str, hint: str) -> None:
        problems.append(Problem(index, sid, severity, reason, hint, source))

    try:
        if isinstance(row, RowError):
            raise row
        if not isinstance(row, dict):
            raise _wrong_type("the row", row, "a JSON object")
        if raw_id is not None and sid is None:
            raise _wrong_type("'id'", raw_id, "a string or an integer")
        if schema == "llava":
            key = "conversations" if "conversations" in row else "conversation" if "conversation" in row else None
            if key is None:
                raise RowError(f"missing key: no 'conversations' list (keys: {sorted(row)})",
                                "a llava row needs 'conversations': [{'from': 'human'|'gpt', 'value': ...}]")
            turns, inline, inline_videos = _llava_turns(row[key], key), [], []
        else:
            if "messages" not in row:
                raise RowError(f"missing key: no 'messages' list (keys: {sorted(row)})",
                                "a messages row needs 'messages': [{'role': 'user'|'assistant', 'content': ...}]")
            turns, inline, inline_videos = _message_turns(row["messages"])
        images = _images(row, image_folder)
        if inline and images:
            raise RowError("wrong type: images given both inline in content parts and in 'images'", "keep one of them")
        images = images or [_image_ref(v, "an inline image part", image_folder) for v in inline]
        videos = _videos(row, image_folder)
        if inline_videos and videos:
            raise RowError("wrong type: videos given both inline in content parts and in 'videos'", "keep one of them")
        videos = videos or [_video_ref(v, "an inline video part", image_folder) for v in inline_videos]
    except RowError as e:
        sid = sid if sid is not None else e.id
        problem("error", e.reason, e.hint)
        return None, problems
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as e:
        # A shape no check above foresaw: still this row's problem, never the end of the reading.
        problem("error", f"unreadable row: {type(e).__name__}: {e}",
                f"make the row a {schema} row as docs/data.md describes, or remove it")
        return None, problems

    if warn_unknown_keys:
        for key in sorted(set(row) - KNOWN_KEYS[schema], key=str):
            problem("warning", f"unknown key: {key!r} is not a {schema} field and is ignored",
                    f"remove it, or check its spelling against {sorted(KNOWN_KEYS[schema])}")
    conv = Conversation(turns, images, id=sid, index=index, source=source, meta={"format": schema}, videos=videos)
    _insert_video_markers(conv, problem)
    if len(images) == 1 and conv.num_markers() == 0:
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is not None:
            # LLaVA's behaviour for single-image rows: the image goes before the first question.
            first_user.content = f"{IMAGE_MARKER}\n{first_user.content}"
            conv.meta["marker_inserted"] = True
            problem("warning", "marker inserted: the row has one image but no <image> marker; "
                    "one was put at the start of the first user turn",
                    "write <image> where the image belongs to silence this")
    return conv, problems


# --- public entry points ------------------------------------------------------------------------
def iter_conversations(source: Any, format: str = "auto", image_folder: str | os.PathLike | None = None, *,
                       on_error: str = "raise", problems: list[Problem] | None = None, split: str = "train",
                       streaming: bool = False) -> Iterator[Conversation]:
    """Stream conversations from `source` (file, folder, list of rows or a datasets object).

    ``on_error="raise"`` raises `SampleError` at the first sample that cannot be read;
    ``"collect"`` skips it. Problems found (warnings always, errors with "collect") are appended
    to `problems` when given, else logged. `DataSourceError` when the source itself is unreadable.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid: {list(FORMATS)}")
    if on_error not in ("raise", "collect"):
        raise ValueError(f"on_error must be 'raise' or 'collect', not {on_error!r}")
    container = container_kind(source, format)
    label = describe_source(source)
    if container == "json":
        rows: Iterator = iter(json_rows(Path(source)))
        base = os.path.abspath(image_folder or Path(source).parent)
    elif container == "list":
        rows, base = iter(enumerate(source)), os.path.abspath(image_folder or os.getcwd())
    else:
        rows = hf_rows(hf_dataset(source, split, streaming))
        local = isinstance(source, (str, Path)) and Path(source).is_dir()
        base = os.path.abspath(image_folder or (source if local else os.getcwd()))
    schema = format if format in ROW_SCHEMAS else None
    if schema is None:
        schema, rows = _detect_schema(rows, label)
    for index, row in rows:
        conv, found = parse_row(row, schema, index=index, source=label, image_folder=base,
                                warn_unknown_keys=container != "hf")  # hf columns are a schema, not typos
        for p in found:
            if p.severity == "error" and on_error == "raise":
                raise SampleError(p)
            if problems is not None:
                problems.append(p)
            else:
                log.warning("%s", p)
        if conv is not None:
            yield conv


def load_conversations(source: Any, format: str = "auto", image_folder: str | os.PathLike | None = None, *,
                       on_error: str = "raise", split: str = "train",
                       streaming: bool = False) -> tuple[list[Conversation], list[Problem]]:
    """Read every row: (conversations, problems). See `iter_conversations` for the arguments."""
    problems: list[Problem] = []
    convs = list(iter_conversations(source, format, image_folder, on_error=on_error, problems=problems,
                                    split=split, streaming=streaming))
    return convs, problems
