"""The batch stage: fastai's `aug_transforms` with TwinCar's colour extras (saturation, a fast hue
shift, Gaussian blur), and fastai's `Normalize` fused into one multiply-add with the model's stats.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from fastai.data.transforms import Normalize
from fastai.torch_core import TensorImage
from fastai.vision.augment import (
    AffineCoordTfm,
    RandomResizedCropGPU,
    RandTransform,
    Saturation,
    aug_transforms,
)

from twincar_fast.config import AugConfig, ExperimentConfig
from twincar_fast.data.cpu_aug import RGB2YIQ
from twincar_fast.data.device_aug import blur_batch
from twincar_fast.data.geometry import aug_on_items
from twincar_fast.data.model_input import model_stats

__all__ = ["FusedNormalize", "RandomGaussianBlur", "RandomHue", "batch_transforms"]


class RandomGaussianBlur(RandTransform):
    """Blur each image of a training batch with probability `p`, sigma uniform in [0.1, max_sigma]."""

    order = 45  # after the crop (30) and the colour changes (40), before Normalize (99)

    def __init__(self, p: float = 0.2, max_sigma: float = 1.5):
        super().__init__(p=1.0)  # RandTransform's p is per batch; this one draws per image
        self.p_image, self.max_sigma = p, max_sigma

    def encodes(self, x: TensorImage) -> TensorImage:
        b = x.shape[0]
        on = torch.rand(b, device=x.device) < self.p_image
        if not on.any():
            return x
        lo = min(0.1, self.max_sigma)
        sigma = torch.empty(b, device=x.device, dtype=x.dtype).uniform_(lo, self.max_sigma)
        radius = math.ceil(3 * self.max_sigma)
        return TensorImage(blur_batch(x, sigma * on, radius))


# RGB → YIQ: a hue shift is a rotation of the (I, Q) chroma plane, so one 3×3 matrix per image.
_RGB2YIQ = torch.tensor(RGB2YIQ, dtype=torch.float32)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


class RandomHue(RandTransform):
    """Shift the hue of each training image with probability `p` by up to ±`max_hue` of a turn.

    One matrix product per image instead of fastai's `Hue` (RGB → HSV → RGB), which measured ~100×
    slower on the CPU; like ColorJitter's hue, `max_hue` is a share of the colour circle.
    """

    order = 40  # with fastai's lighting transforms, before the blur (45) and Normalize (99)

    def __init__(self, max_hue: float = 0.05, p: float = 0.75):
        super().__init__(p=1.0)  # RandTransform's p is per batch; this one draws per image
        self.max_hue, self.p_image = max_hue, p

    def encodes(self, x: TensorImage) -> TensorImage:
        b = x.shape[0]
        on = torch.rand(b, device=x.device) < self.p_image
        theta = (torch.rand(b, device=x.device) * 2 - 1) * self.max_hue * 2 * math.pi * on
        cos, sin = theta.cos(), theta.sin()
        rot = torch.zeros(b, 3, 3, device=x.device)
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = (
            1,
            cos,
            -sin,
            sin,
            cos,
        )
        m = (_YIQ2RGB.to(x.device) @ rot @ _RGB2YIQ.to(x.device)).to(x.dtype)
        return TensorImage(torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1))


def _scale_shift_numpy(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """float32 x · scale + bias on the CPU in NumPy, on one thread.

    torch's intra-op threads in the main process fight the DataLoader workers for the cores: each
    parallel op waits on a thread the workers have pushed off a core. On 2 cores with 2 workers
    this step took 0.9 ms of main-process CPU per image with torch, 0.25 ms here.
    """
    out = x.as_subclass(torch.Tensor).numpy().astype(np.float32)
    out *= scale.cpu().numpy()
    out += bias.cpu().numpy()
    return torch.from_numpy(out)


def _scale_shift_torch(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """float32 x · scale + bias on x's device: one float copy, scaled in place.

    A uint8 operand would send addcmul down its slow mixed-dtype path.
    """
    return x.as_subclass(torch.Tensor).float().mul_(scale).add_(bias)


class FusedNormalize(Normalize):
    """fastai's `Normalize` in one fused multiply-add: (x - mean) / std = x · (1/std) - mean/std.

    With `div` set (item-stage batches arrive as uint8), it is also fastai's `IntToFloatTensor`:
    1 / div is folded into the scale, and decoding gives 0-`div` integers back as that does. On a
    CPU that step runs on one thread, beside the DataLoader workers (see `_scale_shift_numpy`).
    """

    div: float | None = None  # None: the input is already float (after IntToFloatTensor)

    @classmethod
    def from_uint8(cls, mean, std, div: float = 255.0) -> FusedNormalize:
        """Normalization of uint8 batches by (mean, std) of 0-1 pixels, on the default device."""
        norm = cls.from_stats(mean, std)
        norm.div = div
        return norm

    def encodes(self, x: TensorImage) -> TensorImage:
        scale = 1 / self.std
        bias = -self.mean * scale
        if self.div is not None and not x.is_floating_point():
            on_cpu = x.device.type == "cpu"
            shift = _scale_shift_numpy if on_cpu else _scale_shift_torch
            return TensorImage(shift(x, scale / self.div, bias))
        return TensorImage(torch.addcmul(bias, x, scale))

    def decodes(self, x: TensorImage) -> TensorImage:
        x = super().decodes(x)
        return TensorImage((x.clamp(0.0, 1.0) * self.div).long()) if self.div else x


def _colour_extras(a: AugConfig) -> list:
    """TwinCar's extras beyond fastai's aug_transforms: saturation, hue, Gaussian blur."""
    extras = []
    if a.saturation:
        extras.append(Saturation(max_lighting=a.saturation, p=a.p_lighting))
    if a.hue:
        extras.append(RandomHue(max_hue=a.hue, p=a.p_lighting))
    if a.blur_p and a.blur_sigma:
        extras.append(RandomGaussianBlur(p=a.blur_p, max_sigma=a.blur_sigma))
    return extras


def batch_transforms(cfg: ExperimentConfig) -> list:
    """Augmentation on the device to img_size (train only; valid gets a plain resize), normalized
    with the model's own statistics (timm's `pretrained_cfg`)."""
    a, size = cfg.aug, cfg.data.img_size
    stats = model_stats(cfg.model.arch)
    if aug_on_items(cfg):  # every uint8 batch comes sized from the workers, training ones augmented
        return [FusedNormalize.from_uint8(*stats)]
    norm = FusedNormalize.from_stats(*stats)
    tfms = []
    if a.enabled:
        tfms = aug_transforms(
            do_flip=a.flip,
            max_rotate=a.max_rotate,
            max_zoom=a.max_zoom,
            max_warp=a.max_warp,
            max_lighting=a.max_lighting,
            p_affine=a.p_affine,
            p_lighting=a.p_lighting,
            size=size,
            min_scale=a.min_scale,
            xtra_tfms=_colour_extras(a),
        )
    if not any(isinstance(t, (AffineCoordTfm, RandomResizedCropGPU)) for t in tfms):
        tfms.append(RandomResizedCropGPU(size, min_scale=1.0, ratio=(1, 1)))  # resize only
    return [*tfms, norm]
