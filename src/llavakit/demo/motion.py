"""Clips of the high-resolution demo's *motion* questions: a shape moving or changing size over a few frames.

A clip is ``FRAMES`` pictures of 48x48 px (the encoder's size: OneVision feeds each video frame as one base
tile) showing one shape that either moves one way (left, right, up, down) or grows or shrinks. Questions:
"Which way does the shape move?" and "Does the shape get bigger or smaller?". The frames are written as image
files and a sample lists them under ``video`` with a ``<video>`` marker (the frame-list form of a video that
llavakit's processor takes).

No single frame answers them. Every trajectory is built around its *middle* frame (``MIDDLE``): its position and
size are drawn from ranges that are the same for every answer (wide enough that every frame stays in the
picture whichever way the shape goes), and the other frames are the middle one moved or resized by whole steps.
So the middle frame alone is distributed identically whatever the answer: the single-frame control (the same
question asked about that one frame as an image) can do no better than chance, and the held-out split is
balanced so that any image-blind answerer scores exactly chance too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .scenes import COLOURS, IMAGE_SIZE, SHAPES, draw_shape

FRAMES = 6
MIDDLE = FRAMES // 2  # the frame the single-frame control shows
DIRECTIONS = ("left", "right", "up", "down")
GROWTH = ("bigger", "smaller")
STEP = 3  # px the shape moves per frame
GROW = 2  # px its side changes per frame
_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTION_TYPES = ("motion", "growth")  # scored question types


@dataclass(frozen=True)
class Clip:
    kind: str  # "motion" (moves, constant size) or "growth" (grows or shrinks in place)
    answer: str  # a direction (motion) or bigger/smaller (growth)
    shape: str
    colour: str
    centre: tuple[int, int]  # (x, y) of the shape's centre in the middle frame
    size: int  # its side in the middle frame, px
    tint: tuple[int, int, int]
    background: int


def _reach(kind: str) -> tuple[int, int]:
    """(most px the shape's centre moves away from its place in the middle frame, largest side in any frame)."""
    far = max(MIDDLE, FRAMES - 1 - MIDDLE)  # frames on the longer side of the middle one
    if kind == "motion":
        return STEP * far, 14
    return 0, 18 + GROW * far


def random_clip(rng: random.Random, kind: str, answer: str | None = None) -> Clip:
    """A clip of `kind` whose answer is `answer` (random when None); everything else drawn from `rng`, from
    ranges that do not depend on the answer."""
    options = {"motion": DIRECTIONS, "growth": GROWTH}[kind]
    answer = answer or rng.choice(options)
    if answer not in options:
        raise ValueError(f"{answer!r} is not a {kind} answer; valid: {list(options)}")
    size = rng.randint(10, 14) if kind == "motion" else rng.randint(14, 18)
    reach, largest = _reach(kind)
    lo, hi = reach + largest // 2 + 1, IMAGE_SIZE - reach - largest // 2 - 1
    centre = (rng.randint(lo, hi), rng.randint(lo, hi))
    return Clip(kind, answer, rng.choice(SHAPES), rng.choice(list(COLOURS)), centre, size,
                tuple(rng.randint(-20, 20) for _ in range(3)), rng.randint(225, 255))


def frame_boxes(clip: Clip) -> list[tuple[int, int, int]]:
    """(x0, y0, side) of the shape in each frame."""
    boxes = []
    for k in range(FRAMES):
        d = k - MIDDLE
        if clip.kind == "motion":
            vx, vy = _VECTORS[clip.answer]
            cx, cy, s = clip.centre[0] + vx * STEP * d, clip.centre[1] + vy * STEP * d, clip.size
        else:
            cx, cy = clip.centre
            s = clip.size + (GROW if clip.answer == "bigger" else -GROW) * d
        boxes.append((cx - s // 2, cy - s // 2, s))
    return boxes


def draw_clip(clip: Clip) -> list[Image.Image]:
    """The clip's frames, 48x48 RGB each."""
    fill = tuple(max(0, min(255, v + t)) for v, t in zip(COLOURS[clip.colour], clip.tint))
    frames = []
    for x0, y0, s in frame_boxes(clip):
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (clip.background,) * 3)
        draw_shape(ImageDraw.Draw(img), clip.shape, x0, y0, s, fill)
        frames.append(img)
    return frames


def ask_clip(clip: Clip) -> tuple[str, str, list[str]]:
    """(question without the marker, answer, options) of the clip's own type."""
    if clip.kind == "motion":
        return "Which way does the shape move?", clip.answer, list(DIRECTIONS)
    return "Does the shape get bigger or smaller?", clip.answer, list(GROWTH)


def clip_turns(clip: Clip, rng: random.Random) -> list[tuple[str, str]]:
    """A training conversation: the clip's question, then its colour or shape (answerable from any frame)."""
    other = rng.choice([("What colour is the shape?", clip.colour), ("What is the shape?", clip.shape)])
    return [ask_clip(clip)[:2], other]
