"""Judge every sample before training: what `llavakit data check` reports and training refuses.

`validate` takes what a reader returned (conversations + the problems met while reading) and adds what can only be
judged on a normalised conversation: roles and their order, empty turns, ``<image>`` markers against images, the
images themselves (missing, empty, corrupt, truncated, folders, decompression bombs, over the size limits of
`llavakit.data.images.ImageLimits`), ``<video>`` markers against videos and the videos themselves (missing, empty,
corrupt, no frames, over `VideoLimits`; a list of frames: each frame as an image), duplicate ids and — given a
tokenizer and template — whether anything is supervised and whether the sample fits ``max_length``.

Every reason starts with a short kind (``"image missing: ..."``) that `summarize` groups by.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from .conversation import IMAGE_MARKER, ROLES, Conversation, Problem, SampleError
from .idset import SeenIds
from .images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ImageLimits
from .specials import special_text_warnings
from .video import VIDEO_MARKER, VideoError, VideoLimits, probe_video, read_video

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a token that is not supervised


class DataValidationError(ValueError):
    """Training was asked to start on data with errors; carries every problem found."""

    def __init__(self, message: str, problems: list[Problem]):
        self.problems = problems
        super().__init__(message)


@dataclasses.dataclass
class ValidationState:
    """What `validate` remembers between calls, so that validating a dataset chunk by chunk (the start-up
    cache's streaming build) finds exactly what validating it at once finds: the ids met (duplicates), and
    each distinct image / video file's verdict (each opened once). Per distinct file and per id, not per row."""

    ids: SeenIds = dataclasses.field(default_factory=SeenIds)
    images: dict = dataclasses.field(default_factory=dict)  # path -> ImageError | None
    videos: dict = dataclasses.field(default_factory=dict)  # path -> VideoError | None


# --- checks on one conversation -----------------------------------------------------------------
def _structure(conv: Conversation) -> list[tuple[str, str, str]]:
    """(severity, reason, hint) for roles, turn order, empty turns and image markers."""
    found = []
    if not conv.turns:
        return [("error", "no turns: the conversation is empty", "give the sample a user turn and an answer")]
    expected = "user"
    order_reported = False
    for k, turn in enumerate(conv.turns):
        where = f"turn {k} ({turn.role})"
        if turn.role not in ROLES:
            found.append(("error", f"unknown role: turn {k} has role {turn.role!r}", f"use one of {list(ROLES)}"))
            continue
        if not isinstance(turn.content, str):
            found.append(("error", f"wrong type: {where} content is {type(turn.content).__name__}",
                          "turn content must be a string"))
        elif not turn.content.strip():
            found.append(("error", f"empty turn: {where} has no text", "write the turn's text or drop the turn"))
        elif turn.role != "user" and IMAGE_MARKER in turn.content:
            found.append(("error", f"image in {turn.role} turn: {where} contains {IMAGE_MARKER}",
                          "images belong in user turns; move the marker into the question"))
        elif turn.role != "user" and conv.videos and VIDEO_MARKER in turn.content:
            found.append(("error", f"video in {turn.role} turn: {where} contains {VIDEO_MARKER}",
                          "videos belong in user turns; move the marker into the question"))
        if order_reported:
            continue
        if turn.role == "system":
            if k != 0:
                found.append(("error", f"role order: {where} is a system turn after the start",
                              "a system prompt may only be the first turn"))
                order_reported = True
            continue
        if turn.role != expected:
            first = all(t.role == "system" for t in conv.turns[:k])
            reason = (f"role order: the conversation starts with {turn.role}, not user" if first else
                      f"role order: {where} follows a {turn.role} turn; user and assistant must alternate")
            found.append(("error", reason, "reorder or merge turns so they go user, assistant, user, ..."))
            order_reported = True
            continue
        expected = "assistant" if expected == "user" else "user"
    if not any(t.role == "assistant" for t in conv.turns):  # (an empty answer is already an "empty turn")
        found.append(("error", "nothing to supervise: the conversation has no assistant answer",
                      "add the assistant's answer; llavakit only trains on assistant tokens"))
    elif conv.turns[-1].role == "user" and not order_reported:
        found.append(("warning", "unanswered turn: the last turn is a user turn and is not trained on",
                      "end the sample with the assistant's answer, or drop the last question"))
    markers = sum(t.content.count(IMAGE_MARKER) for t in conv.turns if isinstance(t.content, str))
    if markers != len(conv.images):
        found.append(("error", f"image count mismatch: {markers} {IMAGE_MARKER} marker(s) but "
                      f"{len(conv.images)} image(s)",
                      f"put exactly one {IMAGE_MARKER} in the user turns per image, in image order"))
    videos = conv.num_video_markers()
    if conv.videos and videos != len(conv.videos):
        found.append(("error", f"video count mismatch: {videos} {VIDEO_MARKER} marker(s) but {len(conv.videos)} "
                      "video(s)", f"put exactly one {VIDEO_MARKER} in the user turns per video, in video order"))
    elif videos and not conv.videos:
        found.append(("warning", f"video marker without a video: the text has {videos} {VIDEO_MARKER} but the row "
                      "gives no video (plain text for a model without videos, an error for one with them)",
                      "add the row's 'video' / 'videos', or remove the marker"))
    return found


def _check_images(convs: Sequence[Conversation], limits: ImageLimits, full: bool, workers: int | None,
                  progress: bool, memo: dict | None = None) -> dict[int, list[tuple[str, str, str]]]:
    """conversation position -> image problems. Each distinct path is opened once (LLaVA data reuses images;
    ``memo``, path -> verdict, carries them from one call to the next)."""
    memo = {} if memo is None else memo
    paths = sorted({ref for c in convs for ref in c.images if isinstance(ref, str)} - memo.keys())
    workers = workers or min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding: threads help

    def diagnose(ref):
        return limits.diagnose(ref, full)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(diagnose, paths)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc="checking images", unit="img")
        memo.update(zip(paths, results))
    out: dict[int, list[tuple[str, str, str]]] = {}
    for pos, conv in enumerate(convs):
        for k, ref in enumerate(conv.images):
            err = memo[ref] if isinstance(ref, str) else diagnose(ref)
            if err is not None:
                where = f" (image {k + 1} of {len(conv.images)})" if len(conv.images) > 1 else ""
                out.setdefault(pos, []).append(("error", err.reason + where, err.hint))
    return out


def _check_videos(convs: Sequence[Conversation], limits: ImageLimits, video_limits: VideoLimits, full: bool,
                  seen: dict | None = None) -> dict[int, list[tuple[str, str, str]]]:
    """conversation position -> video problems. A file: its metadata against `video_limits` (``full``: decoded up
    to its last sampled frame, which finds truncated files); a list of frames: each frame as an image."""
    frame_limits = ImageLimits(limits.max_pixels, None, None)  # frames are squashed to one tile: no side/aspect limit
    seen = {} if seen is None else seen  # path -> VideoError | None

    def diagnose(ref):
        if isinstance(ref, (list, tuple)):
            if not ref:
                return VideoError("video has no frames", "the frame list is empty")
            for j, frame in enumerate(ref):
                err = frame_limits.diagnose(frame, full)
                if err is not None:
                    return VideoError(f"video frame {err.kind.replace('image ', '')}", f"frame {j}: {err.detail}",
                                      err.hint)
            return None
        key = str(ref)
        if key not in seen:
            try:
                (read_video(key, limits=video_limits) if full else probe_video(key, video_limits))
                seen[key] = None
            except VideoError as e:
                seen[key] = e
        return seen[key]

    out: dict[int, list[tuple[str, str, str]]] = {}
    for pos, conv in enumerate(convs):
        for k, ref in enumerate(conv.videos):
            err = diagnose(ref)
            if err is not None:
                where = f" (video {k + 1} of {len(conv.videos)})" if len(conv.videos) > 1 else ""
                out.setdefault(pos, []).append(("error", err.reason + where, err.hint))
    return out


def _tokens(conv: Conversation, encode, template, tokenizer, image_token_id, image_tokens,
            max_length: int | None, overflow: str, tokenization: str, video_token_id: int | None = None,
            video_tokens=None) -> list[tuple[str, str, str]]:
    """Supervision and length, judged by the same `encode` (and length policy) training uses."""
    def run(limit):
        counts = image_tokens(conv) if callable(image_tokens) else image_tokens
        video = {}
        if video_token_id is not None or conv.videos:  # (image-only checks keep encode's image-only contract)
            vcounts = (video_tokens(conv) if callable(video_tokens) else video_tokens) or ()
            video = dict(video_token_id=video_token_id, video_tokens=vcounts)
        enc = encode(conv, template, tokenizer, image_token_id, counts, max_length=limit,
                     overflow=overflow, tokenization=tokenization, **video)
        if callable(image_tokens) and enc.num_images == 1 and len(conv.images) > 1 and not isinstance(counts, int):
            # as training does (`dataset.encode_sample`): an image left alone by truncation is counted as a single
            # image (under anyres_max tiled, no longer base tile + newline); a policy without the rule counts it alike
            alone = image_tokens(dataclasses.replace(conv, images=conv.images[:1]))
            if not isinstance(alone, int) and alone[0] != counts[0]:
                enc = encode(conv, template, tokenizer, image_token_id, [alone[0], *counts[1:]], max_length=limit,
                             overflow=overflow, tokenization=tokenization, **video)
        return enc

    try:
        full = run(None)
    except SampleError as e:
        return [("error", e.problem.reason, e.problem.hint)]
    except ValueError as e:
        return [("error", f"tokenization failed: {e}", "check that the template fits this conversation")]
    supervised = sum(1 for x in full.labels if x != IGNORE_INDEX)
    if supervised == 0:
        return [("error", "nothing to supervise: no assistant token survives tokenization",
                 "check the assistant turns and the template")]
    if not max_length or len(full.input_ids) <= max_length:
        return []
    head = f"too long: {len(full.input_ids)} tokens > max_length {max_length}"
    hint = "shorten or split the conversation, use fewer images, or raise max_length"
    try:
        cut = run(max_length)
    except SampleError as e:  # the length policy removes the whole sample
        return [("error", f"{head}; {e.problem.reason}", e.problem.hint or hint)]
    kept = sum(1 for x in cut.labels if x != IGNORE_INDEX)
    if kept == 0:
        return [("error", f"{head}, and nothing supervised survives truncation", hint)]
    return [("warning", f"{head}; truncation keeps {kept} of {supervised} supervised tokens", hint)]


# --- the whole dataset --------------------------------------------------------------------------
def _split(data: Any) -> tuple[list[Conversation], list[Problem]]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], list):
        return list(data[0]), list(data[1])
    return list(data), []


def validate(data: tuple[list[Conversation], list[Problem]] | Iterable[Conversation], *, tokenizer=None,
             template=None, image_token_id: int | None = None, image_tokens=None,
             max_length: int | None = None, check_images: bool = True, full_image_check: bool = True,
             overflow: str = "truncate", max_pixels: int | None = DEFAULT_MAX_PIXELS,
             max_side: int | None = DEFAULT_MAX_SIDE, max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO,
             workers: int | None = None, progress: bool = False, tokenization: str = "llm",
             video_token_id: int | None = None, video_tokens=None,
             video_limits: VideoLimits | None = None, state: ValidationState | None = None) -> list[Problem]:
    """Every problem with the samples, sorted by index: the readers' (if `data` is a reader's
    ``(conversations, problems)``) plus structural, image, duplicate-id and, with a tokenizer and a
    template (a `Template` or its name), supervision and length checks.

    A sample over ``max_length`` is judged by the length policy training will use (``overflow``,
    as in `llavakit.data.tokenize.encode`): a warning when it can be truncated, an error when it
    would be dropped. ``full_image_check=False`` reads only image headers: much faster, but misses
    truncated files. ``max_pixels`` / ``max_side`` / ``max_aspect_ratio`` are the image size limits
    (`llavakit.data.images.ImageLimits`; None turns one off), checked from each image's header.
    Given a plain list of conversations, only the new problems are returned.
    ``tokenization`` is the model's (``processor.tokenization``; see `llavakit.data.tokenize`);
    ``image_tokens`` its placeholder count per image: an int, or a function of the conversation
    returning one count per image (`llavakit.data.dataset.image_token_counts`); ``video_token_id`` /
    ``video_tokens`` the same for videos (models with a ``<video>`` token; ``video_tokens`` a function of the
    conversation returning one count per video). Videos are checked against ``video_limits`` (`VideoLimits`).
    ``state`` (`ValidationState`) carries duplicate ids and image verdicts over from earlier calls: validating
    consecutive chunks with one state gives what validating them at once gives.
    """
    convs, problems = _split(data)
    encode = None
    if tokenizer is not None and template is not None:
        from .tokenize import encode  # imported lazily: plain structural checks need no tokenizer

        if isinstance(template, str):
            from .templates import get_template

            template = get_template(template, tokenizer)
    limits = ImageLimits(max_pixels, max_side, max_aspect_ratio)
    state = state or ValidationState()
    image_problems = (_check_images(convs, limits, full_image_check, workers, progress, state.images)
                      if check_images else {})
    if check_images:
        for pos, found in _check_videos(convs, limits, video_limits or VideoLimits(), full_image_check,
                                        state.videos).items():
            image_problems.setdefault(pos, []).extend(found)
    for pos, conv in enumerate(convs):
        found = _structure(conv) + image_problems.get(pos, []) + special_text_warnings(conv, tokenizer)
        # ids are compared within one source of a mixture; a repeat:K copy is meant to share its id
        key = (conv.meta.get("mixture_source"), conv.id)
        if conv.id is not None and not conv.meta.get("repeat"):
            first = state.ids.get(key)
            if first is not None:
                found.append(("warning", f"duplicate id: sample #{first} has the same id",
                              "give every sample its own id, so reports and logs name one sample"))
            else:
                state.ids.add(key, conv.index)
        # Tokenize only what is well-formed: a broken sample already has its reason.
        if encode is not None and not any(sev == "error" for sev, _, _ in found):
            found += _tokens(conv, encode, template, tokenizer, image_token_id, image_tokens, max_length,
                             overflow, tokenization, video_token_id, video_tokens)
        problems += [Problem(conv.index, conv.id, sev, reason, hint, conv.source) for sev, reason, hint in found]
    problems.sort(key=lambda p: p.index)
    return problems


def _kind(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


def count_samples(convs: Sequence[Conversation], problems: Sequence[Problem]) -> int:
    """Samples in the source: those read plus those that could not be read."""
    return len({c.index for c in convs} | {p.index for p in problems if p.index >= 0})


def summarize(problems: Sequence[Problem], n_samples: int) -> str:
    """A table: samples valid / with errors / with warnings, then counts per kind of problem."""
    errors = {p.index for p in problems if p.severity == "error"}
    warned = {p.index for p in problems if p.severity == "warning"}
    sample_errors = {i for i in errors if i >= 0}
    lines = [
        f"{'samples':<28}{n_samples:>9}",
        f"{'  valid (no errors)':<28}{n_samples - len(sample_errors):>9}",
        f"{'  with errors':<28}{len(sample_errors):>9}",
        f"{'  with warnings':<28}{len(warned):>9}",
    ]
    kinds = Counter((_kind(p.reason), p.severity) for p in problems)
    if kinds:
        lines += ["", f"{'problem':<32}{'errors':>8}{'warnings':>10}"]
        for kind in sorted({k for k, _ in kinds}, key=lambda k: (-kinds[(k, "error")], -kinds[(k, "warning")], k)):
            lines.append(f"{kind:<32}{kinds[(kind, 'error')]:>8}{kinds[(kind, 'warning')]:>10}")
    return "\n".join(lines)


def format_problem(p: Problem, with_source: bool = False) -> str:
    """One report line: index, id, severity, reason, what to do (the sample's file and row first, with
    ``with_source``: a mixture's index is not a row number of one file)."""
    ident = "-" if p.id is None else repr(p.id)
    text = f"#{p.index:<6} id={ident:<14} {p.severity:<7} {p.reason}"
    if with_source and p.source:
        text = f"{p.source}: {text}"
    return f"{text}  -> {p.hint}" if p.hint else text


def load_validated(source: Any, format: str = "auto", image_folder: str | os.PathLike | None = None, *,
                   skip_invalid: bool = False, split: str = "train", **checks) -> tuple[list[Conversation],
                                                                                      list[Problem]]:
    """Read and validate `source` the way training does before it starts.

    Raises `DataValidationError` when any sample has an error, unless ``skip_invalid``; then the
    bad samples are left out and how many is logged. `checks` go to `validate`.
    """
    from .formats import load_conversations

    convs, problems = load_conversations(source, format, image_folder, on_error="collect", split=split)
    problems = validate((convs, problems), **checks)
    n = count_samples(convs, problems)
    bad = {p.index for p in problems if p.severity == "error"}
    if bad and not skip_invalid:
        shown = [format_problem(p) for p in problems if p.severity == "error"][:20]
        more = len([p for p in problems if p.severity == "error"]) - len(shown)
        raise DataValidationError(
            f"{len(bad)} of {n} samples in {convs[0].source if convs else source} have errors; refusing to "
            "train on samples llavakit cannot use:\n" + summarize(problems, n) + "\n\n" + "\n".join(shown)
            + (f"\n... and {more} more" if more > 0 else "")
            + "\nRun `llavakit data check` for the full report, fix the data, or skip these samples "
            "(skip_invalid=True).", problems)
    kept = [c for c in convs if c.index not in bad]
    if bad:
        log.warning("skipped %d of %d samples with errors (run `llavakit data check` to see why)", len(bad), n)
    return kept, problems
