"""Pictures and questions of the high-resolution demo (`llavakit demo --hires`): a detail that only tiles can see.

A *detail scene* is a 96x96 px picture (2x2 tiles of the demo CLIP's 48 px input) of one big shape in the
middle and a small 16x16 px *tag* in one of the four corners. The tag is a patch of one-pixel lines:
horizontal, vertical or checkered, at the finest period a picture can hold (2 px). Shrunk to the encoder's
48 px, every 2x2 block of such a pattern averages to the same grey, so the three patterns become one and the
same flat grey square: the *fine detail* question ("What pattern fills the small square in the corner?") is
unanswerable at base resolution and readable in the full-resolution tiles that ``image_tokens: anyres`` adds.

Why the tag looks the way it does (``tag_pattern``): a hard-edged patch of lines leaves up to 27 grey levels of
difference at its edges once shrunk (bicubic, as the image processors resize: the pairs of rows at an edge no
longer average out), enough for a model to tell horizontal from vertical without tiles. The pattern's contrast
is therefore faded in over its outer 6 px with a raised cosine; shrunk, the three patterns then differ by at
most 1 grey level anywhere (``tests/test_demo_hires.py`` checks it), under the picture's own +-2 levels of noise.
The tag's phase (whether its first line is ink or background) is random too.

The big shape stays clear of the tags and of the resize filter's reach around them, so questions about it
(colour, shape) and about where the tag is (corner) are answerable at any resolution: they are the controls
that show a base-resolution model does see the picture.

Chance: as in ``scenes``, every question has a fixed text and an option set its answer is drawn from; the
held-out design gives each answer equally often, so an image-blind answerer scores exactly 1/len(options).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLOURS, SHAPES, draw_shape

HIRES_SIZE = 96  # px: 2x2 tiles of the 48 px encoder; its base tile is the picture shrunk 2x
TAG = 16  # px side of the tag: one 16 px patch of a full-resolution tile, a flat 8x8 px square once shrunk
TAPER = 6  # px over which the tag's line contrast fades in (module docstring)
NOISE = 2  # +- grey levels of per-pixel noise on the whole picture
PATTERNS = ("horizontal", "vertical", "checkered")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
# The big shape's box stays inside [OBJECT_LO, OBJECT_HI): the tags end at 16 px from the border and the 2x
# bicubic resize reads 4 px around each output pixel, so shape and tag never share a pixel of the shrunk picture.
OBJECT_LO, OBJECT_HI = 22, HIRES_SIZE - 22
OBJECT_SIZES = (24, 36)  # smallest and largest side of the big shape, px

HIRES_TYPES = ("detail", "corner", "colour", "shape")  # scored question types, in table order


@dataclass(frozen=True)
class DetailScene:
    shape: str
    colour: str
    size: int  # side of the big shape, px
    at: tuple[int, int]  # (x, y) of its top-left corner
    tint: tuple[int, int, int]  # per-picture jitter of the shape's colour
    background: int  # grey level
    pattern: str  # the tag's lines: one of PATTERNS
    corner: str  # the tag's corner: one of CORNERS
    phase: int  # 0: the tag's first line is ink, 1: background
    ink: int  # grey level of the tag's lines
    noise_seed: int


def random_detail_scene(rng: random.Random, *, pattern: str | None = None, corner: str | None = None,
                        colour: str | None = None, shape: str | None = None) -> DetailScene:
    """A detail scene with the given attributes fixed and everything else drawn from ``rng``."""
    size = rng.randint(*OBJECT_SIZES)
    x, y = (rng.randint(OBJECT_LO, OBJECT_HI - size) for _ in range(2))
    return DetailScene(
        shape=shape or rng.choice(SHAPES), colour=colour or rng.choice(list(COLOURS)), size=size, at=(x, y),
        tint=tuple(rng.randint(-20, 20) for _ in range(3)), background=rng.randint(215, 250),
        pattern=pattern or rng.choice(PATTERNS), corner=corner or rng.choice(CORNERS), phase=rng.randrange(2),
        ink=rng.randint(30, 110), noise_seed=rng.getrandbits(32))


def _taper(n: int = TAG, ramp: int = TAPER) -> np.ndarray:
    """[n] weights: a raised cosine from ~0 to 1 over `ramp` px at each end, 1 in between."""
    e = np.ones(n)
    for i in range(ramp):
        e[i] = e[n - 1 - i] = 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / ramp)
    return e


def tag_pattern(pattern: str, phase: int = 0) -> np.ndarray:
    """[TAG, TAG] ink fraction in [0, 1]: 0.5 everywhere on average, +-0.5 line contrast faded in at the edges."""
    y, x = np.mgrid[0:TAG, 0:TAG]
    lines = {"horizontal": y, "vertical": x, "checkered": x + y}
    if pattern not in lines:
        raise ValueError(f"unknown pattern {pattern!r}; valid: {list(PATTERNS)}")
    sign = np.where((lines[pattern] + phase) % 2 == 0, 1.0, -1.0)
    return 0.5 + 0.5 * sign * np.outer(_taper(), _taper())


def tag_box(corner: str) -> tuple[int, int]:
    """(x, y) of the tag's top-left pixel: flush with the picture's corner (on the tiles' 16 px patch grid)."""
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; valid: {list(CORNERS)}")
    far = HIRES_SIZE - TAG
    return (far if corner.endswith("right") else 0), (far if corner.startswith("bottom") else 0)


def draw_detail(scene: DetailScene) -> Image.Image:
    """Render a detail scene as a 96x96 RGB image."""
    img = Image.new("RGB", (HIRES_SIZE, HIRES_SIZE), (scene.background,) * 3)
    fill = tuple(max(0, min(255, v + t)) for v, t in zip(COLOURS[scene.colour], scene.tint))
    draw_shape(ImageDraw.Draw(img), scene.shape, *scene.at, scene.size, fill)
    px = np.asarray(img, dtype=np.float64).copy()  # [H, W, 3]
    x, y = tag_box(scene.corner)
    ink = tag_pattern(scene.pattern, scene.phase)[..., None]  # [TAG, TAG, 1]
    px[y:y + TAG, x:x + TAG] = scene.background + (scene.ink - scene.background) * ink
    px += np.random.default_rng(scene.noise_seed).integers(-NOISE, NOISE + 1, size=px.shape)
    return Image.fromarray(np.clip(np.round(px), 0, 255).astype(np.uint8), "RGB")


def tag_tile(image: Image.Image, corner: str) -> Image.Image:
    """The 48x48 quarter of a detail picture that holds the tag, at full resolution (what stage 0's CLIP learns
    the patterns from, and one of the tiles ``anyres`` gives the model)."""
    half = HIRES_SIZE // 2
    x, y = tag_box(corner)
    x, y = (x // half) * half, (y // half) * half
    return image.crop((x, y, x + half, y + half))


# --- questions -------------------------------------------------------------------------------------
# (question text without the image marker, answer, options); one fixed text per type, so a balanced
# held-out split makes every image-blind answerer score exactly chance.
def _detail_q(scene: DetailScene):
    return "What pattern fills the small square in the corner?", scene.pattern, list(PATTERNS)


def _corner_q(scene: DetailScene):
    return "In which corner is the small square?", scene.corner, list(CORNERS)


def _colour_q(scene: DetailScene):
    return "What colour is the big shape?", scene.colour, list(COLOURS)


def _shape_q(scene: DetailScene):
    return "What is the big shape?", scene.shape, list(SHAPES)


ASK_HIRES = {"detail": _detail_q, "corner": _corner_q, "colour": _colour_q, "shape": _shape_q}


def detail_turns(scene: DetailScene, rng: random.Random) -> list[tuple[str, str]]:
    """One training conversation: every question once, in random order. No answer follows from another
    (pattern, corner, colour and shape are drawn independently), so no turn leaks the next one's answer."""
    order = list(HIRES_TYPES)
    rng.shuffle(order)
    return [ASK_HIRES[t](scene)[:2] for t in order]


def detail_caption(scene: DetailScene, rng: random.Random) -> str:
    """The stage-1 caption (also what replaces the image in stage 0's text): everything, the pattern included,
    as a real caption describes what a person sees at full resolution."""
    what = f"a {scene.colour} {scene.shape} with a small square of {scene.pattern} lines in the {scene.corner} corner"
    text = rng.choice(["{}.", "A picture of {}.", "There is {}."]).format(what)
    return text[0].upper() + text[1:]


def coarse_caption(scene: DetailScene) -> str:
    """What stage 0's CLIP pairs with the whole picture (seen shrunk to 48 px, where the pattern is gone)."""
    return f"A {scene.colour} {scene.shape} and a grey square in the {scene.corner} corner."


def tile_caption(scene: DetailScene) -> str:
    """What stage 0's CLIP pairs with the tag's tile (full resolution: the pattern is visible)."""
    return f"{scene.pattern.capitalize()} lines in the {scene.corner} corner, by a {scene.colour} {scene.shape}."


def answer_cells(qtype: str) -> list[str]:
    """The held-out design of a type: each possible answer, used equally often."""
    return ASK_HIRES[qtype](random_detail_scene(random.Random(0)))[2]


def scene_for(qtype: str, answer: str, rng: random.Random) -> DetailScene:
    """A random scene whose ``qtype`` question has ``answer``."""
    field = {"detail": "pattern", "corner": "corner", "colour": "colour", "shape": "shape"}[qtype]
    return random_detail_scene(rng, **{field: answer})
