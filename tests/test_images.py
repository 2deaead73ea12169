"""open_image / check_image: every mode becomes RGB, and every unusable file gets a reason naming it."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from llavakit.data.images import ImageError, check_image, diagnose_image, open_image, to_rgb


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but that holds (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# --- modes -> RGB -------------------------------------------------------------------------------
def test_rgba_transparency_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: must not come out black
    im.save(tmp_path / "a.png")
    out = open_image(str(tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_palette_with_transparency_and_la(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(tmp_path / "p.png", transparency=0)
    out = open_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (0, 0, 255)

    la = Image.new("LA", (2, 2), (0, 0))  # black, fully transparent
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_grey_cmyk_and_16bit(tmp_path):
    Image.new("L", (3, 3), 77).save(tmp_path / "l.png")
    assert open_image(tmp_path / "l.png").getpixel((1, 1)) == (77, 77, 77)

    Image.new("CMYK", (3, 3), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # CMYK red
    r, g, b = open_image(tmp_path / "c.jpg").getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60

    # 16-bit grey at half scale: PIL's own conversion clips it to white; we rescale to 128.
    arr = np.full((3, 3), 128 * 257, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "i16.png")
    assert open_image(tmp_path / "i16.png").getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "phone.jpg", exif=exif)
    assert Image.open(tmp_path / "phone.jpg").size == (20, 10)
    assert open_image(tmp_path / "phone.jpg").size == (10, 20)


def test_animated_gif_gives_first_frame_even_named_jpg(tmp_path):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.jpg"  # the extension lies: the content is a GIF
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == 2
    out = open_image(str(path))
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 0, 0)
    # A PIL image the caller left on a later frame is rewound too.
    moved = Image.open(path)
    moved.seek(1)
    assert open_image(moved).getpixel((3, 3)) == (255, 0, 0)


def test_bytes_pil_and_datasets_dict_refs():
    im = Image.new("RGB", (5, 4), (1, 2, 3))
    data = encoded(im, "PNG")
    for ref in (data, im, {"bytes": data, "path": None}):
        out = open_image(ref)
        assert out.size == (5, 4) and out.getpixel((0, 0)) == (1, 2, 3)
    assert open_image(im) is not im  # the caller's object is never handed back


def test_returned_image_is_detached_from_the_file(tmp_path):
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "x.png")
    out = open_image(tmp_path / "x.png")
    (tmp_path / "x.png").unlink()
    assert out.resize((2, 2)).getpixel((0, 0)) == (9, 9, 9)


# --- unusable files -----------------------------------------------------------------------------
def test_pixel_guard_is_our_error_naming_the_file(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "big.png", max_pixels=100)
    assert e.value.kind == "image too large" and "big.png" in str(e.value) and "400" in str(e.value)
    assert open_image(tmp_path / "big.png", max_pixels=None).size == (20, 20)

    # A header claiming 100k x 100k: refused from the header alone, with the default guard.
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    reason = check_image(str(tmp_path / "bomb.png"))
    assert reason.startswith("image too large") and "bomb.png" in reason
    # Between our limit and PIL's hard limit PIL would only warn; ours is still an error.
    (tmp_path / "mid.png").write_bytes(png_header_only(10_000, 10_000))
    assert check_image(str(tmp_path / "mid.png"), full=False).startswith("image too large")


@pytest.mark.parametrize("case, kind", [
    ("missing", "image missing"),
    ("empty", "image empty"),
    ("folder", "image is a folder"),
    ("corrupt", "image corrupt"),
    ("truncated", "image truncated"),
    ("url", "image remote"),
])
def test_unusable_files_get_a_reason(tmp_path, case, kind):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    elif case == "corrupt":
        path.write_bytes(b"this is a text file, not a picture" * 10)
    elif case == "truncated":
        rng = np.random.default_rng(0)
        data = encoded(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
        path.write_bytes(data[: len(data) // 2])
    ref = "https://example.com/cat.png" if case == "url" else str(path)
    reason = check_image(ref)
    assert reason is not None and reason.startswith(kind + ":")
    assert (ref if case == "url" else path.name) in reason
    with pytest.raises(ImageError) as e:
        open_image(ref)
    assert e.value.kind == kind and e.value.hint


def test_header_check_is_fast_but_misses_truncation(tmp_path):
    rng = np.random.default_rng(1)
    data = encoded(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    assert diagnose_image(str(tmp_path / "t.jpg"), full=False) is None
    assert diagnose_image(str(tmp_path / "t.jpg")).kind == "image truncated"


def test_valid_image_has_no_reason(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.webp")
    assert check_image(str(tmp_path / "ok.webp")) is None
    assert check_image(b"not an image").startswith("image corrupt")
    assert check_image(12345).startswith("image wrong type")
