"""Images in, results out, without torch: the CPU half of the validation preprocessing (open,
car-box cut, resize to the item size), car boxes, and the top-k result dicts of a prediction.

Both predictors use it: `ship.predict` (PyTorch) adds the device half (resample, normalize), the
ONNX graph of `ship.onnx` holds that half itself, so `ship.onnx_predict` needs NumPy and PIL only.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from twincar_fast.data.geometry import (
    PAD_MODE,
    InputGeometry,
    crop_region,
    resize_image,
    resize_short_crop,
)
from twincar_fast.data.images import image_size, open_region, upright
from twincar_fast.errors import TwincarError

__all__ = [
    "BACKENDS",
    "ImageInput",
    "ItemPrep",
    "PredictMixin",
    "items_ahead",
    "as_box",
    "as_list",
    "box_problem",
    "box_shape_problem",
    "box_warning",
    "check_boxes",
    "results",
]

ImageInput = str | os.PathLike | Image.Image
BACKENDS = ("torch", "onnx", "onnx-int8")  # `Predictor.from_path(..., backend=)`


@dataclass
class ItemPrep:
    """The validation transform of a trained model up to the uint8 item (see `Preprocess`)."""

    item_size: int  # side of the validation item (the model's img_size unless batch-stage aug)
    img_size: int  # side of the crop the model sees
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    resize: str = "crop"  # crop: centre square; squish: whole image; pad: pad to a square;
    # short: shorter side to item_size, then the centre img_size square (torchvision's way)
    pad_mode: str = PAD_MODE  # padding of `pad` (fastai PadMode: zeros, border, reflection)
    draft: bool = True  # JPEG draft decoding at a reduced scale still ≥ item_size
    bbox_crop: bool = False  # the model was trained on car-box crops: give each image its box
    bbox_margin: float = 0.0  # ... grown by this share of the box on each side

    def open(self, image: ImageInput, box=None) -> Image.Image:
        """An RGB PIL image from a path (checked, draft-decoded) or an image object, cut to
        `box` (x1, y1, x2, y2; 1-based inclusive) grown by the margin when `bbox_crop`."""
        box = box if self.bbox_crop else None
        if isinstance(image, Image.Image):
            image = upright(image).convert("RGB")
            if box is None:
                return image
            _require_box(box, image.size, "the image")
            return image.crop(tuple(int(v) for v in self.geometry.crop(image.size, box)))
        path = Path(image)
        if not path.is_file():
            raise TwincarError(f"image not found: {path} (check the path)")
        if box is not None:
            _require_box(box, image_size(path), str(path))
        min_side = self.item_size if self.draft else None
        return open_region(path, box, self.bbox_margin, min_side)

    def item_array(self, image: ImageInput, box=None) -> np.ndarray:
        """One presized uint8 HWC array, as fastai's validation `Resize(item_size)` makes it."""
        img = self.open(image, box)
        if self.resize == "short":
            img = resize_short_crop(img, self.item_size, self.img_size)
        else:
            img = resize_image(img, self.item_size, self.resize, self.pad_mode)
        return np.asarray(img)

    @property
    def input_size(self) -> int:
        """Side of the items this transform gives (the ONNX graph's input side)."""
        return self.img_size if self.resize == "short" else self.item_size

    @property
    def geometry(self) -> InputGeometry:
        """Where boxes of an original image land in this model input."""
        return InputGeometry(
            self.item_size,
            self.img_size,
            self.resize,
            self.bbox_crop,
            self.bbox_margin,
            self.pad_mode,
        )


def _require_box(box, size: tuple[int, int], where: str) -> None:
    """A one-line error when `box` can't be cut from the image (a bad box is never the whole)."""
    problem = box_problem(box, size)
    if problem is not None:
        raise TwincarError(f"{where}: {problem}")


def box_warning(missing: int, n: int) -> str:
    """The one warning line for images fed whole to a model trained on car-box crops."""
    return (
        f"this model was trained on car-box crops (bbox_crop) but {missing} of {n} image(s) "
        "have no box and are fed whole, which lowers accuracy; give boxes "
        "(--boxes boxes.csv or --data DIR; in Python `boxes=`)"
    )


def box_shape_problem(box: tuple[float, ...]) -> str | None:
    """Why 4 finite coordinates are no car box (inverted or empty), or None."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return (
            f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) is empty or inverted: "
            "need x1 < x2 and y1 < y2 (1-based inclusive pixels)"
        )
    return None


def box_problem(box: tuple[float, ...], size: tuple[int, int]) -> str | None:
    """Why a box can't be cut from an image of `size` (w, h): inverted, empty or outside it."""
    problem = box_shape_problem(box)
    if problem is None and crop_region(box, 0.0, size) is None:
        x1, y1, x2, y2 = box
        problem = f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {size[0]}×{size[1]} image"
    return problem


def as_box(box) -> tuple[float, float, float, float] | None:
    """A box as 4 finite floats with x1 < x2, y1 < y2, or None (missing: None or all NaN); a
    one-line error for anything else (a wrong box must not quietly become the whole image)."""
    if box is None:
        return None
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise TwincarError(f"box {box!r}: give 4 numbers x1, y1, x2, y2") from None
    if len(values) != 4:
        raise TwincarError(f"box {box!r}: give 4 numbers x1, y1, x2, y2")
    if all(math.isnan(v) for v in values):
        return None
    if not all(math.isfinite(v) for v in values):
        raise TwincarError(f"box {box!r}: coordinates must be finite numbers (or all NaN: no box)")
    problem = box_shape_problem(values)
    if problem is not None:
        raise TwincarError(problem)
    return values


def as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them, as a list."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def check_boxes(n: int, boxes: Sequence | None, bbox_crop: bool) -> list:
    """One box (or None) per image; a warning when a box-trained model gets none, a one-line
    error on a count mismatch."""
    boxes = [None] * n if boxes is None else [as_box(b) for b in boxes]
    if len(boxes) != n:
        raise TwincarError(f"boxes: {len(boxes)} boxes for {n} images; give one per image")
    missing = sum(b is None for b in boxes)
    if bbox_crop and missing:
        # stacklevel 3: the user's predict/predict_proba call
        warnings.warn(box_warning(missing, n), UserWarning, stacklevel=3)
    return boxes


def results(
    probs: np.ndarray, classes: Sequence[str], top_k: int, boxes: list, bbox_crop: bool
) -> list[dict]:
    """Per image: `label`, `class_id`, `prob` of the top class, the `topk` list of dicts and the
    `box` it was cut to (None: the whole image)."""
    k = max(1, min(top_k, len(classes)))
    out = []
    for p, box in zip(probs, boxes, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        topk = [{"label": classes[c], "class_id": int(c), "prob": float(p[c])} for c in order]
        out.append({**topk[0], "topk": topk, "box": box if bbox_crop else None})
    return out


def items_ahead(
    fn: Callable, images: Sequence, boxes: Sequence, batch_size: int, num_threads: int
) -> Iterator[list]:
    """`fn(image, box)` of every image, a list per batch; while the caller works on one batch,
    threads already make the next (PIL, torch and onnxruntime release the GIL, so decoding hides
    behind the model's forward pass instead of adding to it)."""
    slices = [slice(i, i + batch_size) for i in range(0, len(images), batch_size)]
    if num_threads < 2 or len(images) < 2:
        for sl in slices:
            yield [fn(im, b) for im, b in zip(images[sl], boxes[sl], strict=True)]
        return
    pool = ThreadPoolExecutor(min(num_threads, len(images)))

    def submit(sl: slice) -> list[Future]:
        return [pool.submit(fn, im, b) for im, b in zip(images[sl], boxes[sl], strict=True)]

    try:
        ahead = submit(slices[0])
        for nxt in [*slices[1:], None]:
            current, ahead = ahead, submit(nxt) if nxt else []
            yield [f.result() for f in current]
    finally:  # also when the caller stops early or an image fails: no work left running
        pool.shutdown(wait=True, cancel_futures=True)


class PredictMixin:
    """`predict_proba`, `predict` and `predict_batches` of a predictor with `classes`,
    `preprocess`, `batch_size`, `num_threads`, and its own `_item` and `_batch_proba`."""

    classes: list[str]
    preprocess: ItemPrep
    batch_size: int
    num_threads: int

    def _item(self, image: ImageInput, box=None):
        """The CPU half of one image's preprocessing (each predictor's own)."""
        raise NotImplementedError

    def _batch_proba(self, items: list, tta: bool) -> np.ndarray:
        """Probabilities of one batch of `_item`s (each predictor's own)."""
        raise NotImplementedError

    def _iter_proba(self, images: list, boxes: list, tta: bool) -> Iterator[np.ndarray]:
        """Probabilities of checked inputs, batch by batch, the next batch made meanwhile."""
        batches = items_ahead(self._item, images, boxes, self.batch_size, self.num_threads)
        for items in batches:
            yield self._batch_proba(items, tta)

    def _proba(self, images: list, boxes: list, tta: bool) -> np.ndarray:
        """Probabilities of checked inputs, shape (n_images, n_classes)."""
        out = list(self._iter_proba(images, boxes, tta))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(
        self,
        images: ImageInput | Sequence[ImageInput],
        boxes: Sequence | None = None,
        tta: bool = False,
    ) -> np.ndarray:
        """Class probabilities, shape (n_images, n_classes), in the model's class order.

        Args:
            images: image files or PIL images.
            boxes: per image the car box (x1, y1, x2, y2; 1-based inclusive pixels, as in
                annotations.csv) or None; used when the model was trained with `bbox_crop`.
            tta: average the probabilities with those of the horizontally flipped image.
        """
        images = as_list(images)
        return self._proba(images, check_boxes(len(images), boxes, self.preprocess.bbox_crop), tta)

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        top_k: int = 3,
        boxes: Sequence | None = None,
        tta: bool = False,
    ) -> list[dict]:
        """Per image: `label`, `class_id`, `prob` of the top class, the `topk` list of dicts and
        the `box` it was cut to (None: the whole image); `boxes`, `tta` as in `predict_proba`."""
        images = as_list(images)
        boxes = check_boxes(len(images), boxes, self.preprocess.bbox_crop)
        probs = self._proba(images, boxes, tta)
        return results(probs, self.classes, top_k, boxes, self.preprocess.bbox_crop)

    def predict_batches(
        self,
        images: ImageInput | Sequence[ImageInput],
        top_k: int = 3,
        boxes: Sequence | None = None,
        tta: bool = False,
    ) -> Iterator[list[dict]]:
        """`predict`'s results a batch at a time (for a progress bar over many images), the next
        batch decoded while this one runs."""
        images = as_list(images)
        boxes = check_boxes(len(images), boxes, self.preprocess.bbox_crop)
        bs, crop = self.batch_size, self.preprocess.bbox_crop
        for i, probs in enumerate(self._iter_proba(images, boxes, tta)):
            yield results(probs, self.classes, top_k, boxes[i * bs : (i + 1) * bs], crop)
