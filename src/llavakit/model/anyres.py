"""LLaVA-NeXT's ``anyres`` image policy: the tile grid, the tiles, the token count and the feature layout.

One image becomes a *base tile* (the whole image resized to the encoder's square input, ``tile`` px) plus
a grid of ``rows x cols`` tiles cut from the image resized (aspect ratio kept) and padded to the best of
the ``image_grid_pinpoints`` ([height, width] in px, each a multiple of ``tile``). The best pinpoint is
the one that keeps the most of the image's pixels, then the one that wastes the least area.

Features, per image, in transformers' ``LlavaNext`` order::

    base tile [g*g, D]  then  for each row of the unpadded grid map: its features [kw, D] + image_newline [1, D]

where the grid map is the ``rows*g x cols*g`` feature map of the tiles laid out as the image, cut back to
the image's own aspect ratio (`unpadded_extent`, rounding as transformers' ``unpad_image``). So an image
of (width, height) gets ``g*g + kh*kw + kh`` tokens (`anyres_token_count`). The processor and the model
both ask this module, so the two sides cannot disagree.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image
from torch import nn

# llava-v1.6's pinpoints ([336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]) in tiles: (rows, cols)
DEFAULT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_grid_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's default pinpoints for an encoder of `tile` px: [[t, 2t], [2t, t], [2t, 2t], [3t, t], [t, 3t]]."""
    return [[r * int(tile), c * int(tile)] for r, c in DEFAULT_GRIDS]


def check_grid_pinpoints(pinpoints, tile: int) -> list[list[int]]:
    """`pinpoints` as a list of [height, width] ints, each a positive multiple of `tile` (else ValueError)."""
    try:
        out = [[int(h), int(w)] for h, w in pinpoints]
    except (TypeError, ValueError):
        raise ValueError(f"image_grid_pinpoints must be a list of [height, width] pairs, got {pinpoints!r}") from None
    bad = [p for p in out if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    if not out or bad:
        raise ValueError(f"image_grid_pinpoints {out} must be non-empty [height, width] pairs, each a positive "
                         f"multiple of the encoder's input size {tile}; bad: {bad}")
    return out


def best_resolution(width: int, height: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint a width x height image fits best: the most image pixels kept after a
    downscale that fits (never counting upscaling), ties broken by the least area wasted; first one wins."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best, best_kept, best_waste = None, -1, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(ph), int(pw)), kept, waste
    return best


def tile_grid(width: int, height: int, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for a width x height image."""
    h, w = best_resolution(width, height, pinpoints)
    return h // tile, w // tile


def num_tiles(width: int, height: int, pinpoints, tile: int) -> int:
    """Tiles the encoder sees for one image: the grid plus the base tile."""
    rows, cols = tile_grid(width, height, pinpoints, tile)
    return rows * cols + 1


def unpadded_extent(width: int, height: int, map_height: int, map_width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a map_height x map_width feature map that cover a width x height image
    fitted and centred in it. transformers' ``unpad_image`` rule, same float operations: the side that was
    padded is the image's scaled side, ``int(round(side * (map_side / other_side), 7))``, and the padding is
    split as ``(map - kept) // 2`` on *each* side (so an odd remainder keeps one extra row/column)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if width / height > map_width / map_height:  # wider than the map: padded above and below
        kept = int(round(height * (map_width / width), 7))
        pad = (map_height - kept) // 2
        return pad, map_height - pad, 0, map_width
    kept = int(round(width * (map_height / height), 7))
    pad = (map_width - kept) // 2
    return 0, map_height, pad, map_width - pad


def anyres_token_count(width: int, height: int, pinpoints, tile: int, grid: int) -> int:
    """Tokens of one image: base tile (grid^2) + unpadded grid map + one newline per kept row."""
    rows, cols = tile_grid(width, height, pinpoints, tile)
    top, bottom, left, right = unpadded_extent(width, height, rows * grid, cols * grid)
    kh, kw = bottom - top, right - left
    return grid * grid + kh * kw + kh


# --- pixels ----------------------------------------------------------------------------------------
def anyres_tiles(image: Image.Image, pinpoints, tile: int, resample=Image.BICUBIC) -> list[Image.Image]:
    """[base tile, grid tiles in row-major order], each `tile` x `tile` px (PIL, same mode as `image`).

    The grid: the image resized to fit its best pinpoint (aspect kept; the fitted side exact, the other
    rounded up) and centred on a black canvas of the pinpoint's size (LlavaNext pads with 0 before
    normalising; the features over the padding are dropped by the unpadding anyway)."""
    w, h = image.size
    ph, pw = best_resolution(w, h, pinpoints)
    if pw / w < ph / h:
        nw, nh = pw, min(math.ceil(h * (pw / w)), ph)
    else:
        nw, nh = min(math.ceil(w * (ph / h)), pw), ph
    canvas = Image.new(image.mode, (pw, ph), 0)
    canvas.paste(image.resize((nw, nh), resample=resample), ((pw - nw) // 2, (ph - nh) // 2))
    grid = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, ph, tile) for x in range(0, pw, tile)]
    return [image.resize((tile, tile), resample=resample)] + grid


# --- features --------------------------------------------------------------------------------------
class ImageNewline(nn.Module):
    """The learned vector appended after each row of an image's grid features (LLaVA-NeXT's ``image_newline``).

    It lives in the projector (``multi_modal_projector.image_newline.weight``) so it is trained, saved and
    loaded with it; the llava-next export writes it as transformers' top-level ``image_newline``."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=1 / math.sqrt(self.weight.numel()))  # as LlavaNext


def anyres_features(tiles: torch.Tensor, size: tuple[int, int], pinpoints, tile: int,
                    newline: torch.Tensor) -> torch.Tensor:
    """One image's tile features [1 + rows*cols, g*g, D] (base first) -> its tokens [T, D] (module docstring)."""
    w, h = size
    rows, cols = tile_grid(w, h, pinpoints, tile)
    n, t, d = tiles.shape
    g = math.isqrt(t)
    if n != rows * cols + 1 or g * g != t:
        raise ValueError(f"an image of {w}x{h} needs {rows * cols + 1} tiles of a square feature grid, got {n} of {t}")
    grid = tiles[1:].reshape(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    top, bottom, left, right = unpadded_extent(w, h, rows * g, cols * g)
    grid = grid[top:bottom, left:right]  # [kh, kw, D]
    nl = newline.to(grid.device, grid.dtype).expand(grid.shape[0], 1, d)
    return torch.cat([tiles[0], torch.cat([grid, nl], dim=1).reshape(-1, d)], dim=0)
