"""`llavakit data captions`: image–caption pairs -> stage-1 LLaVA JSON, the way LLaVA built LCS-558K.

Each pair becomes one single-turn sample: a brief-description instruction drawn from a list (LLaVA's,
`prompts/brief.txt`; yours with ``--instructions FILE``) asks, the caption answers. The draw and the
side the ``<image>`` marker goes on (before or after the instruction, as in LLaVA's data) depend only on
``--seed`` and the pair's index, so the same input gives the same file whatever the order of reading.

Pairs come from (`read_pairs`):

* a CSV / TSV file, or a JSON / JSONL file of rows, with an image column and a caption column (found
  by the names in `IMAGE_COLUMNS` / `CAPTION_COLUMNS`, or named with ``--image-column`` /
  ``--caption-column``); image paths relative to ``--image-folder`` (default: the file's folder);
* a folder of images, each with its caption in a ``.txt`` file of the same stem;
* a Hugging Face dataset (a ``save_to_disk`` folder, parquet / arrow files, or a hub name) with an
  image column and a text column, optionally ``--streaming``; its images are written as files next to
  the output.

Captions are cleaned: runs of whitespace become one space; an empty caption, one over ``--max-words``
words, one holding ``<image>``, a missing image or a caption that is not text are *skipped* and each
is reported (index, id, reason), never silently dropped.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from .conversation import IMAGE_MARKER, Conversation, Turn
from .jsonrows import json_rows
from .sources import DataSourceError, RowError, hf_rows
from .writers import write_image_ref

IMAGE_COLUMNS = ("image", "image_path", "img", "file_name", "filename", "path", "url")
CAPTION_COLUMNS = ("caption", "blip_caption", "text", "sentence", "captions", "alt_text")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_instructions(path: str | os.PathLike | None = None, name: str = "brief.txt") -> list[str]:
    """Instructions, one per line (``#`` comments and blank lines ignored); the shipped list by default."""
    text = (Path(path).read_text(encoding="utf-8") if path is not None
            else resources.files("llavakit.data").joinpath("prompts", name).read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise DataSourceError(f"{path or name}: no instruction in the file (one per line, '#' starts a comment)")
    bad = [line for line in found if IMAGE_MARKER in line]
    if bad:
        raise DataSourceError(f"{path or name}: an instruction holds {IMAGE_MARKER} ({bad[0]!r}); "
                              "the marker is placed by llavakit, before or after the instruction")
    return found


def stage1_question(instructions: list[str], seed: int, index: int) -> str:
    """The instruction of pair ``index`` with the image marker before or after it (LLaVA's two layouts)."""
    rng = random.Random(f"{seed}:{index}")  # str seeds are hashed with sha512: stable across runs
    q = rng.choice(instructions)
    return f"{IMAGE_MARKER}\n{q}" if rng.random() < 0.5 else f"{q}\n{IMAGE_MARKER}"


@dataclass
class Pair:
    index: int
    id: str | None
    image: Any  # a path, bytes, a datasets {"bytes", "path"} value or a PIL image
    caption: Any


def _column(keys, wanted: str | None, names: tuple[str, ...], what: str, label: str, flag: str) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise DataSourceError(f"{label}: no column {wanted!r} ({flag}); columns: {sorted(keys)}")
        return wanted
    found = next((n for n in names if n in keys), None)
    if found is None:
        raise DataSourceError(f"{label}: no {what} column among {sorted(keys)}; name it with {flag} "
                              f"(looked for {list(names)})")
    return found


def _rows(source: Any, split: str, streaming: bool) -> tuple[Iterator[tuple[int, Any]], str, str | None]:
    """(index, row) pairs, the label, and the folder relative image paths start from."""
    if not isinstance(source, (str, os.PathLike)):
        return hf_rows(source), f"<{type(source).__name__}>", None
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".csv", ".tsv"):
        def read():
            with path.open(encoding="utf-8", newline="") as f:
                yield from enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        return read(), str(path), str(path.parent)
    if path.is_file() and suffix in (".json", ".jsonl"):
        return iter(json_rows(path)), str(path), str(path.parent)
    from .sources import hf_dataset

    if path.exists():
        ds = hf_dataset(path, split, streaming)
    else:  # a hub name
        import datasets

        try:
            ds = datasets.load_dataset(str(source), split=split, streaming=streaming)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the message says which
            raise DataSourceError(f"{source}: no such file or folder, and not a loadable dataset ({e})") from None
    return hf_rows(ds), str(source), str(path) if path.is_dir() else None


def _folder_pairs(folder: Path) -> Iterator[Pair]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for k, img in enumerate(images):
        txt = img.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        yield Pair(k, str(img.relative_to(folder).with_suffix("")), str(img), caption)


def is_caption_folder(source: Any) -> bool:
    """A folder of images with same-stem .txt captions (not a datasets folder)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
        return False
    folder = Path(source)
    if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        return False
    return any(p.suffix.lower() == ".txt" for p in folder.rglob("*.txt"))


def read_pairs(source: Any, *, image_column: str | None = None, caption_column: str | None = None,
               id_column: str | None = None, image_folder: str | None = None, split: str = "train",
               streaming: bool = False) -> Iterator[Pair]:
    """Image–caption pairs from any of the sources in the module docstring."""
    if is_caption_folder(source):
        yield from _folder_pairs(Path(source))
        return
    rows, label, base = _rows(source, split, streaming)
    base = image_folder or base
    columns = None
    for index, row in rows:
        if isinstance(row, RowError):
            yield Pair(index, row.id, None, row)
            continue
        if not isinstance(row, dict):
            yield Pair(index, None, None, RowError(f"the row is {type(row).__name__}, not an object", ""))
            continue
        if columns is None:
            columns = (_column(row, image_column, IMAGE_COLUMNS, "image", label, "--image-column"),
                       _column(row, caption_column, CAPTION_COLUMNS, "caption", label, "--caption-column"))
        image = row.get(columns[0])
        if isinstance(image, str) and image and "://" not in image and not os.path.isabs(image):
            image = os.path.join(base or os.getcwd(), image)
        raw_id = row.get(id_column or "id")
        sid = None if raw_id is None else str(raw_id)
        if sid is None and isinstance(image, str):
            sid = Path(image).stem
        yield Pair(index, sid, image, row.get(columns[1]))


def clean_caption(caption: Any, max_words: int) -> tuple[str | None, str]:
    """(cleaned caption, "") or (None, why it is skipped)."""
    if isinstance(caption, RowError):
        return None, f"unreadable row: {caption.reason}"
    if isinstance(caption, (list, tuple)):  # COCO-style: several captions per image, the first is used
        caption = next((c for c in caption if isinstance(c, str) and c.strip()), "")
    if caption is None:
        return None, "no caption"
    if not isinstance(caption, str):
        return None, f"caption is {type(caption).__name__}, not text"
    text = " ".join(caption.split())
    if not text:
        return None, "empty caption"
    words = len(text.split())
    if words > max_words:
        return None, f"caption too long: {words} words > --max-words {max_words}"
    if IMAGE_MARKER in text:
        return None, f"caption holds {IMAGE_MARKER}"
    return text, ""


def _image_problem(image: Any) -> str:
    if image is None or (isinstance(image, dict) and not (image.get("bytes") or image.get("path"))):
        return "no image"
    if isinstance(image, dict) and not image.get("bytes"):
        image = image.get("path")
    if isinstance(image, str) and "://" not in image and not os.path.isfile(image):
        return f"image not found: {image}"
    return ""


@dataclass
class CaptionReport:
    read: int = 0
    written: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"index", "id", "reason"}

    def summary(self) -> str:
        kinds = Counter(s["reason"].split(":")[0] for s in self.skipped)
        text = f"{self.read} pairs read, {self.written} samples written, {len(self.skipped)} skipped"
        return text + "".join(f"\n  {n:>7}  {kind}" for kind, n in kinds.most_common())


def build_stage1(pairs: Iterator[Pair], out: str | os.PathLike, *, instructions: list[str], seed: int = 0,
                 max_words: int = 128, image_folder: str | os.PathLike | None = None) -> CaptionReport:
    """Write the stage-1 LLaVA JSON (``.json`` array or ``.jsonl``) row by row; returns what happened.

    Image paths are written relative to ``image_folder`` (default: the output's folder) — what to pass
    as ``--image-folder`` when reading the output; embedded images are saved as files under it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.abspath(image_folder or out.parent))
    report = CaptionReport()
    jsonl = out.suffix.lower() == ".jsonl"
    tmp = out.with_name(out.name + ".tmp")
    try:
        _write_rows(pairs, tmp, report, instructions=instructions, seed=seed, max_words=max_words, base=base,
                    stem=out.stem, jsonl=jsonl)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)  # a finished file or none: an interrupted run leaves no half-written output
    return report


def _write_rows(pairs, tmp: Path, report: CaptionReport, *, instructions, seed, max_words, base, stem, jsonl) -> None:
    seen_ids: set = set()
    with tmp.open("w", encoding="utf-8") as f:
        if not jsonl:
            f.write("[")
        for pair in pairs:
            report.read += 1
            caption, why = clean_caption(pair.caption, max_words)
            why = why or _image_problem(pair.image)
            if why:
                report.skipped.append({"index": pair.index, "id": pair.id, "reason": why})
                continue
            sid = pair.id if pair.id is not None and pair.id not in seen_ids else f"{pair.index:08d}"
            seen_ids.add(sid)
            conv = Conversation([Turn("user", stage1_question(instructions, seed, pair.index)),
                                 Turn("assistant", caption)], [pair.image], id=sid, index=pair.index)
            row = {"id": sid, "image": write_image_ref(pair.image, base, stem, conv, 0),
                   "conversations": [{"from": "human", "value": conv.turns[0].content},
                                     {"from": "gpt", "value": caption}]}
            text = json.dumps(row, ensure_ascii=False)
            f.write(text + "\n" if jsonl else ("\n" if report.written == 0 else ",\n") + text)
            report.written += 1
        if not jsonl:
            f.write("\n]\n")


# --- command line -------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("data", metavar="PAIRS", help="CSV/TSV/JSON/JSONL of image + caption, a folder of images with "
                                                  "same-stem .txt captions, or a datasets folder/file/hub name")
    p.add_argument("out", metavar="OUT", help="stage-1 LLaVA .json (array) or .jsonl to write")
    p.add_argument("--image-column", default=None, help=f"image column (default: first of {list(IMAGE_COLUMNS)})")
    p.add_argument("--caption-column", default=None,
                   help=f"caption column (default: first of {list(CAPTION_COLUMNS)})")
    p.add_argument("--id-column", default=None, help="id column (default: 'id', else the image's file stem)")
    p.add_argument("--image-folder", default=None, help="folder PAIRS' image paths are relative to "
                                                         "(default: PAIRS' folder)")
    p.add_argument("--out-image-folder", default=None,
                   help="folder OUT's image paths are written relative to (default: OUT's folder)")
    p.add_argument("--instructions", default=None, metavar="FILE",
                   help="one instruction per line (default: LLaVA's brief-description list, prompts/brief.txt)")
    p.add_argument("--seed", type=int, default=0, help="decides each sample's instruction and marker side")
    p.add_argument("--max-words", type=int, default=128, help="longer captions are skipped (and reported)")
    p.add_argument("--split", default="train", help="split of a datasets source")
    p.add_argument("--streaming", action="store_true", help="stream a datasets source instead of loading it")
    p.add_argument("--report", default=None, metavar="FILE", help="write the skipped pairs as JSON here")


def run(args) -> int:
    pairs = read_pairs(args.data, image_column=args.image_column, caption_column=args.caption_column,
                       id_column=args.id_column, image_folder=args.image_folder, split=args.split,
                       streaming=args.streaming)
    report = build_stage1(pairs, args.out, instructions=read_instructions(args.instructions), seed=args.seed,
                          max_words=args.max_words, image_folder=args.out_image_folder)
    for s in report.skipped[:10]:
        print(f"skipped #{s['index']:<6} id={s['id']!r:<14} {s['reason']}")
    if len(report.skipped) > 10:
        print(f"... {len(report.skipped) - 10} more skipped" + (" (see --report)" if args.report else ""))
    print(report.summary())
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report.skipped, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report: {args.report}")
    print(f"wrote {args.out}; check it with: llavakit data check {args.out}")
    return 0 if report.written else 1
