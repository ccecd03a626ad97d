"""Grad-CAM++ and Finer-CAM overlays from a `Predictor` (PyTorch backend): a class's heat map drawn
over the image as the model sees it, for `twincar predict --cam DIR` and the Gradio app (whose
"Why not its twin?" output is the Finer-CAM map of the top class against its twin)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from twincar_fast.analysis.gradcam import model_cams, model_finer_cams, overlay
from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path
from twincar_fast.ship.predict import Predictor

__all__ = ["cam_overlays", "finer_overlays", "write_cams"]


def _inputs(predictor: Predictor, images: Sequence, boxes: Sequence | None):
    """(normalized batch, RGB images in [0, 1]) of images as the model sees them."""
    if not hasattr(predictor, "model"):
        raise TwincarError("Grad-CAM++ needs the PyTorch model: use --backend torch for --cam")
    pre = predictor.preprocess
    boxes = list(boxes) if boxes is not None else [None] * len(images)
    x = pre.batch([pre.item(im, b) for im, b in zip(images, boxes, strict=True)], predictor.device)
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
    return x, (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def cam_overlays(
    predictor: Predictor,
    images: Sequence,
    targets: Sequence[int],
    boxes: Sequence | None = None,
) -> list[np.ndarray]:
    """One uint8 RGB overlay (img_size × img_size × 3) per image: Grad-CAM++ of `targets`."""
    x, rgb = _inputs(predictor, images, boxes)
    cams = model_cams(predictor.model, x, targets, bs=predictor.batch_size)
    return [overlay(r, c) for r, c in zip(rgb, cams, strict=True)]


def finer_overlays(
    predictor: Predictor,
    images: Sequence,
    targets: Sequence[int],
    twins: Sequence[int],
    boxes: Sequence | None = None,
) -> list[np.ndarray]:
    """One uint8 RGB overlay per image: Finer-CAM of each target against its twin class."""
    x, rgb = _inputs(predictor, images, boxes)
    cams = model_finer_cams(predictor.model, x, targets, twins, bs=predictor.batch_size)
    return [overlay(r, c) for r, c in zip(rgb, cams, strict=True)]


def write_cams(predictor: Predictor, rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """`<n>_<name>.png` overlays of the predicted class for the rows without an error; an
    existing file is never replaced. Each row gets its overlay's path as `cam`."""
    out_dir = Path(out_dir)
    good = [r for r in rows if "error" not in r]
    names = [out_dir / f"{i:04d}_{Path(r['image']).stem}.png" for i, r in enumerate(good)]
    taken = next((p for p in names if p.exists()), None)
    if taken is not None:
        raise TwincarError(
            f"{taken} exists: overlays are never replaced; give another --cam folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(good), predictor.batch_size):
        chunk = good[start : start + predictor.batch_size]
        images = [r["image"] for r in chunk]
        chunk_boxes = [r.get("box") for r in chunk]  # the box each prediction was cut to
        pictures = cam_overlays(predictor, images, [r["class_id"] for r in chunk], chunk_boxes)
        for r, pic, path in zip(chunk, pictures, names[start:], strict=False):
            with atomic_path(path) as tmp:
                Image.fromarray(pic).save(tmp, format="PNG")
            r["cam"] = str(path)
    return names
