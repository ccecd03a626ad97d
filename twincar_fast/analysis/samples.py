"""The model inputs behind rows of a predictions table, and the demo set's boxes on them.

Shared by the Grad-CAM++ figures of `interpret` and the Finer-CAM figures of `twins`: the
validation-transformed inputs of chosen images, the class-telling part boxes of the demo set
(raw/parts.csv), each image's car box, and a box outline drawn on an overlay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.learner import Learner
from PIL import Image, ImageDraw

from twincar_fast.analysis.evaluate import relative_images
from twincar_fast.analysis.gradcam import box_masks

__all__ = ["car_boxes", "outline", "part_boxes", "part_masks", "rows_tensor"]


def rows_tensor(learn: Learner, dl, rows: pd.DataFrame, data_dir: Path) -> torch.Tensor:
    """The validation-transformed inputs of the predictions rows `rows` (matched by image)."""
    where = {img: i for i, img in enumerate(relative_images(dl.items, data_dir))}
    idx = [where[img] for img in rows["image"]]
    items = dl.items.iloc[idx] if hasattr(dl.items, "iloc") else [dl.items[i] for i in idx]
    sub = learn.dls.test_dl(items, with_labels=True, rm_type_tfms=0, bs=max(1, min(len(idx), 64)))
    return torch.cat([b[0] for b in sub])


def part_boxes(data_dir: Path, split: str) -> pd.DataFrame | None:
    """The demo set's class-telling part boxes (raw/parts.csv) by image file name, or None."""
    path = data_dir / "raw" / "parts.csv"
    if not path.is_file():
        return None
    parts = pd.read_csv(path)
    parts = parts[parts["split"] == ("test" if split == "test" else "train")]
    return parts.set_index("fname")[["x1", "y1", "x2", "y2"]]


def car_boxes(dl, rows: pd.DataFrame, data_dir: Path) -> list:
    """The annotations car box of each predictions row (None where the loader has none)."""
    if not isinstance(dl.items, pd.DataFrame) or "bbox_x1" not in dl.items:
        return [None] * len(rows)
    where = {img: i for i, img in enumerate(relative_images(dl.items, data_dir))}
    cols = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    return [tuple(dl.items.iloc[where[img]][cols]) for img in rows["image"]]


def part_masks(
    learn: Learner, dl, rows: pd.DataFrame, data_dir: Path, boxes: pd.DataFrame
) -> np.ndarray:
    """Where each row's part box (from `part_boxes`, by file name) lands in the model input."""
    names = rows["image"].map(lambda s: Path(s).name)
    sizes = [Image.open(data_dir / img).size for img in rows["image"]]
    return box_masks(learn, sizes, boxes.loc[names].to_numpy(), car_boxes(dl, rows, data_dir))


def outline(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the bounding rectangle of `mask` drawn in white."""
    pil = Image.fromarray(img)
    ys, xs = np.nonzero(mask)
    if len(xs):
        ImageDraw.Draw(pil).rectangle([xs.min(), ys.min(), xs.max(), ys.max()], outline="white")
    return np.asarray(pil)
