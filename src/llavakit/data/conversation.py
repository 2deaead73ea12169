"""The one internal sample type every reader produces and every later stage consumes.

A `Conversation` is a list of turns (`system` / `user` / `assistant`) whose text carries one
``<image>`` marker per image, in the order the images appear in ``images``, and one ``<video>`` marker per
video, in the order of ``videos``. Images and videos stay references (an image: a path, raw bytes or a PIL
image; a video: a file path or a list of frame image references) until a dataloader worker decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

from .video import VIDEO_MARKER

IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")


def strip_markers(text: str, marker: str = IMAGE_MARKER) -> str:
    """`text` with no `marker` (``<image>``, or ``<video>``) left, however it was nested: removing ``<image>``
    from ``<<image>image>`` once would leave one. For typed text, where images come from attachments only."""
    if marker not in text:
        return text
    out: list[str] = []
    n, last = len(marker), marker[-1]
    for ch in text:  # one pass: a marker completed at the end of what is kept is dropped at once
        out.append(ch)
        if ch == last and len(out) >= n and "".join(out[-n:]) == marker:
            del out[-n:]
    return "".join(out)

# A path (str, already resolved against --image-folder), encoded bytes, or a decoded PIL image.
ImageRef = Union[str, bytes, Image.Image]
# A video: a file path (resolved against --image-folder), or its frames as a list of image references.
VideoRef = Union[str, list]


@dataclass
class Turn:
    role: str  # one of ROLES
    content: str  # text with IMAGE_MARKER where images go


@dataclass
class Conversation:
    turns: list[Turn]
    images: list[ImageRef] = field(default_factory=list)
    id: str | None = None  # the sample's own id, if the source has one
    index: int = -1  # position in the source file / dataset
    source: str = ""  # file (or dataset) it came from, for error messages
    meta: dict[str, Any] = field(default_factory=dict)
    videos: list[VideoRef] = field(default_factory=list)  # one per <video> marker, in order

    @property
    def label(self) -> str:
        """How errors name this sample: file, index and id."""
        ident = f"id={self.id!r}" if self.id is not None else "no id"
        return f"{self.source or '<memory>'} sample #{self.index} ({ident})"

    def num_markers(self) -> int:
        return sum(t.content.count(IMAGE_MARKER) for t in self.turns)

    def num_video_markers(self) -> int:
        return sum(t.content.count(VIDEO_MARKER) for t in self.turns if isinstance(t.content, str))


@dataclass
class Problem:
    """One finding about one sample (what `data check` reports and `--report` writes)."""

    index: int
    id: str | None
    severity: str  # "error" | "warning"
    reason: str  # what is wrong
    hint: str = ""  # what to do about it
    source: str = ""

    def as_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "severity": self.severity, "reason": self.reason,
                "hint": self.hint}

    def __str__(self) -> str:
        ident = f"id={self.id!r}" if self.id is not None else "no id"
        text = f"{self.source or '<memory>'} sample #{self.index} ({ident}): {self.severity}: {self.reason}"
        return f"{text} -> {self.hint}" if self.hint else text


class SampleError(ValueError):
    """A sample llavakit refuses to train on; carries the `Problem` that says why."""

    def __init__(self, problem: Problem):
        self.problem = problem
        super().__init__(str(problem))

    @classmethod
    def of(cls, conv: "Conversation", reason: str, hint: str = "") -> "SampleError":
        return cls(Problem(conv.index, conv.id, "error", reason, hint, conv.source))
