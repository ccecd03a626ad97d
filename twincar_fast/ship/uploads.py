"""What the app takes in: uploads checked from their header before any decoding (pixel bound,
empty, not an image, broken), the Gradio size string, and the run's test images cut to their
car boxes as `twincar predict --data` cuts them (the app's examples).

No Gradio here: `ship.app` turns each problem sentence into the page's one-line message.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

from PIL import Image

from twincar_fast.data.images import image_problem
from twincar_fast.errors import TwincarError
from twincar_fast.ship.inputs import ImageInput, as_box

__all__ = [
    "MAX_FILE_SIZE",
    "MAX_PIXELS",
    "check_file_size",
    "check_max_pixels",
    "example_crops",
    "open_upload",
    "upload_problem",
]

MAX_FILE_SIZE = "10mb"
MAX_PIXELS = 40_000_000  # a 40-megapixel photo decodes to 120 MB of RGB, in about a second
_SIZE = re.compile(r"^\s*\d+\s*(b|kb|mb|gb|tb)\s*$", re.IGNORECASE)


def check_file_size(size: str) -> str:
    """`--max-file-size` as Gradio reads it (a whole number and a unit), or a one-line error."""
    if not isinstance(size, str) or not _SIZE.match(size):
        raise TwincarError(
            f"--max-file-size {size!r}: give a whole number and a unit, e.g. 10mb, 500kb, 1gb"
        )
    return size.replace(" ", "")


def check_max_pixels(max_pixels: int) -> int:
    """`--max-pixels` as a positive count, or a one-line error."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise TwincarError(
            f"--max-pixels {max_pixels!r}: give the largest width × height an upload may "
            f"decode to, a whole number ≥ 1 (default {MAX_PIXELS})"
        )
    return max_pixels


def _header_size(source: str | bytes) -> tuple[int, int] | str:
    """(width, height) read from the file's header alone, or why it can't be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # bounded below
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                return img.size
    except Image.DecompressionBombError:
        return "far too many pixels (PIL refuses it as a decompression bomb)"
    except Image.UnidentifiedImageError:
        return "not an image (PIL can't identify the format)"
    except Exception as e:  # noqa: BLE001 - any header failure: the file is unusable
        return f"can't read it: {' '.join(str(e).split()) or type(e).__name__}"


def upload_problem(source: str | bytes, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an upload (a file path or its bytes) can't be used, or None; its pixels are counted
    from the header before anything is decoded, so a tiny file of huge size costs nothing."""
    n_bytes = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if n_bytes == 0:
        return "empty file (0 bytes)"
    size = _header_size(source)
    if isinstance(size, str):
        return size
    if size[0] * size[1] > max_pixels:
        return (
            f"{size[0]}×{size[1]} px is {size[0] * size[1] / 1e6:.0f} megapixels, over this "
            f"app's limit of {max_pixels / 1e6:g}; scale the photo down"
        )
    if isinstance(source, bytes):
        try:
            with Image.open(io.BytesIO(source)) as img:
                img.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
            return f"can't decode: {' '.join(str(e).split()) or type(e).__name__}"
        return None
    return image_problem(Path(source))


def open_upload(source: str | bytes, max_pixels: int = MAX_PIXELS) -> ImageInput:
    """A checked upload for the predictor: the file's path (opened as `predict` opens files) or,
    for bytes, the decoded RGB image; TwincarError with the reason otherwise."""
    problem = upload_problem(source, max_pixels)
    if problem is not None:
        raise TwincarError(problem)
    if isinstance(source, bytes):
        with Image.open(io.BytesIO(source)) as img:
            return img.convert("RGB")
    return str(source)


def example_crops(
    predictor, annotations, out_dir: str | os.PathLike, n: int = 4
) -> list[tuple[str, str, str]]:
    """(PNG, caption, source image) of up to `n` test images (one per class first), each cut as `predict
    --data` cuts it for this model: its car box grown by the margin for box-trained models."""
    test = annotations[annotations["split"] == "test"]
    picks = test.drop_duplicates("class_id").head(n)
    out, cols = [], ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    for row in picks.to_dict("records"):
        path = Path(row["path"])
        if not path.is_file():
            continue
        box = as_box([row[c] for c in cols]) if all(c in row for c in cols) else None
        crop = predictor.preprocess.open(str(path), box)  # the pixels predict decodes
        target = Path(out_dir) / f"{len(out):02d}_{path.stem}.png"
        crop.save(target, format="PNG")  # lossless: fed whole, the same item as predict's
        cut = box is not None and predictor.preprocess.bbox_crop
        out.append((str(target), f"{path.name}{' (car box)' if cut else ''}", str(path)))
    return out
