"""Evaluation rows: read and check a VQA-style JSONL file (`read_samples`) and build each sample's prompt
(`sample_turns`). The row format is described in `llavakit.eval.runner`'s docstring."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llavakit.data.conversation import IMAGE_MARKER, Turn
from llavakit.data.video import VIDEO_MARKER
from llavakit.eval.metrics import Metric, option_letters


class EvalDataError(ValueError):
    """Rows of an evaluation file that cannot be evaluated; the message lists each one."""


@dataclass
class EvalSample:
    index: int  # 0-based position among the file's rows
    line: int  # 1-based line number in the file
    id: str
    question: str
    images: list[str]
    answers: list
    choices: list[str] | None = None
    videos: list = None  # each a file path or a list of frame paths, one <video> each

    def __post_init__(self):
        self.videos = list(self.videos or [])

    def label(self, source: str) -> str:
        return f"{source} line {self.line} (sample #{self.index}, id={self.id!r})"


# --- reading --------------------------------------------------------------------------------------

def _answers_of(row: dict) -> tuple[list | None, str | None]:
    if "answers" in row:
        raw = row["answers"]
        if not isinstance(raw, list):
            return None, "`answers` must be a list (of strings, or of {'answer': ...} objects)"
        out = []
        for a in raw:
            if isinstance(a, dict):
                if "answer" not in a:
                    return None, "an entry of `answers` is an object without an 'answer' key"
                a = a["answer"]
            if not isinstance(a, (str, int, float)) or isinstance(a, bool):
                return None, f"`answers` holds {type(a).__name__} values; use strings"
            out.append(a if isinstance(a, int) and "choices" in row else str(a))
        return out, None
    if "answer" in row:
        a = row["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            return None, f"`answer` is a {type(a).__name__}; use a string (or a choice index)"
        return [a if isinstance(a, int) and "choices" in row else str(a)], None
    return [], None


def _images_of(row: dict, base: Path) -> tuple[list[str] | None, str | None]:
    if "image" in row and "images" in row:
        return None, "has both `image` and `images`; keep one"
    raw = row.get("images", row.get("image"))
    if raw is None:
        return [], None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        return None, "`image` must be a path string and `images` a list of path strings"
    return [str(p if Path(p).is_absolute() else base / p) for p in raw], None


def _videos_of(row: dict, base: Path) -> tuple[list | None, str | None]:
    """``video``: one video (a path, or a list of frame paths); ``videos``: a list of them."""
    if "video" in row and "videos" in row:
        return None, "has both `video` and `videos`; keep one"
    if row.get("video") is None and row.get("videos") is None:
        return [], None
    raw = [row["video"]] if "video" in row else row["videos"]
    if not isinstance(raw, list):
        return None, "`videos` must be a list of videos (paths, or lists of frame paths)"

    def resolve(p):
        return str(p if Path(p).is_absolute() else base / p)

    out = []
    for v in raw:
        if isinstance(v, str) and v:
            out.append(resolve(v))
        elif isinstance(v, list) and v and all(isinstance(f, str) and f for f in v):
            out.append([resolve(f) for f in v])
        else:
            return None, "a video must be a path string or a non-empty list of frame path strings"
    return out, None


def read_samples(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                 metric: Metric | None = None, check_images: bool = True) -> list[EvalSample]:
    """Parse and check every row; raise `EvalDataError` listing all bad rows (up to 20 shown).

    Relative image paths are resolved against ``image_folder`` (default: the data file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file; --data must point at a JSONL file")
    base = Path(image_folder) if image_folder is not None else path.parent
    samples: list[EvalSample] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    index = 0
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            i, index = index, index + 1
            where = f"{path} line {line_no} (sample #{i}"

            def bad(what: str, fix: str, ident=None) -> None:
                ident_s = f", id={ident!r}" if ident is not None else ""
                problems.append(f"{where}{ident_s}): {what} -> {fix}")

            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                bad(f"not valid JSON ({e.msg} at column {e.colno})", "write one JSON object per line")
                continue
            if not isinstance(row, dict):
                bad(f"is a JSON {type(row).__name__}, not an object", "write one JSON object per line")
                continue
            ident = row.get("id", row.get("question_id", i))
            ident = str(ident)
            if ident in seen:
                bad(f"repeats the id of sample #{seen[ident]}", "give every sample a unique `id`", ident)
                continue
            seen[ident] = i
            question = row.get("question")
            if not isinstance(question, str) or not question.strip():
                bad("has no `question` string", "add the question text as `question`", ident)
                continue
            images, err = _images_of(row, base)
            if err:
                bad(err, "fix the image field", ident)
                continue
            videos, err = _videos_of(row, base)
            if err:
                bad(err, "fix the video field", ident)
                continue
            answers, err = _answers_of(row)
            if err:
                bad(err, "fix the answer field", ident)
                continue
            choices = row.get("choices")
            if choices is not None and (not isinstance(choices, list) or not choices
                                        or not all(isinstance(c, (str, int, float)) for c in choices)):
                bad("`choices` must be a non-empty list of strings", "fix or drop `choices`", ident)
                continue
            choices = [str(c) for c in choices] if choices is not None else None
            markers = question.count(IMAGE_MARKER)
            if markers and markers != len(images):
                bad(f"the question has {markers} {IMAGE_MARKER} marker(s) but the row gives {len(images)} image(s)",
                    f"use one {IMAGE_MARKER} per image, or none (images then go before the question)", ident)
                continue
            vmarkers = question.count(VIDEO_MARKER)
            if vmarkers and vmarkers != len(videos):
                bad(f"the question has {vmarkers} {VIDEO_MARKER} marker(s) but the row gives {len(videos)} video(s)",
                    f"use one {VIDEO_MARKER} per video, or none (videos then go before the question)", ident)
                continue
            if metric is not None:
                err = metric.check(answers, choices)
                if err:
                    bad(err, f"fix the row or choose another --metric (now {metric.name!r})", ident)
                    continue
            if check_images:
                missing = [p for p in images if not Path(p).is_file()]
                missing += [p for v in videos for p in (v if isinstance(v, list) else [v]) if not Path(p).is_file()]
                if missing:
                    what = "video" if missing[0] not in images else "image"
                    bad(f"{what} not found: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1
                                                              else ""),
                        "check the path and --image-folder (relative paths are resolved against it, "
                        f"now {base})", ident)
                    continue
            samples.append(EvalSample(i, line_no, ident, question, images, answers, choices, videos))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise EvalDataError(f"{len(problems)} bad row(s) in {path}:\n  {shown}{more}")
    if not samples:
        raise EvalDataError(f"{path} has no samples (empty file?)")
    return samples


# --- prompts --------------------------------------------------------------------------------------

def sample_turns(sample: EvalSample, suffix: str) -> list[Turn]:
    """The one user turn asked for a sample (images first unless the question places them)."""
    text = sample.question
    if sample.choices:
        letters = option_letters(len(sample.choices))
        if not all(f"{letter}." in text for letter in letters):  # not already listed in the question
            text += "\n" + "\n".join(f"{letter}. {c}" for letter, c in zip(letters, sample.choices))
    text += suffix
    if sample.videos and VIDEO_MARKER not in text:
        text = (VIDEO_MARKER + "\n") * len(sample.videos) + text
    if IMAGE_MARKER not in text:
        text = (IMAGE_MARKER + "\n") * len(sample.images) + text
    return [Turn("user", text)]
