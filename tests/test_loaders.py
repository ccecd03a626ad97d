"""DataLoaders: vocab, shapes, normalization, augmentation switches, bbox crop, balanced sampling,
JPEG draft decoding, and eval loaders on a learner exported and loaded back."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASS_NAMES, make_tiny_cfg
from fastai.learner import load_learner
from fastai.torch_core import TensorImage
from fastai.vision.learner import vision_learner
from PIL import Image
from scipy.stats import chisquare

import twincar_fast.data.images as images
from twincar_fast.config import validate
from twincar_fast.data import (
    build_dls,
    eval_dl,
    print_data_summary,
    read_annotations,
    resolve_device,
)
from twincar_fast.data.batch_tfms import RandomGaussianBlur
from twincar_fast.data.images import open_rgb
from twincar_fast.data.loaders import ImageLoader
from twincar_fast.errors import ConfigError, DataError

matplotlib.use("Agg")

RED, BLUE = (230, 20, 20), (20, 40, 220)


def write_set(root: Path, items: list[tuple[Image.Image, int, str, tuple]], n_classes: int) -> Path:
    """A prepared set from (image, class_id, split, box) items; labels are 'class <id>'."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (img, c, split, box) in enumerate(items):
        rel = f"images/{split}_{i:04d}.jpg"
        img.save(root / rel, quality=95)
        rows.append((rel, f"class {c}", c, split, *box))
    cols = ["image", "label", "class_id", "split", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    pd.DataFrame(rows, columns=cols).to_csv(root / "annotations.csv", index=False)
    labels = [f"class {c}" for c in range(n_classes)]
    pd.DataFrame({"class_id": range(n_classes), "label": labels}).to_csv(
        root / "classes.csv", index=False
    )
    return root


def natural_image(rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A smooth random colour field: pixel statistics roughly like photos (mean ~0.5, no flat grey)."""
    small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


@pytest.fixture(scope="module")
def natural_data(tmp_path_factory) -> Path:
    """3 classes × (8 train + 2 test) square colour fields, 40×40."""
    rng = np.random.default_rng(0)
    items = [
        (natural_image(rng), c, split, (np.nan,) * 4)
        for c in range(3)
        for split in ["train"] * 8 + ["test"] * 2
    ]
    return write_set(tmp_path_factory.mktemp("natural"), items, 3)


def quiet_cfg(root: Path, out: Path, **aug):
    """A config with every augmentation off except those in `aug` (aug.enabled stays on)."""
    cfg = make_tiny_cfg(root, out)
    off = dict(flip=False, min_scale=1.0, max_rotate=0.0, max_warp=0.0, max_zoom=1.0)
    off |= dict(max_lighting=0.0, saturation=0.0, hue=0.0, blur_p=0.0, p_lighting=1.0)
    cfg.aug = dataclasses.replace(cfg.aug, **(off | aug))
    cfg.data = dataclasses.replace(cfg.data, resize="squish")
    return cfg


def pixels(dls, xb: torch.Tensor) -> torch.Tensor:
    """A normalized batch decoded back to RGB in [0, 1]."""
    return dls.after_batch.decode((xb,))[0].float() / 255


def ordered_batches(dl) -> torch.Tensor:
    """Every image of one pass over `dl` in dataset order (shuffle off), as one tensor."""
    return torch.cat([xb for xb, _ in dl.new(shuffle=False, drop_last=False)])


# ---------------------------------------------------------------- shape, vocab, normalization


def test_vocab_shape_and_show_batch(tiny_cfg):
    dls = build_dls(tiny_cfg)
    assert list(dls.vocab) == CLASS_NAMES  # classes.csv order, not sorted
    assert (len(dls.train_ds), len(dls.valid_ds)) == (36, 12)
    xb, yb = dls.one_batch()
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,)
    x, y = dls.valid_ds[0]
    row = dls.valid_ds.items.iloc[0]
    assert dls.vocab[int(y)] == row["label"] == CLASS_NAMES[row["class_id"]]
    assert dls.train.fake_l.num_workers == 0 and not dls.train.pin_memory
    dls.show_batch(max_n=4)
    fig = matplotlib.pyplot.gcf()
    assert sum(1 for ax in fig.axes if ax.images) == 4
    matplotlib.pyplot.close("all")


def test_data_summary(tiny_cfg, capsys):
    dls = build_dls(tiny_cfg)
    summary = print_data_summary(tiny_cfg, tiny_cfg.data.root, dls)
    assert {k: summary[k] for k in ("classes", "train", "valid", "test", "rejected")} == dict(
        classes=4, train=36, valid=12, test=24, rejected=0
    )
    out = capsys.readouterr().out
    assert "rejected" in out and "36" in out


def test_colour_jitter_of_one_or_more_is_a_config_error(tiny_cfg):
    tiny_cfg.aug.hue = 1.0  # refused with the config (config_rules), before any data loads
    with pytest.raises(ConfigError, match=r"key 'aug.hue' must be in \[0, 1\)"):
        validate(tiny_cfg)


def test_default_workers_and_device(tiny_cfg):
    tiny_cfg.data.num_workers = None
    dls = build_dls(tiny_cfg)
    assert dls.train.threads == min(os.cpu_count(), 8)  # from the cache, in threads
    assert dls.valid.threads == min(os.cpu_count(), 8)  # the exact path, in threads too
    tiny_cfg.data.cache = "off"
    assert build_dls(tiny_cfg).train.fake_l.num_workers == min(os.cpu_count(), 8)
    assert dls.device == torch.device("cpu") and not dls.valid.pin_memory


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    # the one resolver of training and inference: None is auto, errors name the key given
    assert resolve_device(None) == resolve_device("") == resolve_device("auto")
    with pytest.raises(ConfigError, match=r"^device: unknown device 'gpu0'"):
        resolve_device("gpu0", key="device")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match=r"^device: .+ device 'cuda:\d+'; use "):
        resolve_device(f"cuda:{count}", key="device")


def test_the_predictor_resolves_devices_as_training_does(tmp_path):
    from twincar_fast.ship.predict import Predictor

    with pytest.raises(ConfigError, match=r"^device: unknown device 'gpu0'"):
        Predictor.from_path(tmp_path / "model.safetensors", device="gpu0")  # before any load


def test_batch_is_normalized(natural_data, tmp_path):
    dls = build_dls(make_tiny_cfg(natural_data, tmp_path))
    xb = torch.cat([dls.train.one_batch()[0], dls.valid.one_batch()[0]])
    assert abs(xb.mean().item()) < 0.35
    raw = pixels(dls, xb)  # undoing Normalize gives the image's pixels again
    assert abs(raw.mean().item() - 0.5) < 0.1 and raw.std() > 0.15
    # with test_resnet's own statistics (timm's pretrained_cfg: 0.5/0.5), not ImageNet's
    assert xb.std().item() == pytest.approx(raw.std().item() / 0.5, rel=0.01)  # decode rounds
    assert xb.mean().item() == pytest.approx((raw.mean().item() - 0.5) / 0.5, abs=0.01)


# ---------------------------------------------------------------- augmentation


def test_aug_off_is_deterministic_and_on_is_not(tiny_cfg):
    tiny_cfg.aug.enabled = False
    dls = build_dls(tiny_cfg)
    assert torch.equal(ordered_batches(dls.train), ordered_batches(dls.train))
    assert torch.equal(ordered_batches(dls.valid), ordered_batches(dls.valid))

    tiny_cfg.aug.enabled = True
    dls = build_dls(tiny_cfg)
    first = dls.train.new(shuffle=False)
    assert not torch.equal(first.one_batch()[0], first.one_batch()[0])
    assert torch.equal(ordered_batches(dls.valid), ordered_batches(dls.valid))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of vertical neighbours, per image."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)


@pytest.mark.parametrize(
    "extra",
    [dict(saturation=0.5), dict(hue=0.2), dict(blur_p=1.0, blur_sigma=2.0)],
    ids=["saturation", "hue", "blur"],
)
def test_each_extra_changes_the_batch_only_when_on(natural_data, tmp_path, extra):
    base = build_dls(quiet_cfg(natural_data, tmp_path))
    plain = ordered_batches(base.train)
    assert torch.equal(plain, ordered_batches(base.train))  # all off: nothing random left

    dls = build_dls(quiet_cfg(natural_data, tmp_path, **extra))
    changed = ordered_batches(dls.train)
    assert changed.shape == plain.shape
    assert (changed - plain).abs().mean() > 0.02
    assert torch.equal(ordered_batches(dls.valid), ordered_batches(base.valid))  # train only
    if "blur_p" in extra:
        smoother = total_variation(changed) / total_variation(plain)
        assert (smoother < 1.001).all() and smoother.mean() < 0.95  # every image blurred


def test_blur_draws_per_image():
    x = TensorImage(torch.rand(64, 3, 24, 24))
    tfm = RandomGaussianBlur(p=0.5, max_sigma=1.5)
    torch.manual_seed(0)
    y = tfm(x.clone(), split_idx=0)
    blurred = (y - x).flatten(1).abs().amax(1) > 1e-5
    assert 15 < int(blurred.sum()) < 49  # about half of 64 (binomial, 4 sd)
    assert torch.equal(tfm(x.clone(), split_idx=1), x)  # validation untouched


# ---------------------------------------------------------------- bbox crop and draft


@pytest.fixture(scope="module")
def box_data(tmp_path_factory) -> Path:
    """A red square in its box on a big blue noisy background (and a box-less image)."""
    rng = np.random.default_rng(1)
    items = []
    for c in range(2):
        for split in ["train"] * 4 + ["test"]:
            arr = np.empty((64, 96, 3), dtype=np.uint8)
            arr[:] = BLUE
            arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
            x, y = int(rng.integers(4, 70)), int(rng.integers(4, 40))
            arr[y : y + 20, x : x + 20] = RED
            items.append((Image.fromarray(arr), c, split, (x + 1, y + 1, x + 20, y + 20)))
    return write_set(tmp_path_factory.mktemp("boxes"), items, 2)


def red_share(dls) -> float:
    """Share of the validation pixels that are clearly red."""
    raw = pixels(dls, ordered_batches(dls.valid))
    r, g, b = raw.unbind(1)
    return ((r > 0.6) & (b < 0.4) & (g < 0.4)).float().mean().item()


def test_bbox_crop_keeps_the_box(box_data, tmp_path):
    cfg = quiet_cfg(box_data, tmp_path)
    cfg.data.valid_pct = 0.5
    assert red_share(build_dls(cfg)) < 0.25
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True, bbox_margin=0.1)
    assert red_share(build_dls(cfg)) > 0.6


def test_rows_without_box_use_whole_image(box_data):
    row = read_annotations(box_data).iloc[0].copy()
    row[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]] = np.nan
    assert ImageLoader(40, bbox_crop=True, bbox_margin=0.1)(row).size == (96, 64)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    """A 1600×1200 JPEG with a red 800×600 box in the middle."""
    arr = np.zeros((1200, 1600, 3), dtype=np.uint8)
    arr[:] = BLUE
    arr[300:900, 400:1200] = RED
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(arr).save(path, quality=90)
    return path


def test_open_rgb_draft_decodes_small(big_jpeg):
    img = open_rgb(big_jpeg, draft=(200, 150))
    assert img.mode == "RGB"
    assert img.width >= 200 and img.height >= 150
    assert img.width <= 400  # 1/4 of the original or smaller


def test_loader_passes_draft_size(big_jpeg, monkeypatch):
    calls = []

    def spy(path, draft=None):
        calls.append(draft)
        return open_rgb(path, draft=draft)

    monkeypatch.setattr(images, "open_rgb", spy)  # what open_region decodes with
    row = pd.Series({"path": str(big_jpeg), "bbox_x1": 401, "bbox_y1": 301})
    row["bbox_x2"], row["bbox_y2"] = 1200, 900

    whole = ImageLoader(100)(row)
    assert callable(calls[-1]) and min(calls[-1]((1600, 1200))) >= 100  # draft set from the header
    assert min(whole.size) >= 100 and whole.width <= 400  # not the 1600×1200 original

    crop = ImageLoader(100, bbox_crop=True)(row)
    assert min(crop.size) >= 100 and crop.width <= 400  # box decoded at ≤ 1/2 scale
    assert np.asarray(crop)[..., 0].mean() > 200  # and it is the red box
    assert abs(crop.width / crop.height - 4 / 3) < 0.02

    full = ImageLoader(100, draft=False)(row)
    assert calls[-1] is None and full.size == (1600, 1200)


# ---------------------------------------------------------------- balanced sampling


def test_balanced_sampling_is_near_uniform(tmp_path):
    rng = np.random.default_rng(2)
    sizes = [100, 10, 10, 10]  # train images per class: 75, 8, 8, 8 after the 25 % valid split
    items = [
        (natural_image(rng, 16), c, "train", (np.nan,) * 4)
        for c, n in enumerate(sizes)
        for _ in range(n)
    ]
    root = write_set(tmp_path / "imbalanced", items, 4)
    cfg = quiet_cfg(root, tmp_path)
    cfg.data = dataclasses.replace(cfg.data, item_size=16, img_size=16, batch_size=33)
    plain = build_dls(cfg)
    cfg.data.balanced = True
    dls = build_dls(cfg)
    n = len(dls.train_ds)
    np.random.seed(0)  # WeightedDL draws with numpy
    labels = torch.cat([yb for _, yb in dls.train]).numpy()  # one real epoch
    counts = np.bincount(labels, minlength=4)
    assert counts.sum() == n == 99
    assert chisquare(counts).pvalue > 0.001  # uniform over classes
    assert counts[0] / n < 0.45  # vs 75 / 99 = 0.76 without balancing
    plain_labels = torch.cat([yb for _, yb in plain.train]).numpy()
    assert np.bincount(plain_labels, minlength=4)[0] == 75
    assert len(eval_dl(dls, root, "valid", valid_pct=0.25).dataset) == 25 + 3 * 2


# ---------------------------------------------------------------- evaluation loaders


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory) -> Path:
    """learner.pkl of a test_resnet learner built on a copy of the tiny set, then deleted."""
    tmp = tmp_path_factory.mktemp("exported")
    data = Path(shutil.copytree(tiny_data, tmp / "train_data"))
    learn = vision_learner(build_dls(make_tiny_cfg(data, tmp)), "test_resnet", pretrained=False)
    learn.export(tmp / "learner.pkl")
    shutil.rmtree(data)  # no training data left: the learner must not need it
    return tmp / "learner.pkl"


@pytest.mark.filterwarnings("ignore:load_learner")
def test_eval_dl_on_loaded_learner(exported, tiny_data):
    learn = load_learner(exported, cpu=True)
    test = eval_dl(learn.dls, tiny_data, "test")
    assert len(test.dataset) == 24
    items = test.dataset.items
    assert set(items["split"]) == {"test"}
    probs, targets = learn.get_preds(dl=test)
    assert probs.shape == (24, 4)
    assert targets.tolist() == items["class_id"].tolist()

    valid = eval_dl(learn.dls, tiny_data, "valid", valid_pct=0.25, seed=42)
    fresh = build_dls(make_tiny_cfg(tiny_data, tiny_data.parent))
    assert valid.dataset.items["image"].tolist() == fresh.valid_ds.items["image"].tolist()
    xb, yb = valid.one_batch()
    assert xb.shape == (8, 3, 32, 32)
    assert torch.equal(xb, fresh.valid.one_batch()[0])  # same validation transforms

    pred = learn.predict(str(tiny_data / items["image"].iloc[0]))  # a bare path works too
    assert pred[0] in CLASS_NAMES


@pytest.mark.filterwarnings("ignore:load_learner")
def test_eval_dl_rejects_other_classes(exported, tiny_data, tmp_path):
    other = Path(shutil.copytree(tiny_data, tmp_path / "other"))
    pd.DataFrame({"class_id": range(4), "label": CLASS_NAMES[::-1]}).to_csv(
        other / "classes.csv", index=False
    )
    learn = load_learner(exported, cpu=True)
    with pytest.raises(DataError) as info:
        eval_dl(learn.dls, other, "test")
    msg = str(info.value)
    assert "\n" not in msg and str(other / "classes.csv") in msg
    with pytest.raises(DataError, match="'test' or 'valid'"):
        eval_dl(learn.dls, tiny_data, "train")


def test_random_hue_rotates_chroma_and_keeps_luma_and_greys():
    from twincar_fast.data.batch_tfms import _RGB2YIQ, RandomHue

    torch.manual_seed(0)
    x = TensorImage(torch.rand(8, 3, 6, 6) * 0.2 + 0.4)  # pale colours: rotations stay in gamut
    x[:, :, 0, 0] = 0.4  # one grey pixel per image
    y = RandomHue(max_hue=0.5, p=1.0)(x, split_idx=0)
    assert not torch.allclose(y, x, atol=1e-3)  # colours moved
    yiq_x, yiq_y = (torch.einsum("ij,bjhw->bihw", _RGB2YIQ, t) for t in (x, y))
    torch.testing.assert_close(yiq_y[:, 0], yiq_x[:, 0], atol=1e-5, rtol=0)  # luma kept
    chroma = lambda t: t[:, 1:].pow(2).sum(1).sqrt()  # noqa: E731
    torch.testing.assert_close(chroma(yiq_y), chroma(yiq_x), atol=1e-5, rtol=0)  # saturation kept
    torch.testing.assert_close(y[:, :, 0, 0], x[:, :, 0, 0], atol=1e-5, rtol=0)  # grey stays grey
    same = RandomHue(max_hue=0.5, p=0.0)(x, split_idx=0)
    torch.testing.assert_close(same, x, atol=1e-6, rtol=0)


def test_fused_normalize_matches_fastai_normalize_both_ways():
    from fastai.data.transforms import Normalize
    from fastai.vision.core import imagenet_stats

    from twincar_fast.data.batch_tfms import FusedNormalize

    x = TensorImage(torch.rand(2, 3, 8, 8))
    fused, plain = (t.from_stats(*imagenet_stats, cuda=False) for t in (FusedNormalize, Normalize))
    y = fused(x)
    assert isinstance(y, TensorImage)
    torch.testing.assert_close(y, plain(x))
    assert float(y.mean()) < 0.2 and not torch.allclose(y, x)
    torch.testing.assert_close(fused.decode(y), x)


def test_fused_normalize_of_uint8_is_int_to_float_and_normalize():
    from fastai.data.transforms import IntToFloatTensor, Normalize
    from fastai.vision.core import imagenet_stats

    from twincar_fast.data.batch_tfms import FusedNormalize

    x = TensorImage(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    fused = FusedNormalize.from_uint8(*imagenet_stats)
    to_float, plain = IntToFloatTensor(), Normalize.from_stats(*imagenet_stats, cuda=False)
    y = fused(x.to(fused.mean.device)).cpu()
    assert isinstance(y, TensorImage) and y.dtype == torch.float32
    torch.testing.assert_close(y, plain(to_float(x)))
    back = fused.decode(y)  # 0-255 integers again, as IntToFloatTensor decodes
    assert back.dtype == torch.int64 and (back - x.long()).abs().max() <= 1
    torch.testing.assert_close(fused(y.to(fused.mean.device)).cpu(), plain(y))  # float: as before


def test_uint8_scale_shift_numpy_and_torch_agree():
    from twincar_fast.data.batch_tfms import _scale_shift_numpy, _scale_shift_torch

    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    scale, bias = torch.rand(1, 3, 1, 1) + 0.5, torch.randn(1, 3, 1, 1)
    want = x.double() * scale.double() + bias.double()
    for shift in (_scale_shift_numpy, _scale_shift_torch):  # the CPU and the GPU path
        y = shift(x, scale, bias)
        assert y.dtype == torch.float32 and y.shape == x.shape
        torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-5)
    assert x.dtype == torch.uint8  # the input batch is left as it was
