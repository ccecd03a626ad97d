"""Grad-CAM++ and Finer-CAM overlays from a `Predictor` (PyTorch backend): a class's heat map drawn
over the image as the model sees it, for `twincar predict --cam DIR` and the Gradio app (whose
"Why not its twin?" output is the Finer-CAM map of the top class against its twin)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from twincar_fast.analysis.gradcam import model_cams, model_finer_cams, overlay
from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path
from twincar_fast.ship.predict import Predictor

__all__ = ["cam_overlays", "finer_overlays", "labelled", "write_cams"]


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


CAM_SIDE = (
    384  # a written overlay's side: the model's input (96 px in the demo) is too small to read
)


def labelled(overlay: np.ndarray, text: str, side: int = CAM_SIDE) -> Image.Image:
    """The overlay enlarged to `side` px (pixels kept sharp) above a caption strip of `text`."""
    from PIL import ImageDraw, ImageFont

    img = Image.fromarray(overlay)
    scale = max(1, round(side / max(img.size)))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=max(12, img.width // 24))
    draw = ImageDraw.Draw(img)
    lines, line = [], ""
    for word in text.split():  # wrapped to the image's width
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > img.width - 12:
            lines.append(line)
            trial = word
        line = trial
    lines.append(line)
    step = int(font.size * 1.3) if hasattr(font, "size") else 16
    out = Image.new("RGB", (img.width, img.height + step * len(lines) + 10), "white")
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, img.height + 5 + i * step), line, fill="black", font=font)
    return out


def write_cams(predictor: Predictor, rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """`<n>_<name>.png` overlays of the predicted class for the rows without an error, enlarged
    and captioned with the class and its probability; an existing file is never replaced. Each
    row gets its overlay's path as `cam`; where they went is said on stderr."""
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
            caption = f"Grad-CAM++ of {r['label']} (p={r['prob']:.2f})"
            with atomic_path(path) as tmp:
                labelled(pic, caption).save(tmp, format="PNG")
            r["cam"] = str(path)
    if good:
        print(f"Grad-CAM++ overlays of {len(good)} image(s) → {out_dir}", file=sys.stderr)
    return names
