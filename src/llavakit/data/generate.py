"""`llavakit data generate`: instruction data from a teacher model, the LLaVA-Instruct way, as a job that
may run for days against a paid API and must lose nothing.

One *task* is one (sample, kind) pair, keyed ``"<sample id>-<kind>"`` — the id of the row it produces.
Tasks run on ``--concurrency`` threads (`llavakit.data.teacher` retries 429 / 5xx / timeouts / refused
connections with backoff). Every finished task is appended at once, and fsynced, to two files:

* ``OUT`` (JSONL): the accepted samples, LLaVA rows that `llavakit data check` and training read;
* ``OUT.log.jsonl``: one line per task — ``ok``, ``rejected`` (with the reason and the reply) or
  ``failed`` (the teacher could not be reached; retried on the next run) — with requests and tokens.

Running the same command again continues: tasks already ``ok`` or ``rejected`` are skipped (a line cut
off by a kill is dropped and its task redone), so nothing is lost or written twice. The request / token
budget counts earlier runs too (from the log); the in-flight requests may pass it by at most
``--concurrency``. Rows are appended in the order tasks finish.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .captions import CAPTION_COLUMNS, read_instructions, read_pairs
from .conversation import Conversation
from .instruct import (Prompt, Rejected, check_boxes, clean_pairs, context, load_prompt, messages,
                       parse_reply, qa_pairs, response_format, to_turns)
from .jsonrows import json_rows
from .sources import RowError
from .teacher import Teacher, TeacherError
from .writers import write_image_ref


@dataclass
class Item:
    index: int
    id: str
    image: Any
    captions: list[str] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)
    error: str = ""  # why this input cannot be used


def _captions_of(row: dict) -> list[str]:
    if isinstance(row.get("conversations"), list):  # a LLaVA row (e.g. `data captions` output): its answers
        return [t.get("value", "") for t in row["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
    for key in CAPTION_COLUMNS:
        value = row.get(key)
        if value is not None:
            return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else [value]
    return []


def read_items(source: Any, image_folder: str | None = None, split: str = "train",
               streaming: bool = False) -> Iterator[Item]:
    """Samples to teach from: JSON/JSONL rows ``{id, image, caption | captions, boxes}`` or LLaVA rows;
    anything `llavakit.data.captions.read_pairs` reads (CSV/TSV, image folder, datasets), without boxes."""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    seen: set[str] = set()
    if path is not None and path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        base = image_folder or str(path.parent)
        for index, row in json_rows(path):
            sid = _unique(row.id if isinstance(row, RowError) else (row.get("id") if isinstance(row, dict) else None),
                          row.get("image") if isinstance(row, dict) else None, index, seen)
            if not isinstance(row, dict):
                yield Item(index, sid, None, error=row.reason if isinstance(row, RowError) else "the row is not an object")
                continue
            image = row.get("image")
            if isinstance(image, str) and "://" not in image and not os.path.isabs(image):
                image = os.path.join(base, image)
            item = Item(index, sid, image)
            try:
                item.captions = [" ".join(str(c).split()) for c in _captions_of(row)]
                item.boxes = check_boxes(row.get("boxes"))
            except ValueError as e:
                item.error = str(e)
            yield item
        return
    for pair in read_pairs(source, image_folder=image_folder, split=split, streaming=streaming):
        caption = pair.caption if isinstance(pair.caption, str) else None
        yield Item(pair.index, _unique(pair.id, None, pair.index, seen), pair.image,
                   [" ".join(caption.split())] if caption else [],
                   error=pair.caption.reason if isinstance(pair.caption, RowError) else "")


def _unique(raw_id: Any, image: Any, index: int, seen: set) -> str:
    sid = str(raw_id) if raw_id is not None else Path(image).stem if isinstance(image, str) else f"{index:08d}"
    if sid in seen:
        sid = f"{sid}@{index}"
    seen.add(sid)
    return sid


def data_url(image: Any, max_side: int) -> str:
    """The image as a ``data:image/jpeg;base64,...`` URL, its longest side at most ``max_side``."""
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    im = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
    im = im.convert("RGB")
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def input_problem(item: Item, mode: str) -> str:
    if item.error:
        return f"bad input: {item.error}"
    image = item.image.get("bytes") or item.image.get("path") if isinstance(item.image, dict) else item.image
    if image is None:
        return "bad input: no image"
    if isinstance(image, str) and "://" not in image and not os.path.isfile(image):
        return f"bad input: image not found: {image}"
    if mode == "text" and not any(c.strip() for c in item.captions):
        return "bad input: no caption (text mode needs captions, optionally boxes)"
    return ""


# --- the ledger: what is done -------------------------------------------------------------------
def _complete_lines(path: Path) -> list[dict]:
    """The file's JSON lines; a last line cut off by a kill is removed from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(data))
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


class Ledger:
    def __init__(self, out: Path):
        self.out, self.log = out, out.with_name(out.name + ".log.jsonl")
        written = {row.get("id") for row in _complete_lines(out)}
        self.entries = _complete_lines(self.log)
        self.done = written | {e["task"] for e in self.entries if e.get("status") in ("ok", "rejected")}
        self._lock = threading.Lock()

    def spent(self) -> tuple[int, int]:
        return (sum(e.get("requests", 0) for e in self.entries),
                sum(e.get("prompt_tokens", 0) + e.get("completion_tokens", 0) for e in self.entries))

    def record(self, entry: dict, row: dict | None = None) -> None:
        with self._lock:
            for path, obj in ((self.out, row), (self.log, entry)):  # the sample first: then the task is done
                if obj is None:
                    continue
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self.entries.append(entry)
            if entry["status"] in ("ok", "rejected"):
                self.done.add(entry["task"])


# --- one task -----------------------------------------------------------------------------------
@dataclass
class Job:
    teacher: Teacher
    mode: str
    kinds: list[str]
    prompts: dict[str, Prompt]
    detail_questions: list[str]
    out: Path
    image_base: Path
    max_tokens: int = 1024
    temperature: float = 0.7
    response_format: str = "json_object"
    turns: int = 4
    seed: int = 0
    image_max_side: int = 1024


def run_task(job: Job, item: Item, kind: str) -> tuple[dict, dict | None]:
    """(log entry, output row or None) for one task; never raises for a bad reply or a dead server."""
    key = f"{item.id}-{kind}"
    entry: dict[str, Any] = {"task": key, "index": item.index, "kind": kind, "model": job.teacher.model}
    try:
        url = data_url(item.image, job.image_max_side) if kind == "image" else None
        msgs = messages(kind, job.prompts[kind], context(item.captions, item.boxes), job.turns, url)
        reply = job.teacher.chat(msgs, max_tokens=job.max_tokens, temperature=job.temperature,
                                 response_format=response_format(kind, job.response_format), seed=job.seed)
    except TeacherError as e:
        return {**entry, "status": "failed", "reason": str(e), "requests": e.attempts}, None  # spent: budget
    except OSError as e:  # the image could not be read for the data URL
        return {**entry, "status": "rejected", "reason": f"bad input: {e}", "requests": 0}, None
    entry.update(requests=reply.attempts, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
    try:
        value, repaired = parse_reply(reply.text, kind)
        kept, dropped = clean_pairs(qa_pairs(value, kind), kind)
        if kind == "image":
            kept = kept[:job.turns]
        if not kept:
            raise Rejected("no usable pair: " + ("; ".join(sorted(set(dropped))) or "the reply has none"))
    except Rejected as e:
        cut = " (the reply was cut off at --max-tokens)" if reply.finish_reason == "length" else ""
        return {**entry, "status": "rejected", "reason": f"{e}{cut}", "reply": reply.text[:4000]}, None
    conv = Conversation([], [item.image], id=key, index=item.index)
    row = {"id": key, "image": write_image_ref(item.image, job.image_base, job.out.stem, conv, 0),
           "conversations": to_turns(kept, kind, key, job.seed, job.detail_questions)}
    if repaired:
        entry["repaired"] = repaired
    if dropped:
        entry["dropped"] = dropped
    return {**entry, "status": "ok"}, row


def make_job(args, teacher: Teacher) -> Job:
    out = Path(args.out)
    kinds = ["image"] if args.mode == "image" else list(args.kinds)
    return Job(teacher, args.mode, kinds, {k: load_prompt(k, args.prompts) for k in kinds},
               read_instructions(_own(args.prompts, "detailed.txt"), "detailed.txt"),
               out, Path(os.path.abspath(args.out_image_folder or out.parent)), args.max_tokens, args.temperature,
               args.response_format, args.turns, args.seed, args.image_max_side)



def _own(folder: str | None, name: str) -> Path | None:
    """The user's copy of a prompt file when their --prompts folder has it, else None (the shipped one)."""
    return Path(folder) / name if folder and (Path(folder) / name).is_file() else None
