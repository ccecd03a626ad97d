"""open_rgb turns every image mode into sensible RGB; image_problem names every unusable file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from twincar_fast.data.images import image_problem, open_rgb
from twincar_fast.errors import DataError

W, H = 40, 30


def _save(img: Image.Image, path, fmt: str, **kw):
    img.save(path, format=fmt, **kw)
    return path


def _gray(value: int, mode: str = "L") -> Image.Image:
    return Image.new(mode, (W, H), value)


def _rgba_half_transparent(mode: str) -> Image.Image:
    """Left half opaque red (or gray 50 for LA), right half fully transparent."""
    colour = (255, 0, 0, 255) if mode == "RGBA" else (50, 255)
    img = Image.new(mode, (W, H), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    img.paste(colour, (0, 0, W // 2, H))
    return img


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (W, H), 1)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.paste(2, (W // 2, 0, W, H))  # right half: index 2 (blue) ...
    img.info["transparency"] = 2  # ... which is the transparent index
    return img


def _i16(tmp_path):
    arr = np.full((H, W), 65535, dtype=np.uint16)
    arr[:, W // 2 :] = 32896  # 128 * 257
    return _save(Image.fromarray(arr), tmp_path / "i16.png", "PNG")


# (file builder, expected RGB at the left half, expected RGB at the right half)
ODD_IMAGES = {
    "L": (lambda t: _save(_gray(100), t / "l.jpg", "JPEG", quality=100), (100,) * 3, (100,) * 3),
    "1": (lambda t: _save(_gray(1, "1"), t / "b.png", "PNG"), (255,) * 3, (255,) * 3),
    "CMYK": (
        lambda t: _save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), t / "c.jpg", "JPEG"),
        (255, 0, 0),
        (255, 0, 0),
    ),
    "P": (lambda t: _save(_gray(7).convert("P"), t / "p.gif", "GIF"), (7,) * 3, (7,) * 3),
    "P+transparency": (
        lambda t: _save(_palette_with_transparency(), t / "pt.png", "PNG"),
        (255, 0, 0),
        (255, 255, 255),
    ),
    "RGBA": (
        lambda t: _save(_rgba_half_transparent("RGBA"), t / "a.png", "PNG"),
        (255, 0, 0),
        (255, 255, 255),
    ),
    "LA": (
        lambda t: _save(_rgba_half_transparent("LA"), t / "la.png", "PNG"),
        (50,) * 3,
        (255,) * 3,
    ),
    "PNG named .jpg": (
        lambda t: _save(Image.new("RGB", (W, H), (10, 200, 30)), t / "png.jpg", "PNG"),
        (10, 200, 30),
        (10, 200, 30),
    ),
    "I;16": (_i16, (255,) * 3, (128,) * 3),
}


@pytest.mark.parametrize("name", ODD_IMAGES)
def test_odd_modes_open_as_rgb(tmp_path, name):
    build, left, right = ODD_IMAGES[name]
    path = build(tmp_path)
    assert image_problem(path) is None
    img = open_rgb(path)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (H, W, 3) and arr.dtype == np.uint8
    # JPEG is lossy, so allow a few levels; the expected values are far apart.
    np.testing.assert_allclose(arr[H // 2, 2], left, atol=4)
    np.testing.assert_allclose(arr[H // 2, W - 3], right, atol=4)


def _noise_jpeg(size, progressive=False) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def test_draft_decodes_jpeg_smaller_but_never_below_the_request(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_noise_jpeg((400, 300)))
    assert open_rgb(path).size == (400, 300)
    assert open_rgb(path, draft=(100, 75)).size == (100, 75)  # 1/4 scale fits exactly
    small = open_rgb(path, draft=(120, 80))  # 1/3 isn't a JPEG scale: 1/2 it is
    assert small.size == (200, 150) and small.mode == "RGB"
    png = _save(Image.new("RGB", (400, 300)), tmp_path / "big.png", "PNG")
    assert open_rgb(png, draft=(100, 75)).size == (400, 300)  # draft is a JPEG-only shortcut


@pytest.mark.parametrize("size", [(40, 30), (608, 403)])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_jpegs_are_caught(tmp_path, size, progressive, keep):
    data = _noise_jpeg(size, progressive)
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    good.write_bytes(data)
    cut.write_bytes(data[: int(len(data) * keep)])
    assert image_problem(good) is None
    assert "truncated" in image_problem(cut).lower()
    with pytest.raises(DataError, match="cut.jpg"):
        open_rgb(cut)


def test_unusable_files_have_reasons(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    assert image_problem(empty) == "empty file (0 bytes)"
    assert image_problem(text).startswith("not an image")
    assert image_problem(tmp_path / "missing.jpg") == "file not found"


@pytest.mark.parametrize("name", ["empty.jpg", "notes.jpg", "missing.jpg"])
def test_open_rgb_error_is_one_line_naming_the_image(tmp_path, name):
    if name == "empty.jpg":
        (tmp_path / name).write_bytes(b"")
    elif name == "notes.jpg":
        (tmp_path / name).write_text("line one\nline two\n")
    with pytest.raises(DataError) as info:
        open_rgb(tmp_path / name)
    msg = str(info.value)
    assert str(tmp_path / name) in msg and "\n" not in msg


# ---------------------------------------------------------------- issue 29.5: EXIF orientation


def _sideways(upright: Image.Image, path, fmt: str, orientation: int = 6, **kw):
    """`upright` stored turned as a phone does, with the EXIF tag that says how to show it."""
    turn = {
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
        3: Image.Transpose.ROTATE_180,
    }
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(upright.transpose(turn[orientation]), path, fmt, exif=exif, **kw)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_sideways_photos_open_upright(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    upright = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    path = _sideways(upright, tmp_path / "phone.png", "PNG", orientation)
    assert Image.open(path).size == ((H, W) if orientation != 3 else (W, H))  # as stored
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), np.asarray(upright))
    from twincar_fast.data.images import image_size, open_region

    assert image_size(path) == (W, H)
    box = (5, 3, 30, 20)  # 1-based inclusive, in the upright image's pixels
    cut = open_region(path, box)
    np.testing.assert_array_equal(np.asarray(cut), np.asarray(upright.crop((4, 2, 30, 20))))


def test_draft_sizes_are_those_of_the_upright_jpeg(tmp_path):
    upright = Image.open(io.BytesIO(_noise_jpeg((400, 300))))
    path = _sideways(upright, tmp_path / "phone.jpg", "JPEG", quality=90)
    seen = []
    small = open_rgb(path, draft=lambda size: seen.append(size) or (100, 75))
    assert seen == [(400, 300)] and small.size == (100, 75)  # 1/4 scale, upright
    assert open_rgb(path).size == (400, 300)
