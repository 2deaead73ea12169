"""Read a video into the frames a LLaVA-OneVision-style model sees, or say why it can't.

A video reference is a file path (read with PyAV, the ``av`` package) or a list of frames (PIL images or image
references `llavakit.data.images.open_image` reads). Either way the frames are sampled uniformly, first and
last included, up to ``max_frames`` (OneVision's ``np.linspace(0, total - 1, n)`` rule, `sample_indices`), and,
with ``fps`` set, at most ``fps`` frames per second of video. The result is a list of RGB PIL frames, in order;
`llavakit.model.processor` turns each into one base tile (``<video>`` markers, ``pixel_values_videos``).

Bounded work: a file is refused before any frame is decoded when its metadata says its frames are over
``max_frame_pixels``, it lasts over ``max_seconds`` or holds over ``max_source_frames`` frames (`VideoLimits`);
decoding converts only the sampled frames to images and stops at the last one, and the frame budget and frame
size are checked again while decoding (metadata can lie). Memory is at most ``max_frames`` decoded frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageError, open_image, pick_limit

VIDEO_MARKER = "<video>"  # where a video goes in a prompt; expanded to its placeholder tokens by the processor
DEFAULT_MAX_FRAMES = 32  # LLaVA-OneVision samples 32 frames per video
DEFAULT_MAX_FRAME_PIXELS = 3840 * 2160  # 4K UHD: 32 kept RGB frames are then at most ~0.8 GB
DEFAULT_MAX_SECONDS = 600.0
DEFAULT_MAX_SOURCE_FRAMES = 18_000  # frames decoded in the worst case (10 minutes at 30 fps)

VIDEO_HINTS = {
    "video missing": "check the path and --image-folder (video paths are resolved against it)",
    "video is a folder": "point the sample at a video file, or give its frames as a list of images",
    "video empty": "the file has 0 bytes; re-download or re-extract it",
    "video remote": "download remote videos first and point the sample at the local file",
    "video corrupt": "the file is not a readable video; re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4), give its "
                     "frames as a list of images, or drop the sample",
    "video has no frames": "the file holds no decodable video stream; re-encode it or drop the sample",
    "video too large": "scale the video down (ffmpeg -vf scale=-2:1080), or raise max_frame_pixels if you trust it "
                       "(data.video_max_frame_pixels in a training config, --video-max-frame-pixels on the command "
                       "line)",
    "video too long": "cut the video (ffmpeg -t SECONDS), or raise max_seconds / max_source_frames if you trust it "
                      "(data.video_max_seconds / data.video_max_source_frames in a training config, "
                      "--video-max-seconds / --video-max-source-frames on the command line)",
    "video wrong type": "a video reference must be a file path or a list of frame images",
}


class VideoError(ImageError):
    """A video that cannot be used (an `ImageError`, so code that reports bad images reports it too)."""

    def __init__(self, kind: str, detail: str, hint: str | None = None):
        super().__init__(kind, detail, VIDEO_HINTS.get(kind, "") if hint is None else hint)


@dataclass(frozen=True)
class VideoLimits:
    """How big a video file may be; None = no limit. Checked from the metadata before decoding, and again
    while decoding."""

    max_frame_pixels: int | None = DEFAULT_MAX_FRAME_PIXELS
    max_seconds: float | None = DEFAULT_MAX_SECONDS
    max_source_frames: int | None = DEFAULT_MAX_SOURCE_FRAMES

    @classmethod
    def of(cls, max_frame_pixels: int | None = None, max_seconds: float | None = None,
           max_source_frames: int | None = None) -> "VideoLimits":
        """From config keys (``data.video_max_frame_pixels`` / ``video_max_seconds`` / ``video_max_source_frames``)
        or CLI flags: None (unset) means the default, 0 or less turns the limit off (`pick_limit`)."""
        return cls(pick_limit(max_frame_pixels, DEFAULT_MAX_FRAME_PIXELS), pick_limit(max_seconds, DEFAULT_MAX_SECONDS),
                   pick_limit(max_source_frames, DEFAULT_MAX_SOURCE_FRAMES))


def add_video_limit_arguments(parser) -> None:
    """``--video-max-frame-pixels`` / ``--video-max-seconds`` / ``--video-max-source-frames`` (unset: the
    `VideoLimits.of` defaults; 0 = off), the flags of ``data.video_max_*``."""
    parser.add_argument("--video-max-frame-pixels", type=int, default=None,
                        help=f"refuse video files whose frames have more pixels than this (default "
                             f"{DEFAULT_MAX_FRAME_PIXELS:,}, 4K UHD; 0 = off)")
    parser.add_argument("--video-max-seconds", type=float, default=None,
                        help=f"refuse video files longer than this many seconds (default {DEFAULT_MAX_SECONDS:g}; "
                             "0 = off)")
    parser.add_argument("--video-max-source-frames", type=int, default=None,
                        help=f"refuse video files holding more frames than this (default {DEFAULT_MAX_SOURCE_FRAMES:,};"
                             " 0 = off)")


def video_limits_from_args(args) -> VideoLimits:
    """The `VideoLimits` of `add_video_limit_arguments`'s flags."""
    return VideoLimits.of(*(getattr(args, k, None) for k in ("video_max_frame_pixels", "video_max_seconds",
                                                             "video_max_source_frames")))


@dataclass(frozen=True)
class VideoInfo:
    """What a file's metadata says: ``frames`` (counted by demuxing when the container does not say), frames
    per second and seconds (None when unknown), and the frame size."""

    frames: int
    fps: float | None
    seconds: float | None
    width: int
    height: int


# --- which frames ----------------------------------------------------------------------------------------
def check_max_frames(max_frames) -> int:
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be a positive integer (OneVision samples 32), got {max_frames!r}")
    return max_frames


def sampled_frame_count(total: int, max_frames: int = DEFAULT_MAX_FRAMES, fps: float | None = None,
                        source_fps: float | None = None) -> int:
    """How many of `total` frames are kept: at most `max_frames`, and with `fps` (and a known `source_fps`) at
    most `fps` per second of video, never fewer than one."""
    n = min(int(total), check_max_frames(max_frames))
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive (or None for no cap), got {fps!r}")
    if fps and source_fps and total > 0:
        n = min(n, max(1, int(total / source_fps * fps)))
    return n


def sample_indices(total: int, max_frames: int = DEFAULT_MAX_FRAMES, fps: float | None = None,
                   source_fps: float | None = None) -> list[int]:
    """Indices of the kept frames: `sampled_frame_count` of them, evenly spread, first and last included
    (OneVision's ``np.linspace(0, total - 1, n, dtype=int)``); distinct and increasing."""
    n = sampled_frame_count(total, max_frames, fps, source_fps)
    return np.linspace(0, total - 1, n).astype(int).tolist() if n else []


# --- files -----------------------------------------------------------------------------------------------
def _path(ref) -> str:
    path = str(ref)
    if "://" in path:
        raise VideoError("video remote", f"{path} is a URL; llavakit does not fetch videos")
    if os.path.isdir(path):
        raise VideoError("video is a folder", f"{path} is a directory")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise VideoError("video missing", f"file not found: {path}") from None
    except OSError as e:
        raise VideoError("video corrupt", f"{path}: {e.strerror or e}") from None
    if size == 0:
        raise VideoError("video empty", f"{path} has 0 bytes")
    return path


def _open(path: str):
    import av

    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError("video corrupt", f"{path} could not be opened as a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError("video has no frames", f"{path} has no video stream")
    return container


def _check_size(width: int, height: int, path: str, limits: VideoLimits) -> None:
    if limits.max_frame_pixels is not None and width * height > limits.max_frame_pixels:
        raise VideoError("video too large", f"{path} has {width}x{height} frames ({width * height:,} pixels), over "
                         f"max_frame_pixels={limits.max_frame_pixels:,}")


def _check_frames(frames: int, path: str, limits: VideoLimits) -> None:
    if limits.max_source_frames is not None and frames > limits.max_source_frames:
        raise VideoError("video too long", f"{path} holds more than {limits.max_source_frames:,} frames "
                         f"(max_source_frames={limits.max_source_frames:,}; decoding them all would take too long)")


def _info(path: str, limits: VideoLimits) -> VideoInfo:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        _check_size(width, height, path, limits)
        fps = float(stream.average_rate) if stream.average_rate else None
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000  # AV_TIME_BASE
        if seconds is not None and limits.max_seconds is not None and seconds > limits.max_seconds:
            raise VideoError("video too long", f"{path} lasts {seconds:.1f} s, over max_seconds={limits.max_seconds:g}")
        frames = int(stream.frames or 0)
        if frames <= 0 and seconds is not None and fps:
            frames = max(1, round(seconds * fps))
        if frames <= 0:  # no count in the metadata: count the packets (demuxing only, no decoding), within budget
            for packet in container.demux(stream):
                if packet.size:
                    frames += 1
                    _check_frames(frames, path, limits)
    finally:
        container.close()
    _check_frames(frames, path, limits)
    if frames <= 0:
        raise VideoError("video has no frames", f"{path} has a video stream without frames")
    return VideoInfo(frames, fps, seconds, width, height)


def probe_video(path: str | Path, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """`VideoInfo` of a file from its metadata (nothing decoded); `VideoError` if unusable or over `limits`."""
    import av

    path = _path(path)
    try:
        return _info(path, limits)
    except av.FFmpegError as e:
        raise VideoError("video corrupt", f"{path} could not be read ({e})") from None


def _decode(path: str, indices: list[int], limits: VideoLimits) -> tuple[dict[int, Image.Image], int]:
    """({index: RGB frame} for the `indices` reached, frames decoded); stops after the last index."""
    wanted, last = set(indices), max(indices)
    kept: dict[int, Image.Image] = {}
    seen = 0
    container = _open(path)  # opened anew, not seeked: raw streams (.h264) cannot seek back
    try:
        for frame in container.decode(container.streams.video[0]):
            seen += 1
            _check_frames(seen, path, limits)
            i = seen - 1
            if i in wanted:
                _check_size(frame.width, frame.height, path, limits)
                kept[i] = frame.to_image()  # RGB
            if i >= last:
                break
    finally:
        container.close()
    return kept, seen


def read_video(path: str | Path, max_frames: int = DEFAULT_MAX_FRAMES, fps: float | None = None,
               limits: VideoLimits = VideoLimits()) -> list[Image.Image]:
    """The sampled frames of a video file (module docstring), as RGB PIL images in order."""
    import av

    path = _path(path)
    check_max_frames(max_frames)
    try:
        info = _info(path, limits)
        indices = sample_indices(info.frames, max_frames, fps, info.fps)
        kept, seen = _decode(path, indices, limits)
        if len(kept) < len(indices):  # the metadata promised more frames than the stream has: sample those seen
            if seen == 0:
                raise VideoError("video has no frames", f"{path}: no frame could be decoded")
            indices = sample_indices(seen, max_frames, fps, info.fps)
            kept, _ = _decode(path, indices, limits)
            if len(kept) < len(indices):
                raise VideoError("video corrupt", f"{path}: {seen} frames decoded once, {len(kept)} the second time")
    except av.FFmpegError as e:
        raise VideoError("video corrupt", f"{path} could not be decoded ({e})") from None
    return [kept[i] for i in indices]


def sample_frames(frames: Sequence[Any], max_frames: int = DEFAULT_MAX_FRAMES) -> list[Any]:
    """The uniformly sampled subset of a list of frames (no fps cap: a list has no frame rate)."""
    frames = list(frames)
    if not frames:
        raise VideoError("video has no frames", "the frame list is empty")
    return [frames[i] for i in sample_indices(len(frames), max_frames)]


def load_video(video: Any, max_frames: int = DEFAULT_MAX_FRAMES, fps: float | None = None,
               limits: VideoLimits = VideoLimits(), max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """A video reference -> its sampled RGB frames: a file path (`read_video`), or a list of frames (PIL images
    or image references, only the sampled ones opened, each checked against `max_pixels` as images are; no
    aspect-ratio limit: a frame is squashed to one square tile, never resized by its short side)."""
    if isinstance(video, (str, Path)):
        return read_video(video, max_frames, fps, limits)
    if isinstance(video, (list, tuple)):
        return [open_image(f, max_pixels, max_aspect_ratio=None) for f in sample_frames(video, max_frames)]
    raise VideoError("video wrong type", f"<{type(video).__name__}> is not a video reference")
