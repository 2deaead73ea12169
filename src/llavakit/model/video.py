"""LLaVA-OneVision's video rule (``image_tokens: anyres_max`` models with a ``<video>`` token).

A video is its sampled frames (`llavakit.data.video`), each one base tile: the whole frame resized to the
encoder's square input (`frame_tiles`), as an image's base tile is. Each frame goes through the vision tower
(the configured feature layer) and the projector, giving a g x g map [g*g, D]; the map is bilinearly pooled to
``ceil(g/2) x ceil(g/2)`` (transformers' LlavaOnevision ``apply_pooling``: ``F.interpolate(..., mode="bilinear")``,
no align_corners, no antialias); the frames' pooled features are laid end to end and one ``image_newline`` closes
the video::

    frame 0 [p*p, D]  frame 1 [p*p, D]  ...  frame F-1 [p*p, D]  image_newline [1, D]      p = ceil(g / 2)

so a video of F frames takes ``F * p*p + 1`` tokens (`video_token_count`); e.g. SigLIP-384/14, g = 27, p = 14:
196 per frame, 32 frames -> 6273. The processor counts with `video_token_count`, the model builds the features
with `video_features`; tests/test_video.py checks the two agree, and against transformers.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image
from torch.nn import functional as F


def pooled_side(grid: int) -> int:
    """Side of a frame's feature map after OneVision's 2x2 pooling: ceil(g / 2)."""
    return math.ceil(int(grid) / 2)


def video_token_count(num_frames: int, grid: int) -> int:
    """Placeholder tokens of one video of `num_frames` frames, `grid` x `grid` features per frame."""
    if int(num_frames) < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    return int(num_frames) * pooled_side(grid) ** 2 + 1


def pool_frames(frames: torch.Tensor) -> torch.Tensor:
    """[F, g*g, D] projected frame features -> [F, p*p, D], p = ceil(g/2), bilinear (transformers' rule)."""
    n, t, d = frames.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"video frames need a square feature grid (vision_feature_select='patch'), got {t} tokens")
    grid = frames.reshape(n, g, g, d).permute(0, 3, 1, 2)  # [F, D, g, g]
    p = pooled_side(g)
    return F.interpolate(grid, size=[p, p], mode="bilinear").permute(0, 2, 3, 1).reshape(n, p * p, d)


def video_features(frames: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """One video's projected frame features [F, g*g, D] -> its tokens [F * p*p + 1, D] (module docstring)."""
    pooled = pool_frames(frames)
    return torch.cat([pooled.reshape(-1, pooled.shape[-1]), newline.to(pooled.device, pooled.dtype)[None]], dim=0)


def frame_tiles(frames: Sequence[Image.Image], tile: int, resample=Image.BICUBIC) -> list[Image.Image]:
    """Each frame as one base tile: RGB, resized to `tile` x `tile` (no crop, no pad: the whole frame)."""
    return [(f if f.mode == "RGB" else f.convert("RGB")).resize((tile, tile), resample=resample) for f in frames]


def stack_videos(videos: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video frame pixels [F_v, 3, H, W] -> (pixel_values_videos [V, max F_v, 3, H, W], zero frames after each
    video's own; video_num_frames [V])."""
    counts = torch.tensor([v.shape[0] for v in videos], dtype=torch.long)
    most = int(counts.max()) if len(videos) else 0
    out = videos[0].new_zeros(len(videos), most, *videos[0].shape[1:]) if videos else torch.zeros(0, 0, 3, 1, 1)
    for k, v in enumerate(videos):
        out[k, :v.shape[0]] = v
    return out, counts


def frames_of(pixel_values_videos: torch.Tensor, video_num_frames=None) -> tuple[torch.Tensor, list[int]]:
    """[V, F, 3, H, W] (+ each video's own frame count, None = all F) -> (the real frames [sum F_v, 3, H, W],
    frames per video)."""
    if pixel_values_videos.dim() != 5:
        raise ValueError(f"pixel_values_videos must be [videos, frames, 3, H, W], got {list(pixel_values_videos.shape)}")
    v, f = pixel_values_videos.shape[:2]
    if video_num_frames is None:
        counts = [f] * v
    else:
        counts = [int(n) for n in (video_num_frames.tolist() if torch.is_tensor(video_num_frames)
                                   else video_num_frames)]
    if len(counts) != v or any(not 1 <= n <= f for n in counts):
        raise ValueError(f"video_num_frames {counts} does not fit pixel_values_videos of {v} video(s) x {f} frames")
    if all(n == f for n in counts):
        return pixel_values_videos.reshape(v * f, *pixel_values_videos.shape[2:]), counts
    return torch.cat([pv[:n] for pv, n in zip(pixel_values_videos, counts)]), counts
