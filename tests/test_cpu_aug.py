"""Augmentation in the CPU workers (`aug.stage: item`): the warp and colour maps against OpenCV and
torchvision, the transform's draws, and the loaders it builds (validation unchanged by the stage);
bf16 autocast on the CPU."""

from __future__ import annotations

import dataclasses
import random

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF  # noqa: N812
from conftest import make_tiny_cfg
from fastai.torch_core import TensorImage
from fastai.vision.augment import AffineCoordTfm
from fastai.vision.core import PILImage
from PIL import Image

from twincar_fast.config import AugConfig
from twincar_fast.data import build_dls
from twincar_fast.data.cpu_aug import CpuAugment, ValidResize, colour_matrix, warp_matrix
from twincar_fast.data.loaders import aug_on_items, presize
from twincar_fast.model.learner import create_learner

OFF = dict(
    flip=False,
    min_scale=1.0,
    max_rotate=0.0,
    max_warp=0.0,
    max_zoom=1.0,
    max_lighting=0.0,
    saturation=0.0,
    hue=0.0,
    blur_p=0.0,
)


def smooth_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB field, values well inside 0-255 (no clipping in the colour checks)."""
    small = np.random.default_rng(seed).integers(60, 200, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def apply(m: np.ndarray, x: float, y: float) -> tuple[float, float]:
    """A 3×3 homography applied to one point."""
    p = m @ np.array([x, y, 1.0])
    return p[0] / p[2], p[1] / p[2]


# ---------------------------------------------------------------- the maps


def test_warp_matrix_maps_pixels_as_cropped_flipped_and_turned():
    # the whole 8×8 image to 8×8: every pixel centre onto itself
    m = warp_matrix(8, 8, 8, (4.0, 4.0, 8.0, 8.0))
    for x, y in [(0, 0), (7, 0), (3, 5), (7, 7)]:
        assert apply(m, x, y) == pytest.approx((x, y))
    # flipped: mirrored columns
    m = warp_matrix(8, 8, 8, (4.0, 4.0, 8.0, 8.0), flip=True)
    assert apply(m, 0, 2) == pytest.approx((7, 2)) and apply(m, 6, 3) == pytest.approx((1, 3))
    # a 20×10 box centred at (30, 15) to 4×4: the output's corners sample inside the box's corners
    m = warp_matrix(100, 50, 4, (30.0, 15.0, 20.0, 10.0))
    assert apply(m, 0, 0) == pytest.approx((20 + 2.5 - 0.5, 10 + 1.25 - 0.5))
    assert apply(m, 3, 3) == pytest.approx((40 - 2.5 - 0.5, 20 - 1.25 - 0.5))
    # 90° about the centre: the output's top edge samples the source's right-hand column
    m = warp_matrix(8, 8, 8, (4.0, 4.0, 8.0, 8.0), angle=90)
    assert apply(m, 3.5, 0) == pytest.approx((7, 3.5))


def test_warp_matrix_warp_moves_the_corners_like_fastai():
    mx, my = 0.1, -0.2
    m = warp_matrix(8, 8, 8, (4.0, 4.0, 8.0, 8.0), warp=(mx, my))
    # fastai's corners: (-1, -1) → (-1 - my, -1 - mx), (1, 1) → (1 - my, 1 - mx), in units of
    # half the image (pixel edges at -0.5 and 7.5)
    for (u, v), want in [((-1, -1), (-1 - my, -1 - mx)), ((1, 1), (1 - my, 1 - mx))]:
        x, y = apply(m, 4 * (u + 1) - 0.5, 4 * (v + 1) - 0.5)
        assert ((x + 0.5) / 4 - 1, (y + 0.5) / 4 - 1) == pytest.approx(want)


def test_colour_matrix_matches_torchvision_color_jitter_steps():
    img = smooth_image(32, 24)
    gray_mean = float(np.dot(cv2.mean(img)[:3], [0.299, 0.587, 0.114]))
    b, c, s = 1.15, 0.85, 0.7
    got = cv2.transform(img, colour_matrix(gray_mean, b, c, s).astype(np.float32))
    t = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255  # float: no rounding
    want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(t, b), c), s)
    diff = np.abs(got - want.permute(1, 2, 0).numpy() * 255)
    assert diff.max() < 1 and diff.mean() < 0.35  # ours rounds once, to uint8
    assert np.abs(img.astype(int) - got.astype(int)).mean() > 5  # and it did change the image


def test_colour_matrix_hue_turns_colours_but_keeps_grays():
    half_turn = colour_matrix(100.0, hue=0.5)[:, :3]
    assert half_turn @ np.array([90.0, 90.0, 90.0]) == pytest.approx([90.0, 90.0, 90.0])
    red = half_turn @ np.array([200.0, 50.0, 50.0])
    assert red[0] < red[1] and red[0] < red[2]  # red turned towards cyan
    assert colour_matrix(100.0)[:, :3] == pytest.approx(np.eye(3))  # identity when nothing drawn


# ---------------------------------------------------------------- the transform


def tfm(size: int = 16, resize: str = "crop", **changes) -> CpuAugment:
    return CpuAugment(size, dataclasses.replace(AugConfig(), **{**OFF, **changes}), resize)


def test_nothing_drawn_is_a_plain_resize_of_the_square():
    img = smooth_image(48, 32)
    out = tfm(16)(PILImage.create(img), split_idx=0)
    assert isinstance(out, TensorImage) and out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    # crop mode, scale 1: a 32×32 square at some place in the 48-px width, resized to 16 px
    x = out.permute(1, 2, 0).numpy().astype(int)
    best = min(
        np.abs(
            x - cv2.resize(img[:, left : left + 32], (16, 16), interpolation=cv2.INTER_AREA)
        ).mean()
        for left in range(17)
    )
    assert best < 3
    squished = tfm(16, "squish")(PILImage.create(img), split_idx=0).permute(1, 2, 0).numpy()
    want = cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(squished.astype(int) - want).mean() < 3


def test_flips_half_of_the_images():
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :8] = 255  # left half white
    t = tfm(16, flip=True)
    random.seed(0)
    left_white = [
        float(t(PILImage.create(img), split_idx=0)[:, :, :8].float().mean()) > 128
        for _ in range(200)
    ]
    assert 70 < sum(left_white) < 130


def test_draws_change_every_image_and_only_in_training():
    img = PILImage.create(smooth_image(64, 48))
    t = CpuAugment(24, AugConfig())  # the recipe's strengths
    random.seed(1)
    outs = [t(img, split_idx=0) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert all(not torch.equal(outs[0], o) for o in outs[1:])
    assert t(img, split_idx=1) is img  # validation items pass through


def test_pad_mode_pads_with_black():
    img = np.full((8, 32, 3), 200, np.uint8)  # a wide strip: padded to a 32×32 square
    out = tfm(16, "pad")(PILImage.create(img), split_idx=0)
    rows = out.float().mean((0, 2))
    assert rows[0] < 10 and rows[-1] < 10 and rows[8] > 190


# ---------------------------------------------------------------- the loaders


def stage_cfg(tiny_data, tmp_path, stage: str):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.aug = dataclasses.replace(cfg.aug, stage=stage)
    return cfg


def test_item_stage_is_the_default_and_sizes_validation_items_directly(tiny_data, tmp_path):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    assert aug_on_items(cfg) and presize(cfg) == cfg.data.img_size == 32
    assert not aug_on_items(stage_cfg(tiny_data, tmp_path, "batch"))
    assert presize(stage_cfg(tiny_data, tmp_path, "batch")) == cfg.data.item_size == 40
    cfg.aug.enabled = False  # no augmentation: fastai's presizing, nothing to place
    assert not aug_on_items(cfg) and presize(cfg) == 40


def test_item_stage_loaders(tiny_data, tmp_path):
    item = build_dls(stage_cfg(tiny_data, tmp_path, "item"))
    batch = build_dls(stage_cfg(tiny_data, tmp_path, "batch"))
    assert any(isinstance(t, CpuAugment) for t in item.train.after_item.fs)
    assert not any(isinstance(t, AffineCoordTfm) for t in item.train.after_batch.fs)
    assert any(isinstance(t, AffineCoordTfm) for t in batch.train.after_batch.fs)
    assert not any(isinstance(t, CpuAugment) for t in batch.train.after_item.fs)
    xb, yb = item.one_batch()
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32
    assert -2.5 < float(xb.mean()) < 1.5  # normalized
    # validation: fastai's centre-crop Resize straight to img_size, then uint8 → normalized only
    resize = next(t for t in item.valid.after_item.fs if isinstance(t, ValidResize))
    assert resize.size == (32, 32)
    assert [type(t).__name__ for t in item.valid.after_batch.fs] == ["FusedNormalize"]
    xv, _ = item.valid.one_batch()
    first = Image.open(item.valid.items["path"].iloc[0]).convert("RGB")  # 48×32: crop the centre
    want = np.asarray(first.crop((8, 0, 40, 32)).resize((32, 32), Image.BILINEAR))
    got = item.valid.decode((xv,))[0][0].permute(1, 2, 0).numpy()  # back to 0-255
    assert np.abs(got - want).max() <= 1  # float rounding in the decode


def test_item_stage_in_worker_processes(tiny_data, tmp_path):
    cfg = stage_cfg(tiny_data, tmp_path, "item")
    cfg.data.num_workers = 2
    dls = build_dls(cfg)
    n = sum(len(xb) for xb, _ in dls.train)
    assert n == len(dls.train_ds) // 8 * 8  # full batches only, each augmented in a worker


# ---------------------------------------------------------------- bf16 on the CPU


def test_cpu_bf16_autocast_trains_with_fp32_weights(tiny_data, tmp_path):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.train.mixed_precision = "bf16"
    learn = create_learner(cfg, build_dls(cfg))
    assert hasattr(learn, "cpu_autocast")
    seen = []
    hook = learn.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in learn.model.parameters() if p.requires_grad]
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the body ran in bf16, training and validation
    after = [p for p in learn.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert np.isfinite(learn.recorder.values[-1]).all()
    cfg.train.mixed_precision = "none"
    assert not hasattr(create_learner(cfg, build_dls(cfg)), "cpu_autocast")
