"""Box geometry: a box of the original image lands where its pixels go in the model input."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_cfg
from PIL import Image

from twincar_fast.analysis.gradcam import box_masks
from twincar_fast.data import build_dls, eval_dl
from twincar_fast.data.geometry import InputGeometry, crop_region
from twincar_fast.data.model_input import model_stats
from twincar_fast.model.learner import create_learner

W, H = 150, 90
CAR = (21, 16, 110, 75)  # the car box, 1-based inclusive, off-centre so a crop matters
MARKER = (61, 21, 76, 33)  # a solid red patch inside it (the "part")


@pytest.fixture(scope="module")
def marked_data(tiny_data, tmp_path_factory):
    """The tiny set with one more test image: noise, a car box, a solid red marker inside it."""
    root = tmp_path_factory.mktemp("marked") / "data"
    shutil.copytree(tiny_data, root)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 60, size=(H, W, 3), dtype=np.uint8)
    x1, y1, x2, y2 = CAR
    arr[y1 - 1 : y2, x1 - 1 : x2, 2] = 120  # the car: bluish
    x1, y1, x2, y2 = MARKER
    arr[y1 - 1 : y2, x1 - 1 : x2] = (255, 0, 0)
    Image.fromarray(arr).save(root / "images" / "marked.png")
    ann = pd.read_csv(root / "annotations.csv")
    row = ann.iloc[[-1]].assign(image="images/marked.png")
    row[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]] = CAR
    pd.concat([ann, row]).to_csv(root / "annotations.csv", index=False)
    return root


@pytest.mark.parametrize("stage", ["item", "batch"])
@pytest.mark.parametrize("bbox_crop", [False, True])
@pytest.mark.parametrize("resize", ["crop", "squish", "pad"])
def test_mapped_box_covers_the_marker_in_the_model_input(
    marked_data, tmp_path, resize, bbox_crop, stage
):
    cfg = make_tiny_cfg(marked_data, tmp_path)
    cfg.data = dataclasses.replace(
        cfg.data, img_size=64, item_size=96, resize=resize, bbox_crop=bbox_crop, bbox_margin=0.16
    )
    cfg.aug.stage = stage  # item: one resize to 64; batch: Resize to 96, then resampled to 64
    dls = build_dls(cfg)
    dl = eval_dl(dls, marked_data, "test")
    i = int(np.flatnonzero(dl.items["image"] == "images/marked.png")[0])
    x = torch.cat([b[0] for b in dl]).as_subclass(torch.Tensor)[i].float()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in model_stats(cfg.model.arch))
    rgb = (x * std + mean).clamp(0, 1).numpy()
    red = (rgb[0] > 0.75) & (rgb[1] < 0.25)  # the marker's pixels in the model input
    assert red.sum() > 20
    learn = create_learner(cfg, dls)
    mask = box_masks(learn, [(W, H)], [MARKER], [CAR])[0]
    assert mask.shape == (64, 64)
    assert mask[red].all(), "every marker pixel lies inside the mapped box"
    assert red[mask].mean() > 0.75, "and the mapped box holds little else"


def test_geometry_of_a_box_crop_by_hand():
    # car box 100×50 at (11, 21), margin 0.1 → region (0, 15, 120, 75) of a 200×100 image;
    # squished to 60²: x scale 0.5, y scale 1.0
    geo = InputGeometry(60, 60, "squish", bbox_crop=True, bbox_margin=0.1)
    assert crop_region((11, 21, 110, 70), 0.1, (200, 100)) == (0.0, 15.0, 120.0, 75.0)
    assert geo.box((200, 100), (31, 26, 60, 45), (11, 21, 110, 70)) == (15.0, 10.0, 30.0, 30.0)
    # without the crop the same box is measured against the whole image
    whole = dataclasses.replace(geo, bbox_crop=False)
    assert whole.box((200, 100), (31, 26, 60, 45), (11, 21, 110, 70)) == (9.0, 15.0, 18.0, 27.0)
