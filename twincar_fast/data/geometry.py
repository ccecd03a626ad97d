"""Where a box of the original image lands in the model input: the validation path's geometry.

The validation input of an image is: the car-box crop grown by `bbox_margin` (`crop_region`, when
`bbox_crop`), fastai's `Resize` to the item size (centre square crop, squish or pad:
`resize_window`), then a plain resample to `img_size`. The loader (`open_region`), the Predictor
(`ship.predict`) and the Grad-CAM++ part-box check (`InputGeometry.box`) all use these two
functions, so a box drawn on the model input sits where the pixels went. `valid_input` is the one
reader of a built validation pipeline (the Predictor, the export and the part-box check use it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from twincar_fast.config import ExperimentConfig
from twincar_fast.errors import TwincarError

__all__ = [
    "PAD_MODE",
    "InputGeometry",
    "aug_on_items",
    "crop_region",
    "presize",
    "resize_image",
    "resize_short_crop",
    "resize_window",
    "valid_input",
]

Box = tuple[float, float, float, float]
# fastai's PadMode → torchvision's padding_mode
_PAD_MODES = {"zeros": "constant", "border": "edge", "reflection": "reflect"}
# the padding of the loaders' validation Resize (fastai's own default is reflection), and so the
# one fallback of every reader: the Predictor, the export, the model card
PAD_MODE = "zeros"


def aug_on_items(cfg: ExperimentConfig) -> bool:
    """Whether training items are augmented in the CPU workers (`aug.stage: item`)."""
    return cfg.aug.enabled and cfg.aug.stage == "item"


def presize(cfg: ExperimentConfig) -> int:
    """Side of the validation items: img_size with item-stage augmentation, else item_size."""
    return cfg.data.img_size if aug_on_items(cfg) else cfg.data.item_size


def crop_region(box, margin: float, size: tuple[int, int]) -> Box | None:
    """The 0-based crop (l, t, r, b) of a 1-based inclusive box grown by `margin`; None = all."""
    if box is None or any(v is None or not math.isfinite(v) for v in box):
        return None
    x1, y1, x2, y2 = box
    left, top, right, bottom = x1 - 1, y1 - 1, x2, y2
    mx, my = margin * (right - left), margin * (bottom - top)
    w, h = size
    left, top = max(0.0, left - mx), max(0.0, top - my)
    right, bottom = min(float(w), right + mx), min(float(h), bottom + my)
    if right - left < 1 or bottom - top < 1:
        return None  # a box outside the image: use the whole image rather than fail
    return left, top, right, bottom


def resize_window(w: int, h: int, size: int, method: str) -> tuple[int, int, int, int]:
    """The window (left, top, width, height) of a w×h image that fastai's validation `Resize`
    scales to size×size: the whole image (squish), a centred square (crop) or a padded one (pad).

    Same float arithmetic as fastai's `Resize.encodes`, so the window matches to the pixel; in
    pad mode left/top are negative (the padding).
    """
    if method == "squish":
        return 0, 0, w, h
    ratios = (w / size, h / size)
    m = max(ratios) if method == "pad" else min(ratios)
    side = int(m * size)
    return int(0.5 * (w - side)), int(0.5 * (h - side)), side, side


def resize_image(img: Image.Image, size: int, method: str, pad_mode: str = PAD_MODE) -> Image.Image:
    """fastai's validation `Resize(size, method, pad_mode)` of a PIL image: centred, bilinear."""
    w, h = img.size
    if method == "squish":
        return img.resize((size, size), Image.BILINEAR)
    left, top, side, _ = resize_window(w, h, size, method)
    img = img.crop((max(left, 0), max(top, 0), min(left + side, w), min(top + side, h)))
    pads = [max(-left, 0), max(-top, 0), max(left + side - w, 0), max(top + side - h, 0)]
    if any(pads):
        from torchvision.transforms.functional import pad  # what fastai pads PIL images with

        img = pad(img, pads, padding_mode=_PAD_MODES[pad_mode])
    return img.resize((size, size), Image.BILINEAR)


def resize_short_crop(img: Image.Image, short: int, crop: int) -> Image.Image:
    """torchvision's `Resize(short)` then `CenterCrop(crop)` of a PIL image, to the pixel."""
    w, h = img.size
    # torchvision's sizes: the shorter side becomes `short`, the longer one truncated
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


@dataclass(frozen=True)
class InputGeometry:
    """The validation geometry of a model's input: car-box crop, resize, resample."""

    item_size: int  # side after fastai's Resize
    img_size: int  # side of the model input
    resize: str = "crop"  # crop, squish or pad
    bbox_crop: bool = False  # images are cut to their car box first
    bbox_margin: float = 0.0  # ... grown by this share of the box on each side
    pad_mode: str = PAD_MODE  # what `pad` fills with (fastai's PadMode: zeros, border, reflection)

    def crop(self, size: tuple[int, int], car_box=None) -> Box:
        """The region (l, t, r, b) of a W×H image that the model input is made of."""
        region = crop_region(car_box, self.bbox_margin, size) if self.bbox_crop else None
        # whole pixels: `open_region` cuts at floor/ceil of the region
        if region is None:
            return 0.0, 0.0, float(size[0]), float(size[1])
        left, top, right, bottom = region
        return math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)

    def box(self, size: tuple[int, int], box, car_box=None) -> Box:
        """Where `box` (x1, y1, x2, y2; 1-based inclusive) of a W×H image lands in the model
        input, as continuous 0-based pixel edges (l, t, r, b), clipped to the input."""
        cl, ct, cr, cb = self.crop(size, car_box)
        wl, wt, ww, wh = resize_window(round(cr - cl), round(cb - ct), self.item_size, self.resize)
        sx, sy = self.img_size / ww, self.img_size / wh
        x1, y1, x2, y2 = box
        edges = ((x1 - 1 - cl - wl) * sx, (y1 - 1 - ct - wt) * sy, (x2 - cl - wl) * sx)
        out = (*edges, (y2 - ct - wt) * sy)
        return tuple(float(np.clip(v, 0, self.img_size)) for v in out)  # type: ignore[return-value]

    def mask(self, size: tuple[int, int], box, car_box=None) -> np.ndarray:
        """The (img_size, img_size) bool mask of the input pixels whose centres lie in `box`."""
        left, top, right, bottom = self.box(size, box, car_box)
        centres = np.arange(self.img_size) + 0.5
        cols = (centres >= left) & (centres <= right)
        rows = (centres >= top) & (centres <= bottom)
        return rows[:, None] & cols[None, :]

    def view(self, img: Image.Image, car_box=None) -> Image.Image:
        """What the model sees of an RGB image (before normalization): cut, resized, resampled."""
        cut = img.crop(tuple(int(v) for v in self.crop(img.size, car_box)))
        return resize_image(cut, self.img_size, self.resize, self.pad_mode)

    @classmethod
    def from_config(cls, cfg) -> InputGeometry:
        """The validation geometry an `ExperimentConfig` trains with."""
        d = cfg.data
        return cls(presize(cfg), d.img_size, d.resize, d.bbox_crop, d.bbox_margin)

    @classmethod
    def from_dls(cls, dls) -> InputGeometry:
        """The validation geometry of a fastai DataLoaders built by `build_dls`."""
        spec = valid_input(dls)
        return cls(**{f: spec[f] for f in cls.__dataclass_fields__})


def valid_input(dls) -> dict:
    """What the validation loader of `dls` (built by `build_dls`) makes of an image: the
    `InputGeometry` fields, draft decoding, and the normalization mean and std.

    The one reader of a built pipeline: the Predictor, the export and the part-box check take its
    facts from here. Without a Normalize (not built by `build_dls`) the stats are ImageNet's.
    """
    import torch
    from fastai.data.transforms import Normalize
    from fastai.vision.augment import AffineCoordTfm, RandomResizedCropGPU, Resize
    from fastai.vision.core import imagenet_stats

    dl = dls.valid
    resize = next((t for t in dl.after_item.fs if isinstance(t, Resize)), None)
    if resize is None:
        raise TwincarError("the validation loader has no Resize; build the loaders with build_dls")
    crops = (RandomResizedCropGPU, AffineCoordTfm)
    sizes = [t.size for t in dl.after_batch.fs if isinstance(t, crops) and t.size is not None]
    norm = next((t for t in dl.after_batch.fs if isinstance(t, Normalize)), None)
    mean, std = (norm.mean, norm.std) if norm is not None else imagenet_stats
    tfms = [t for p in dl.dataset.tfms for t in p.fs]
    # the loaders' ImageLoader, known by what it holds (it is built on this module)
    loader = next((t for t in tfms if hasattr(t, "bbox_crop") and hasattr(t, "item_size")), None)
    return {
        "item_size": int(resize.size[0]),
        "img_size": int(sizes[-1][0]) if sizes else int(resize.size[0]),  # item stage: sized
        "resize": str(resize.method),
        "pad_mode": str(resize.pad_mode or PAD_MODE),
        "bbox_crop": bool(loader.bbox_crop) if loader is not None else False,
        "bbox_margin": float(loader.bbox_margin) if loader is not None else 0.0,
        "draft": bool(loader.draft) if loader is not None else False,
        "mean": torch.as_tensor(mean).flatten().tolist(),
        "std": torch.as_tensor(std).flatten().tolist(),
    }
