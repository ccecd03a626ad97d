"""Test-time augmentation on our loaders: the mean probabilities over views of each image.

fastai's `learn.tta` re-runs the training transforms, which our cached and batched loaders don't
expose to a test loader; the views here are made from the evaluation batch itself, on its device:
`flip` = the image and its mirror; `flip+crops` = the 4 corner and the centre crops of the batch
upscaled by 1/0.875 (timm's crop_pct), each with its mirror: 10 views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

__all__ = ["TTA_KINDS", "TtaViews", "tta_views"]

TTA_KINDS = ("flip", "flip+crops")
CROP_PCT = 0.875  # the crop is this share of the upscaled image (timm's default crop_pct)


def _crops(x: torch.Tensor) -> list[torch.Tensor]:
    """The 4 corner crops and the centre crop, each of x's size, of x upscaled by 1/CROP_PCT."""
    h, w = x.shape[-2:]
    big_h, big_w = round(h / CROP_PCT), round(w / CROP_PCT)
    big = F.interpolate(x.float(), size=(big_h, big_w), mode="bilinear", align_corners=False)
    big = big.to(x.dtype)
    tops, lefts = (0, big_h - h, (big_h - h) // 2), (0, big_w - w, (big_w - w) // 2)
    corners = [(tops[0], lefts[0]), (tops[0], lefts[1]), (tops[1], lefts[0]), (tops[1], lefts[1])]
    return [big[..., t : t + h, s : s + w] for t, s in [*corners, (tops[2], lefts[2])]]


def tta_views(x: torch.Tensor, kind: str) -> torch.Tensor:
    """All views of the batch `x` (N, C, H, W), stacked view-major: (V·N, C, H, W)."""
    if kind not in TTA_KINDS:
        raise ValueError(f"TTA kind must be one of {', '.join(TTA_KINDS)}, got {kind!r}")
    bases = [x] if kind == "flip" else _crops(x)
    views = [v for b in bases for v in (b, b.flip(-1))]
    return torch.cat(views).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last if `x` is, so the model sees the layout it was set up for."""
    return (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last)
        else (torch.contiguous_format)
    )


class TtaViews(Callback):
    """During `get_preds`: each batch runs as all its views; the prediction is their mean
    probability (as a log, so that the loss and the softmax of get_preds see exactly it)."""

    order = 30  # after the batch transforms, precision and channels-last callbacks

    def __init__(self, kind: str):
        self.kind = kind

    def before_batch(self):
        self._n = len(self.xb[0])
        self.learn.xb = (tta_views(self.xb[0], self.kind),)

    def after_pred(self):
        probs = self.pred.float().softmax(-1)
        mean = probs.view(-1, self._n, probs.shape[-1]).mean(0)
        self.learn.pred = mean.clamp_min(1e-12).log()
