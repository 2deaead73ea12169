"""LLaVA-OneVision's ``anyres_max_N`` image policy (``image_tokens: anyres_max``): LLaVA-NeXT's tiles with a cap.

An image alone in its sample is tiled as under ``anyres`` (`llavakit.model.anyres`: base tile + the grid of its
best pinpoint, the grid's feature map unpadded), and then, when the unpadded map [kh, kw] holds more than
``max_tiles`` base tiles' worth of features (ratio = sqrt(kh*kw / (max_tiles*g*g)) > 1.1), the map is bilinearly
interpolated down to ``[int(kh // ratio), int(kw // ratio)]`` (transformers' LlavaOnevision rule, same float
operations, so the counts agree). Then one newline per row, base tile first::

    base tile [g*g, D]  then  for each row of the (shrunk) map: its features [kw', D] + image_newline [1, D]

Each image of a sample with more than one image is padded to a square (the processor's mean colour, as LLaVA's
``pad``) and gets its base tile only, plus one newline: ``g*g + 1`` tokens (OneVision's multi-image rule). Which
images are alone is said per sample, as transformers' ``batch_num_images`` [B] (images per sample, in order);
`tiled_images` turns that into one flag per image.

The default pinpoints are OneVision's: every grid from 1x1 to 6x6 tiles of the encoder's input size.
"""

from __future__ import annotations

import math
import torch
from torch.nn import functional as F

from .anyres import default_grid_pinpoints, tile_grid, unpadded_extent

MAX_GRID = 6  # OneVision's default pinpoints: 1..6 tiles per side
SHRINK_ABOVE = 1.1  # the map is interpolated only when it is more than 10% over the cap (transformers' rule)


def onevision_grid_pinpoints(tile: int, max_grid: int = MAX_GRID) -> list[list[int]]:
    """[[t, t], [t, 2t], ..., [6t, 6t]]: rows outer, columns inner (the order decides ties, as transformers')."""
    return [[r * int(tile), c * int(tile)] for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]


def policy_grid_pinpoints(policy: str, tile: int) -> list[list[int]]:
    """The default pinpoints of a tiled policy: LLaVA-NeXT's for ``anyres``, OneVision's for ``anyres_max``."""
    return onevision_grid_pinpoints(tile) if policy == "anyres_max" else default_grid_pinpoints(tile)


def check_max_tiles(max_tiles) -> int:
    """`max_tiles` as a positive int (else ValueError)."""
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1:
        raise ValueError(f"anyres_max_tiles must be a positive integer (OneVision uses 9), got {max_tiles!r}")
    return int(max_tiles)


def vision_aspect_ratio(max_tiles: int) -> str:
    """transformers' name of the policy: ``"anyres_max_9"``."""
    return f"anyres_max_{check_max_tiles(max_tiles)}"


def parse_vision_aspect_ratio(value: str) -> int:
    """``"anyres_max_9"`` -> 9; anything else is a ValueError."""
    head, _, n = str(value).rpartition("_")
    if head != "anyres_max" or not n.isdigit() or int(n) < 1:
        raise ValueError(f"vision_aspect_ratio={value!r} is not of the form 'anyres_max_N' (N >= 1); llavakit "
                         "reads only OneVision's anyres_max_N policy")
    return int(n)


def shrunk_extent(kh: int, kw: int, grid: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) the unpadded kh x kw map keeps: itself, or its bilinear shrink when over the cap."""
    ratio = math.sqrt(kh * kw / (max_tiles * grid**2))
    if ratio > SHRINK_ABOVE:
        return int(kh // ratio), int(kw // ratio)
    return kh, kw


def tiled_images(batch_num_images, n_images: int) -> list[bool]:
    """Per image, whether it is tiled (alone in its sample) or base-only (one of several); ``batch_num_images``
    [B] counts the images of each sample in order, None = every image alone (transformers' default)."""
    if batch_num_images is None:
        return [True] * n_images
    counts = [int(n) for n in (batch_num_images.tolist() if torch.is_tensor(batch_num_images) else batch_num_images)]
    if sum(counts) != n_images:
        raise ValueError(f"batch_num_images {counts} counts {sum(counts)} images, but {n_images} were given")
    return [n == 1 for n in counts for _ in range(n)]


def anyres_max_token_count(width: int, height: int, pinpoints, tile: int, grid: int, max_tiles: int,
                           tiled: bool = True) -> int:
    """Tokens of one image: base tile + (shrunk) unpadded grid map + one newline per row; base + 1 newline when
    the image is one of several in its sample (``tiled=False``)."""
    if not tiled:
        return grid * grid + 1
    rows, cols = tile_grid(width, height, pinpoints, tile)
    top, bottom, left, right = unpadded_extent(width, height, rows * grid, cols * grid)
    kh, kw = shrunk_extent(bottom - top, right - left, grid, max_tiles)
    return grid * grid + kh * kw + kh


def anyres_max_features(tiles: torch.Tensor, size: tuple[int, int] | None, pinpoints, tile: int,
                        newline: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """One image's tile features -> its tokens [T, D] (module docstring). `tiles` is [1 + rows*cols, g*g, D]
    (base first) for an image alone in its sample, or [1, g*g, D] (its base tile) with `size` None for one of
    several."""
    n, t, d = tiles.shape
    nl = newline.to(tiles.device, tiles.dtype)
    if size is None:
        if n != 1:
            raise ValueError(f"an image of a multi-image sample has one tile, got {n}")
        return torch.cat([tiles[0], nl[None]], dim=0)
    w, h = size
    rows, cols = tile_grid(w, h, pinpoints, tile)
    g = math.isqrt(t)
    if n != rows * cols + 1 or g * g != t:
        raise ValueError(f"an image of {w}x{h} needs {rows * cols + 1} tiles of a square feature grid, got {n} of {t}")
    grid = tiles[1:].reshape(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
    top, bottom, left, right = unpadded_extent(w, h, rows * g, cols * g)
    grid = grid[top:bottom, left:right]  # [kh, kw, D]
    kh, kw = shrunk_extent(grid.shape[0], grid.shape[1], g, max_tiles)
    if (kh, kw) != tuple(grid.shape[:2]):
        if kh * kw == 0:
            grid = grid.new_zeros(kh, kw, d)
        else:  # [1, D, kh, kw] -> [1, D, kh', kw'], as transformers (align_corners=False, no antialias)
            grid = F.interpolate(grid.permute(2, 0, 1)[None], [kh, kw], mode="bilinear")[0].permute(1, 2, 0)
    rows_nl = torch.cat([grid, nl.expand(grid.shape[0], 1, d)], dim=1).reshape(-1, d)
    return torch.cat([tiles[0], rows_nl], dim=0)

