"""Decode one image reference into the RGB `PIL.Image` the processor expects, or say why it can't.

Readers keep images as references (a path, encoded bytes, a PIL image, or a ``datasets``
``{"bytes", "path"}`` dict); `open_image` is what a dataloader worker calls to decode one, and
`check_image` is what ``llavakit data check`` calls to find the bad ones before training starts.

Decoding is defensive because real datasets are messy: the format is sniffed from the content
(a GIF named ``.jpg`` still loads), animated files give their first frame, EXIF orientation is
applied, every mode becomes RGB (transparency composited on white), and the pixel count is
checked against ``max_pixels`` from the header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Same value as PIL's own warning threshold, but enforced by us as an error that names the file.
DEFAULT_MAX_PIXELS = 89_478_485
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
    "image unreadable": "check the file's permissions",
    "image remote": "download remote images first and point the sample at the local file",
    "image wrong type": "an image reference must be a path, bytes, a PIL image or a {'bytes', 'path'} dict",
}


class ImageError(ValueError):
    """An image that cannot be used. ``kind`` is a key of `HINTS`; ``str()`` reads 'kind: detail'."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        self.detail = detail
        self.hint = HINTS.get(kind, "")
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


def _guard_pixels(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError("image too large",
                         f"{name} is {w}x{h} = {w * h:,} pixels, over max_pixels={max_pixels:,} "
                         "(decompression-bomb guard)")


def _open_checked(ref: Any, max_pixels: int | None) -> tuple[Image.Image, str]:
    """Open lazily (header only), sniffing the format from content, and enforce the pixel guard."""
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
        _guard_pixels(im.size, name, max_pixels)
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


def open_image(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `ref` (path, bytes, PIL image or datasets dict) into an RGB image; `ImageError` if unusable."""
    if isinstance(ref, Image.Image):
        name = describe(ref)
        _guard_pixels(ref.size, name, max_pixels)
        _first_frame_loaded(ref, name)
        out = _finish(ref, name)
        return out.copy() if out is ref else out  # never hand back (and later mutate) the caller's object
    im, name = _open_checked(ref, max_pixels)
    with im:
        _first_frame_loaded(im, name)
        out = _finish(im, name)
        # Closing the file invalidates `im`; keep a detached copy when no conversion made one.
        return out.copy() if out is im else out


def image_size(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of `ref` as `open_image` would return it, read from the header only (EXIF
    orientation applied: a photo stored sideways with a rotate-90 flag reports its upright size)."""
    if isinstance(ref, Image.Image):
        im, name, close = ref, describe(ref), False
        _guard_pixels(im.size, name, max_pixels)
    else:
        (im, name), close = _open_checked(ref, max_pixels), True
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


def diagnose_image(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, full: bool = True) -> ImageError | None:
    """The `ImageError` `open_image` would raise for `ref`, or None if it is usable.

    ``full=False`` reads only the header (existence, format, size): fast, but misses truncation.
    """
    try:
        if full:
            open_image(ref, max_pixels).close()
        elif isinstance(ref, Image.Image):
            _guard_pixels(ref.size, describe(ref), max_pixels)
        else:
            _open_checked(ref, max_pixels)[0].close()
    except ImageError as e:
        return e
    return None


def check_image(ref: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS, full: bool = True) -> str | None:
    """Why `ref` cannot be used ('kind: detail'), or None; the decoded pixels are not kept."""
    err = diagnose_image(ref, max_pixels, full)
    return None if err is None else err.reason
