"""Safe image opening: any file PIL reads becomes RGB, upright (its EXIF orientation applied, as
a photo viewer shows it), cut to a region, draft-decoded; unusable files get a one-line reason.

Every image of training, prediction and the app is opened here, so all of them see the same upright
pixels, and car boxes are in the upright image's pixels."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from twincar_fast.data.geometry import crop_region
from twincar_fast.errors import DataError

__all__ = ["image_problem", "image_size", "open_region", "open_rgb", "upright"]

_JPEG_FORMATS = ("JPEG", "MPO")
_WHITE = (255, 255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag; 1 = upright, 2-8 = mirrored and/or turned
_TURNED = (5, 6, 7, 8)  # orientations that swap width and height


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation of an open image (1 when absent or unreadable)."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: show the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """`img` turned as its EXIF orientation says (phone photos stored sideways); else itself."""
    if _orientation(img) == 1:
        return img  # no copy: most images are stored upright
    return ImageOps.exif_transpose(img)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(w, h) of the upright image at `path` (what `open_rgb` returns), from its header only.

    Raises:
        DataError: the file is missing or not an image; the message names it.
    """
    try:
        with Image.open(path) as img:
            return img.size[::-1] if _orientation(img) in _TURNED else img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"can't read image {path}: {_one_line(e)}; replace or remove the file"
        ) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image from `img`: alpha composited on white, 16-bit scaled, CMYK converted."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # PIL's own I→L conversion clips at 255 instead of scaling; 16-bit data would go white.
        arr = np.asarray(img).astype(np.float32) / 257.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        background = Image.new("RGBA", img.size, _WHITE)
        background.alpha_composite(img.convert("RGBA"))
        return background.convert("RGB")
    return img.convert("RGB")  # a copy even for RGB, so closing the file can't empty it


Draft = tuple[int, int] | Callable[[tuple[int, int]], tuple[int, int] | None] | None


def open_rgb(path: str | os.PathLike, draft: Draft = None) -> Image.Image:
    """Open any image PIL reads as upright RGB; `draft=(w, h)` decodes JPEGs at a reduced scale
    ≥ (w, h) (sizes of the upright image).

    `draft` may also be a function of the upright image's full (w, h), read from the header of
    the same open, returning (w, h) or None (full scale).

    Raises:
        DataError: the file is missing, empty, truncated or not an image; the message names it.
    """
    try:
        with Image.open(path) as img:
            turned = _orientation(img) in _TURNED
            if callable(draft):
                draft = draft(img.size[::-1] if turned else img.size)
            if draft is not None and img.format in _JPEG_FORMATS:
                w, h = draft[::-1] if turned else draft  # the stored (sideways) image's sides
                img.draft("RGB", (max(1, w), max(1, h)))
            img.load()
            return _to_rgb(upright(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"can't read image {path}: {_one_line(e)}; replace or remove the file"
        ) from None


def open_region(
    path: str | os.PathLike, box=None, margin: float = 0.0, min_side: int | None = None
) -> Image.Image:
    """The RGB image at `path`, cropped to `box` grown by `margin`, decoded at a reduced scale.

    Args:
        box: (x1, y1, x2, y2), 1-based inclusive pixels of the original image (NaN/None = whole).
        min_side: JPEGs are decoded with PIL's draft mode at the smallest scale (1/2, 1/4, 1/8)
            that still leaves the region's shorter side ≥ `min_side`; None decodes in full.
    """
    if box is None and min_side is None:
        return open_rgb(path)
    full: list[tuple[int, int]] = []

    def draft(size: tuple[int, int]) -> tuple[int, int] | None:
        """The draft size that keeps the region's shorter side ≥ min_side (None: full scale)."""
        full.append(size)
        left, top, right, bottom = crop_region(box, margin, size) or (0, 0, *size)
        scale = min_side / min(right - left, bottom - top) if min_side else 1.0
        return (math.ceil(size[0] * scale), math.ceil(size[1] * scale)) if scale < 1 else None

    im = open_rgb(path, draft=draft)  # one open: the header's size sets the draft scale
    region = crop_region(box, margin, full[0])
    if region is None:
        return im
    left, top, right, bottom = region
    sx, sy = im.width / full[0][0], im.height / full[0][1]  # the draft scale actually used
    crop = (
        math.floor(left * sx),
        math.floor(top * sy),
        math.ceil(right * sx),
        math.ceil(bottom * sy),
    )
    return im.crop(crop)


def image_problem(path: str | os.PathLike) -> str | None:
    """Why the image at `path` can't be used (missing, empty, truncated, not an image), or None."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            if img.format in _JPEG_FORMATS:
                # Decoding at 1/8 scale still reads every byte of entropy data, so truncation
                # fails here just as in a full decode, at a fraction of the cost.
                img.draft(img.mode, (1, 1))
            else:
                img.verify()  # checksums (PNG CRCs); the image must be reopened to decode it
                img = Image.open(path)
            with img:
                img.load()
                if img.width < 1 or img.height < 1:
                    return "image has no pixels"
    except FileNotFoundError:
        return "file not found"
    except Image.UnidentifiedImageError:
        return "not an image (PIL can't identify the format)"
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
        return f"can't decode: {_one_line(e) or type(e).__name__}"
    return None


def _one_line(e: BaseException) -> str:
    """The exception message on one line."""
    return " ".join(str(e).split())
