"""Decode one image reference into the RGB `PIL.Image` the processor expects, or say why it can't.

Readers keep images as references (a path, encoded bytes, a PIL image, or a ``datasets``
``{"bytes", "path"}`` dict); `open_image` is what a dataloader worker calls to decode one, and
`check_image` is what ``llavakit data check`` calls to find the bad ones before training starts.

Decoding is defensive because real datasets are messy: the format is sniffed from the content
(a GIF named ``.jpg`` still loads), animated files give their first frame, EXIF orientation is
applied, every mode becomes RGB (transparency composited on white), and the size is checked
against `ImageLimits` (pixels, longest side, aspect ratio) from the header, before any pixel is
decoded: a 92-byte 12000x1 PNG would otherwise cost gigabytes once padded or resized.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Same value as PIL's own warning threshold, but enforced by us as an error that names the file.
DEFAULT_MAX_PIXELS = 89_478_485
# Longest side. LLaVA's ``pad`` aspect processes a square of the long side, so an image costs about
# long_side² pixels whatever its width x height: 12000x1 (92 bytes as PNG) costs like 12000x12000.
# 8192² = 67M pixels is under DEFAULT_MAX_PIXELS, so no image costs more than a square the pixel
# limit already lets through (~0.9 GB to preprocess at CLIP-336); 50 MP phone photos (8160x6120) pass.
DEFAULT_MAX_SIDE = 8192
# Long side / short side. Processors that resize the short side to the encoder's input (CLIP's
# ``shortest_edge``) multiply the pixels by this ratio: 4000x1 becomes 1,344,000x336 at CLIP-336
# (4.3 GB). At 20:1 that is at most 20 x 336² pixels (~60 MB). Beyond it an image carries little an
# encoder can see anyway: padded to a 336 square its short side is under 17 px, about one patch row.
DEFAULT_MAX_ASPECT_RATIO = 20.0
# `warnings.catch_warnings` swaps process-wide state, so calls from several threads (`validate`
# checks images in a thread pool) must not overlap. Image.open reads only the header: cheap to serialise.
_OPEN_LOCK = threading.Lock()

# Modes that carry an alpha channel; they are composited on white so transparent areas do not
# turn black (what a plain .convert("RGB") would do with premultiplied-black pixels).
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# Image kind -> what the user should do about it. Kinds start every reason, so summaries group by them.
HINTS = {
    "image missing": "check the path and --image-folder (image paths are resolved against it)",
    "image is a folder": "point the sample at an image file, not a directory",
    "image empty": "the file has 0 bytes; re-download or re-extract it",
    "image corrupt": "the file is not a readable image; re-download it or drop the sample",
    "image truncated": "the file ends early (interrupted download?); re-download it or drop the sample",
    "image too large": "resize the image, or raise max_pixels (--max-pixels) if you trust the file",
    "image too elongated": "crop or pad the image, or raise max_aspect_ratio (--max-aspect-ratio) if you trust it",
    "image unreadable": "check the file's permissions",
    "image remote": "download remote images first and point the sample at the local file",
    "image wrong type": "an image reference must be a path, bytes, a PIL image or a {'bytes', 'path'} dict",
}


class ImageError(ValueError):
    """An image that cannot be used. ``kind`` is a key of `HINTS`; ``str()`` reads 'kind: detail'."""

    def __init__(self, kind: str, detail: str, hint: str | None = None):
        self.kind = kind
        self.detail = detail
        self.hint = HINTS.get(kind, "") if hint is None else hint
        super().__init__(f"{kind}: {detail}")

    @property
    def reason(self) -> str:
        return f"{self.kind}: {self.detail}"


def describe(ref: Any) -> str:
    """How error messages name an image reference."""
    if isinstance(ref, (str, Path)):
        return str(ref)
    if isinstance(ref, bytes):
        return f"<{len(ref)} bytes>"
    if isinstance(ref, Image.Image):
        return f"<PIL {ref.mode} {ref.size[0]}x{ref.size[1]}>"
    if isinstance(ref, dict):
        return str(ref.get("path") or describe(ref.get("bytes")))
    return f"<{type(ref).__name__}>"


def _source(ref: Any) -> tuple[Any, str]:
    """(something Image.open accepts, its name) for a path / bytes / datasets dict reference."""
    if isinstance(ref, dict):  # datasets' Image(decode=False) value
        if ref.get("bytes"):
            return _source(ref["bytes"])
        if ref.get("path"):
            return _source(ref["path"])
        raise ImageError("image empty", "the datasets image value has neither bytes nor a path")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
        if not data:
            raise ImageError("image empty", "the image bytes are empty")
        return io.BytesIO(data), describe(data)
    if isinstance(ref, (str, Path)):
        path = str(ref)
        if "://" in path:
            raise ImageError("image remote", f"{path} is a URL; llavakit does not fetch images")
        if os.path.isdir(path):
            raise ImageError("image is a folder", f"{path} is a directory")
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise ImageError("image missing", f"file not found: {path}") from None
        except OSError as e:
            raise ImageError("image unreadable", f"{path}: {e.strerror or e}") from None
        if size == 0:
            raise ImageError("image empty", f"{path} has 0 bytes")
        return path, path
    raise ImageError("image wrong type", f"{describe(ref)} is not an image reference")


def pick_limit(value, default):
    """A size limit from a config key or CLI flag: None (unset) = ``default``, 0 or less = None (no limit), else
    ``value``. The rule of `ImageLimits.of` and `llavakit.data.video.VideoLimits.of`."""
    return default if value is None else (value if value > 0 else None)


@dataclass(frozen=True)
class ImageLimits:
    """How big an image may be, checked from its header before any pixel is decoded; None = no limit.

    ``max_pixels`` bounds width x height (decompression bombs), ``max_side`` the longest side (LLaVA's
    ``pad`` makes a square of it) and ``max_aspect_ratio`` long side / short side (a short-side resize
    multiplies the pixels by it). Picklable: ``limits.open`` is a dataloader-worker image loader.
    """

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_side: int | None = DEFAULT_MAX_SIDE
    max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO

    @classmethod
    def of(cls, max_pixels: int | None = None, max_side: int | None = None,
           max_aspect_ratio: float | None = None) -> "ImageLimits":
        """From config keys / CLI flags: None (unset) means the default, 0 or less turns the limit off."""
        return cls(pick_limit(max_pixels, DEFAULT_MAX_PIXELS), pick_limit(max_side, DEFAULT_MAX_SIDE),
                   pick_limit(max_aspect_ratio, DEFAULT_MAX_ASPECT_RATIO))

    def as_kwargs(self) -> dict:
        """``max_pixels`` / ``max_side`` / ``max_aspect_ratio`` keywords for the functions of this module."""
        return asdict(self)

    def check(self, size: tuple[int, int], name: str) -> None:
        """`ImageError` naming the file, its size, the limit and the setting that raises it."""
        _guard(size, name, **self.as_kwargs())

    def open(self, ref: Any) -> Image.Image:
        return open_image(ref, **self.as_kwargs())

    def size(self, ref: Any) -> tuple[int, int]:
        return image_size(ref, **self.as_kwargs())

    def diagnose(self, ref: Any, full: bool = True) -> "ImageError | None":
        return diagnose_image(ref, full=full, **self.as_kwargs())


def add_limit_arguments(parser, max_pixels: int | None = None) -> None:
    """``--max-pixels`` / ``--max-side`` / ``--max-aspect-ratio`` (unset: `ImageLimits.of` defaults)."""
    shown = f"{max_pixels or DEFAULT_MAX_PIXELS:,}"
    parser.add_argument("--max-pixels", type=int, default=max_pixels,
                        help=f"refuse images with more pixels (width x height) than this (default {shown}; 0 = off)")
    parser.add_argument("--max-side", type=int, default=None,
                        help=f"refuse images whose longest side is over this (default {DEFAULT_MAX_SIDE:,}; "
                             "LLaVA's pad processes a square of it; 0 = off)")
    parser.add_argument("--max-aspect-ratio", type=float, default=None,
                        help=f"refuse images longer than this many times their width or height (default "
                             f"{DEFAULT_MAX_ASPECT_RATIO:g}; 0 = off)")


def limits_from_args(args) -> ImageLimits:
    """The `ImageLimits` of `add_limit_arguments`'s flags."""
    return ImageLimits.of(*(getattr(args, k, None) for k in ("max_pixels", "max_side", "max_aspect_ratio")))


def _guard(size: tuple[int, int], name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
           max_side: int | None = DEFAULT_MAX_SIDE, max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> None:
    """Refuse an image whose header size is over a limit: the error names the file, its size, every
    limit it breaks and the flag / config key that raises each."""
    w, h = size
    long, short = max(w, h), min(w, h)
    over = []  # (kind, detail, setting)
    if max_pixels is not None and w * h > max_pixels:
        over.append(("image too large", f"{w * h:,} pixels is over max_pixels={max_pixels:,} "
                     "(decompression-bomb guard)", "max_pixels"))
    if max_side is not None and long > max_side:
        over.append(("image too large", f"its long side {long:,} is over max_side={max_side:,} (LLaVA's pad "
                     f"would process a {long:,}x{long:,} square)", "max_side"))
    if max_aspect_ratio is not None and (short == 0 or long / short > max_aspect_ratio):
        ratio = "unbounded" if not short else f"{long / short:.0f}:1" if long >= 100 * short else f"{long / short:.4g}:1"
        over.append(("image too elongated", f"its aspect ratio {ratio} is over max_aspect_ratio="
                     f"{max_aspect_ratio:g} (a short-side resize would blow it up)", "max_aspect_ratio"))
    if not over:
        return
    keys = [k for _, _, k in over]
    fix = "crop or pad the image" if keys == ["max_aspect_ratio"] else "resize the image"
    hint = (f"{fix}, or raise {' and '.join(keys)} if you trust the file ("
            + ", ".join("--" + k.replace("_", "-") for k in keys) + " on the command line, "
            + ", ".join("data." + k for k in keys) + " in a training config)")
    raise ImageError(over[0][0], f"{name} is {w}x{h}: " + "; ".join(d for _, d, _ in over), hint)


def _open_checked(ref: Any, max_pixels: int | None, max_side: int | None = DEFAULT_MAX_SIDE,
                  max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> tuple[Image.Image, str]:
    """Open lazily (header only), sniffing the format from content, and enforce the size limits."""
    src, name = _source(ref)
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # Our max_pixels check below replaces PIL's bomb warning (its hard error above 2x its
            # limit still applies, and is turned into our error here).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)  # formats=None: PIL sniffs the content and ignores the extension
    except Image.DecompressionBombError as e:  # over PIL's hard limit (2 x MAX_IMAGE_PIXELS): it refuses first
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        raise ImageError("image too large", f"{name} claims {size}, over PIL's hard limit "
                         "(2 x PIL.Image.MAX_IMAGE_PIXELS; decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError("image corrupt", f"{name} is not a recognised image format") from None
    except PermissionError as e:
        raise ImageError("image unreadable", f"{name}: {e.strerror or e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _decode_error(name, e) from None
    try:
        _guard(im.size, name, max_pixels, max_side, max_aspect_ratio)
    except ImageError:
        im.close()
        raise
    return im, name


def _decode_error(name: str, e: Exception) -> ImageError:
    text = str(e) or type(e).__name__
    kind = "image truncated" if "truncat" in text.lower() else "image corrupt"
    return ImageError(kind, f"{name} could not be decoded ({text})")


def _first_frame_loaded(im: Image.Image, name: str) -> None:
    try:
        # Animated GIF/WebP/APNG/TIFF: LLaVA trains on still images, so take the first frame. A freshly
        # opened file already sits there; only an image handed in by the caller may have moved on.
        if getattr(im, "n_frames", 1) > 1 and im.tell() != 0:
            im.seek(0)
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _decode_error(name, e) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency goes on white; 16-bit and float greys are rescaled, not clipped."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # PIL's I;16 -> L conversion clips at 255, turning most 16-bit images white; rescale instead.
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if im.mode == "F" and top <= 1.0:
            arr = arr * 255.0  # a [0, 1] float image
        elif top > 255:
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, ...


def _finish(im: Image.Image, name: str) -> Image.Image:
    try:
        im = ImageOps.exif_transpose(im)  # a phone photo "taken sideways" is stored sideways + an EXIF flag
    except Exception:  # a broken EXIF block should not cost the sample: keep the stored orientation
        pass
    try:
        return to_rgb(im)
    except (OSError, ValueError) as e:
        raise ImageError("image corrupt", f"{name}: cannot convert mode {im.mode} to RGB ({e})") from None


def open_image(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, max_side: int | None = DEFAULT_MAX_SIDE,
               max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """Decode `ref` (path, bytes, PIL image or datasets dict) into an RGB image; `ImageError` if unusable.

    The size limits (see `ImageLimits`) are checked from the header, before anything is decoded.
    """
    if isinstance(ref, Image.Image):
        name = describe(ref)
        _guard(ref.size, name, max_pixels, max_side, max_aspect_ratio)
        _first_frame_loaded(ref, name)
        out = _finish(ref, name)
        return out.copy() if out is ref else out  # never hand back (and later mutate) the caller's object
    im, name = _open_checked(ref, max_pixels, max_side, max_aspect_ratio)
    with im:
        _first_frame_loaded(im, name)
        out = _finish(im, name)
        # Closing the file invalidates `im`; keep a detached copy when no conversion made one.
        return out.copy() if out is im else out


def image_size(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, max_side: int | None = DEFAULT_MAX_SIDE,
               max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> tuple[int, int]:
    """(width, height) of `ref` as `open_image` would return it, read from the header only (EXIF
    orientation applied: a photo stored sideways with a rotate-90 flag reports its upright size)."""
    if isinstance(ref, Image.Image):
        im, name, close = ref, describe(ref), False
        _guard(im.size, name, max_pixels, max_side, max_aspect_ratio)
    else:
        (im, name), close = _open_checked(ref, max_pixels, max_side, max_aspect_ratio), True
    try:
        w, h = im.size
        try:
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF Orientation: transposed
        except Exception:  # a broken EXIF block: open_image keeps the stored orientation too
            rotated = False
        return (h, w) if rotated else (w, h)
    finally:
        if close:
            im.close()


def diagnose_image(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, full: bool = True, *,
                   max_side: int | None = DEFAULT_MAX_SIDE,
                   max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> ImageError | None:
    """The `ImageError` `open_image` would raise for `ref`, or None if it is usable.

    ``full=False`` reads only the header (existence, format, size): fast, but misses truncation.
    """
    limits = dict(max_side=max_side, max_aspect_ratio=max_aspect_ratio)
    try:
        if full:
            open_image(ref, max_pixels, **limits).close()
        elif isinstance(ref, Image.Image):
            _guard(ref.size, describe(ref), max_pixels, **limits)
        else:
            _open_checked(ref, max_pixels, **limits)[0].close()
    except ImageError as e:
        return e
    return None


def check_image(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, full: bool = True, *,
                max_side: int | None = DEFAULT_MAX_SIDE,
                max_aspect_ratio: float | None = DEFAULT_MAX_ASPECT_RATIO) -> str | None:
    """Why `ref` cannot be used ('kind: detail'), or None; the decoded pixels are not kept."""
    err = diagnose_image(ref, max_pixels, full, max_side=max_side, max_aspect_ratio=max_aspect_ratio)
    return None if err is None else err.reason
