"""Training augmentation of a whole batch at once on the training device (the GPU's path).

The same draws as `CpuAugment` (its `draw_geometry`, `draw_colour`, `draw_blur`, one
`random.Random` per image), applied to a batch of cached uint8 images in a few batched ops: the
images are placed on one zero canvas (each in its top-left corner), one sampling grid per image
from the same 3×3 map `warp_matrix` gives OpenCV, one `grid_sample` for the batch, one colour
matrix per image in one `einsum`, and a separable Gaussian blur with a sigma per image. Borders
follow the CPU path: mirrored (BORDER_REFLECT_101) for crop and squish, black for pad; crops over
twice the output size are area-averaged first, as there. It differs from the CPU path by rounding
(one resample in float, rounded once at the end).

It runs where fastai runs batch transforms: after the loader has handed over a CPU batch and
`to_device` has moved it (`DeviceAugment`, the first step of `after_batch`). The loader's batch
holds the host canvas (or, for a cache already in GPU memory, each image's place in it) and a
`PendingAugment` with the draws; the gather from GPU memory and every pixel op happen after the
transfer, so the CPU and the GPU run the same code on different devices.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from fastai.torch_core import TensorImage
from fasttransform import ItemTransform

from twincar_fast.data.cpu_aug import CpuAugment, colour_matrix, warp_matrix

__all__ = ["BatchAugment", "DeviceAugment", "PendingAugment", "blur_batch", "gather_canvas"]

_GRAY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as the CPU path's colour map


class BatchAugment:
    """`CpuAugment`'s changes, drawn per image and applied to a batch on its device."""

    def __init__(self, item: CpuAugment):
        self.item = item

    def draw(self, sizes: Sequence[tuple[int, int]], seeds: Sequence[int]) -> dict:
        """Per image: the 3×3 output→source map, the area shrink before it (as the CPU path,
        for crops over twice the output), the size it applies to, colour map and blur sigma."""
        size, out = self.item.size, {"mats": [], "shrink": [], "sizes": [], "colours": []}
        blurs = []
        for (h, w), seed in zip(sizes, seeds, strict=True):
            rng = random.Random(seed)
            g = self.item.draw_geometry(w, h, rng)
            cx, cy, cw, ch = g["box"]
            k = max(1, math.floor(min(cw, ch) / size))
            if k >= 2:  # what CpuAugment.geometry does: area-average by k first
                w, h, cx, cy, cw, ch = round(w / k), round(h / k), cx / k, cy / k, cw / k, ch / k
            m = warp_matrix(w, h, size, (cx, cy, cw, ch), g["angle"], g["flip"], g["warp"])
            b, c, s, hue = self.item.draw_colour(rng)
            out["mats"].append(m)
            out["shrink"].append(k)
            out["sizes"].append((h, w))
            out["colours"].append(colour_matrix(1.0, 1 + b, 1 + c, 1 + s, hue))  # x mean gray
            blurs.append(self.item.draw_blur(rng))
        return {k: np.array(v) for k, v in out.items()} | {"blurs": np.array(blurs)}

    def __call__(self, canvas: torch.Tensor, draws: dict) -> torch.Tensor:
        """Augment `canvas` (B × 3 × H × W uint8, image i in its top-left corner) to uint8
        B × 3 × size × size on the canvas's device."""
        size, shrink = self.item.size, draws["shrink"]
        x = torch.empty((len(canvas), 3, size, size), device=canvas.device)
        for k in np.unique(shrink):  # one resample per shrink factor (almost always just 1)
            idx = np.flatnonzero(shrink == k)
            sub = canvas[torch.as_tensor(idx, device=canvas.device)].float()
            if k > 1:
                sub = F.avg_pool2d(sub, int(k), ceil_mode=True)
            x[idx] = self._warp(sub, draws["sizes"][idx], draws["mats"][idx])
        x = self._colour(x, draws["colours"]).clamp_(0, 255)  # saturates, as cv2.transform
        x = self._blur(x, draws["blurs"])
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def _warp(self, canvas: torch.Tensor, sizes: np.ndarray, mats: np.ndarray) -> torch.Tensor:
        """One bilinear resample of every image through its map: B × 3 × size × size float."""
        dev, size = canvas.device, self.item.size
        n, _, height, width = canvas.shape
        m = torch.as_tensor(mats, dtype=torch.float32, device=dev)  # B × 3 × 3
        u = torch.arange(size, dtype=torch.float32, device=dev)
        grid_v, grid_u = torch.meshgrid(u, u, indexing="ij")
        out = torch.stack([grid_u, grid_v, torch.ones_like(grid_u)], -1).reshape(-1, 3)
        src = torch.einsum("bij,pj->bpi", m, out)
        xs, ys = src[..., 0] / src[..., 2], src[..., 1] / src[..., 2]  # source pixel centres
        hw = torch.as_tensor(sizes, dtype=torch.float32, device=dev)
        if self.item.resize != "pad":  # mirror at the image's own edges, as BORDER_REFLECT_101
            xs, ys = _reflect101(xs, hw[:, 1:2]), _reflect101(ys, hw[:, 0:1])
        grid = torch.stack([(2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1], -1)
        return F.grid_sample(canvas, grid.reshape(n, size, size, 2), align_corners=False)

    def _colour(self, x: torch.Tensor, colours: np.ndarray) -> torch.Tensor:
        """out = M · rgb + (1 - contrast) · brightness · mean gray, per image (ColorJitter's)."""
        c = torch.as_tensor(colours, dtype=torch.float32, device=x.device)  # B × 3 × 4
        gray = torch.einsum("c,bchw->b", _GRAY.to(x.device), x) / (x.shape[2] * x.shape[3])
        offset = c[:, :, 3] * gray[:, None]  # colour_matrix(1.0, ...) left the mean as 1
        return torch.einsum("bij,bjhw->bihw", c[:, :, :3], x) + offset[:, :, None, None]

    def _blur(self, x: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
        """A separable Gaussian per image (sigma 0: none), mirrored at the edges."""
        if not sigmas.any():
            return x
        sigma = torch.as_tensor(sigmas, device=x.device, dtype=x.dtype)
        return blur_batch(x, sigma, math.ceil(3 * float(sigmas.max())))


@dataclass
class PendingAugment:
    """A training batch's draws, carried beside its pixels through fastai's transfer untouched
    (NumPy arrays: `to_device` and pinning leave them on the host, where the loop needs them)."""

    draws: dict  # BatchAugment.draw's arrays
    height: int  # the canvas: the batch's tallest and widest cached image
    width: int


def gather_canvas(
    pixels: torch.Tensor, index: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """B × 3 × height × width uint8 canvas, image i (offset, h, w in `index`, row i) cut from the
    flat HWC `pixels` into its top-left corner, zeros elsewhere: one gather on `pixels`' device."""
    dev = pixels.device
    off, h, w = (t[:, None, None] for t in index.to(dev).unbind(1))
    ys = torch.arange(height, device=dev)[None, :, None]
    xs = torch.arange(width, device=dev)[None, None, :]
    inside = (ys < h) & (xs < w)  # B × H × W
    pos = torch.where(inside, off + (ys * w + xs) * 3, 0)
    chans = pos[:, None] + torch.arange(3, device=dev)[None, :, None, None]  # B × 3 × H × W
    return pixels[chans] * inside[:, None]


class DeviceAugment(ItemTransform):
    """fastai batch transform: a batched-path batch (canvas or cache places, `PendingAugment`,
    labels) on the device → (uint8 TensorImage augmented to size, labels); others pass as they are.

    `pixels` is the cache's payload on the training device, for batches that carry places.
    """

    order = 0  # before fastai's batch transforms and Normalize: they see finished images

    def __init__(self, augment: BatchAugment, pixels: torch.Tensor | None = None):
        super().__init__()
        self.augment, self.pixels = augment, pixels

    def encodes(self, b: list):
        if len(b) != 3 or not isinstance(b[1], PendingAugment):
            return b
        x, pending, y = b
        if not x.dtype == torch.uint8:  # places (offset, h, w) in the cache held on the device
            x = gather_canvas(self.pixels, x, pending.height, pending.width)
        return TensorImage(self.augment(x, pending.draws)), y


def blur_batch(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each image of a B × C × H × W float batch with a separable Gaussian of its own
    `sigma` (0: left as it is), taps out to `radius`, edges mirrored (BORDER_REFLECT_101)."""
    b, c, h, w = x.shape
    r = max(1, min(radius, h - 1, w - 1))  # reflect padding needs r < size
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(x.dtype)[:, None]
    k = torch.exp(-0.5 * (t / sigma.clamp_min(1e-3)) ** 2)
    k = torch.where(sigma > 0, k / k.sum(1, keepdim=True), (t == 0).to(x.dtype))
    k = k.repeat_interleave(c, 0)  # one kernel per image channel
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def _reflect101(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Coordinates mirrored into [0, n - 1] about the edge pixels (OpenCV's BORDER_REFLECT_101)."""
    period = (2 * (n - 1)).clamp_min(1)
    t = torch.remainder(x, period)
    return (n - 1) - (t - (n - 1)).abs()
