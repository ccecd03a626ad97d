"""Training augmentation in the DataLoader workers (`aug.stage: item`, the default).

fastai's batch transforms resample float tensors with `grid_sample` in the main process: on a CPU
they cost more than the whole per-item PIL pipeline they replace, and even with an H100 their
kernel launches and Python took 29 ms of the main process per batch, against 0.9 ms here (see the
README's Performance section). Here each training image gets the same kinds of change on uint8
pixels in the workers, in three OpenCV calls: one perspective warp (random resized crop, zoom,
rotation, flip and perspective warp folded into one 3×3 matrix, straight to `img_size`), one
colour matrix (brightness, contrast, saturation and hue, as torchvision's ColorJitter defines
them, folded into one 3×4 affine map) and, with probability `blur_p`, a Gaussian blur.
Validation items get fastai's `Resize` straight to `img_size` (centre crop, squish or pad), one
resample instead of presizing to `item_size` and resampling again on the device.
"""

from __future__ import annotations

import math
import random

import cv2
import numpy as np
import torch
from fastai.torch_core import TensorImage
from fastai.vision.augment import RandTransform, Resize
from fastai.vision.core import PILImage

from twincar_fast.config import AugConfig

__all__ = ["RGB2YIQ", "CpuAugment", "ValidResize", "colour_matrix", "warp_matrix"]

_GRAY = np.array([0.299, 0.587, 0.114])  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
# RGB → YIQ: a hue shift is a rotation of the (I, Q) chroma plane (also the batch stage's RandomHue, in batch_tfms)
RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(RGB2YIQ)
_CORNERS = np.float32([[-1, -1], [-1, 1], [1, -1], [1, 1]])

# OpenCV's thread pool, once started, deadlocks DataLoader workers forked after it; and its threads
# would only fight the workers for the cores. One thread, set before any OpenCV call.
cv2.setNumThreads(1)


def _corner_warp(mx: float, my: float) -> np.ndarray:
    """fastai's `Warp` as a 3×3 homography of normalized coordinates (corners moved by mx, my)."""
    target = np.float32(
        [[-1 - my, -1 - mx], [-1 + my, 1 + mx], [1 + my, -1 + mx], [1 - my, 1 - mx]]
    )
    return cv2.getPerspectiveTransform(_CORNERS, target).astype(np.float64)


def warp_matrix(
    width: int,
    height: int,
    size: int,
    box: tuple[float, float, float, float],
    angle: float = 0.0,
    flip: bool = False,
    warp: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """The 3×3 map from output pixels (size × size) to source pixels of a `width`×`height` image.

    `box` = (centre x, centre y, width, height) of the crop in source pixels; `angle` in degrees
    turns the crop about its centre; `flip` mirrors it left-right; `warp` = fastai's (x, y) warp.
    """
    cx, cy, cw, ch = box
    to_unit = np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])
    mirror = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    a = math.radians(angle)
    place = np.array(
        [
            [math.cos(a) * cw / 2, -math.sin(a) * ch / 2, cx - 0.5],
            [math.sin(a) * cw / 2, math.cos(a) * ch / 2, cy - 0.5],
            [0, 0, 1],
        ]
    )
    persp = _corner_warp(*warp) if any(warp) else np.eye(3)
    return place @ persp @ mirror @ to_unit


def colour_matrix(
    mean_gray: float,
    brightness: float = 1.0,
    contrast: float = 1.0,
    saturation: float = 1.0,
    hue: float = 0.0,
) -> np.ndarray:
    """ColorJitter's brightness, contrast, saturation and hue (share of a turn) as one 3×4 map.

    Each step is linear in RGB, so out = M @ rgb + offset; contrast blends with the mean gray of
    the brightened image (`brightness` × `mean_gray`, in the pixels' own 0-255 scale).
    """
    sat = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), _GRAY)
    t = 2 * math.pi * hue
    rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    m = contrast * brightness * (_YIQ2RGB @ rot @ RGB2YIQ @ sat)
    offset = np.full((3, 1), (1 - contrast) * brightness * mean_gray)
    return np.concatenate([m, offset], axis=1)


class CpuAugment(RandTransform):
    """fastai's `aug_transforms` + TwinCar's colour and blur extras, per training item, to `size`.

    Draws as fastai does (each affine change with `p_affine`, each colour change with
    `p_lighting`, a flip half the time) and returns a uint8 `TensorImage` (3 × size × size).
    """

    split_idx = 0  # training items only
    order = 1  # with fastai's Resize, right after the image is opened

    def __init__(self, size: int, aug: AugConfig, resize: str = "crop"):
        super().__init__(p=1.0)
        self.size, self.aug, self.resize = size, aug, resize

    def _crop(self, width: int, height: int, rng=random) -> tuple[float, float, float, float]:
        """fastai's square random resized crop (area ≥ min_scale) of the presized square, zoomed.

        The square is the one `data.resize` presizes to: a min-side square anywhere in the image
        (crop), the whole image squashed (squish) or the image padded to a max-side square (pad).
        """
        a = self.aug
        side = math.sqrt(rng.uniform(min(a.min_scale, 1.0), 1.0))
        if a.max_zoom > 1 and rng.random() < a.p_affine:
            side /= rng.uniform(1.0, a.max_zoom)
        if self.resize == "squish":
            cw, ch = side * width, side * height
            return (
                rng.uniform(cw / 2, width - cw / 2),
                rng.uniform(ch / 2, height - ch / 2),
                cw,
                ch,
            )
        base = max(width, height) if self.resize == "pad" else min(width, height)
        cw = ch = side * base
        lo_x, hi_x = cw / 2 + min(0, width - base) / 2, width - cw / 2 - min(0, width - base) / 2
        lo_y, hi_y = ch / 2 + min(0, height - base) / 2, height - ch / 2 - min(0, height - base) / 2
        return rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), cw, ch

    def draw_geometry(self, width: int, height: int, rng=random) -> dict:
        """One draw of the geometric changes: crop box (cx, cy, w, h), angle, flip and warp.

        `rng` draws them (the `random` module, or a `random.Random` of a batch loader).
        """
        a = self.aug
        box = self._crop(width, height, rng)
        rotate = a.max_rotate and rng.random() < a.p_affine
        angle = rng.uniform(-a.max_rotate, a.max_rotate) if rotate else 0.0
        warp = (0.0, 0.0)
        if a.max_warp and rng.random() < a.p_affine:
            warp = (rng.uniform(-a.max_warp, a.max_warp), rng.uniform(-a.max_warp, a.max_warp))
        flip = bool(a.flip and rng.random() < 0.5)
        return {"box": box, "angle": angle, "flip": flip, "warp": warp}

    def geometry(self, img: np.ndarray, rng=random) -> np.ndarray:
        """Crop, zoom, rotate, flip and warp an HWC uint8 image to size × size in one resample."""
        size = self.size
        g = self.draw_geometry(img.shape[1], img.shape[0], rng)
        cx, cy, cw, ch = g["box"]
        shrink = math.floor(min(cw, ch) / size)
        if shrink >= 2:  # area-average first, like fastai's _grid_sample, so bilinear can't alias
            img = cv2.resize(img, None, fx=1 / shrink, fy=1 / shrink, interpolation=cv2.INTER_AREA)
            cx, cy, cw, ch = cx / shrink, cy / shrink, cw / shrink, ch / shrink
        h, w = img.shape[:2]
        m = warp_matrix(w, h, size, (cx, cy, cw, ch), g["angle"], g["flip"], g["warp"])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        border = cv2.BORDER_CONSTANT if self.resize == "pad" else cv2.BORDER_REFLECT_101
        return cv2.warpPerspective(img, m, (size, size), flags=flags, borderMode=border)

    def draw_colour(self, rng=random) -> tuple[float, float, float, float]:
        """One draw of the brightness, contrast, saturation and hue changes (0: unchanged)."""
        a = self.aug

        def draw(strength: float) -> float:
            on = strength and rng.random() < a.p_lighting
            return rng.uniform(-strength, strength) if on else 0.0

        return draw(a.max_lighting), draw(a.max_lighting), draw(a.saturation), draw(a.hue)

    def draw_blur(self, rng=random) -> float:
        """One draw of the blur: sigma uniform in [0.1, blur_sigma] with `blur_p`, else 0."""
        a = self.aug
        if not (a.blur_p and a.blur_sigma) or rng.random() >= a.blur_p:
            return 0.0
        return rng.uniform(min(0.1, a.blur_sigma), a.blur_sigma)

    def colour(self, img: np.ndarray, rng=random) -> np.ndarray:
        """Random brightness, contrast, saturation and hue in one saturating 3×4 colour map."""
        b, c, s, h = self.draw_colour(rng)
        if not (b or c or s or h):
            return img
        mean_gray = float(np.dot(cv2.mean(img)[:3], _GRAY))
        m = colour_matrix(mean_gray, 1 + b, 1 + c, 1 + s, h)
        return cv2.transform(img, m.astype(np.float32))

    def blur(self, img: np.ndarray, rng=random) -> np.ndarray:
        """A Gaussian blur with probability `blur_p`, sigma uniform in [0.1, blur_sigma]."""
        sigma = self.draw_blur(rng)
        if not sigma:
            return img
        return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)

    def augment(self, img: np.ndarray, rng=random) -> np.ndarray:
        """Geometry, colour and blur of an HWC uint8 image: size × size × 3 uint8."""
        return self.blur(self.colour(self.geometry(img, rng), rng), rng)

    def encodes(self, x: PILImage) -> TensorImage:
        img = self.augment(np.asarray(x))
        # CHW in memory too: stacking 32 such items measured 15× faster than strided views
        return TensorImage(torch.from_numpy(img.transpose(2, 0, 1).copy()))


class ValidResize(Resize):
    """fastai's `Resize`, for validation items only (training items get `CpuAugment`)."""

    split_idx = 1
