"""The decoded-image cache and the batch loader over it: pixels, keys, locking, damage, draws."""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import N_CLASSES, N_TRAIN, make_tiny_cfg, write_tiny_prepared
from PIL import Image

from twincar_fast.cli import main as cli_main
from twincar_fast.config import AugConfig, validate
from twincar_fast.data import build_dls
from twincar_fast.data.batches import CachedDL, ThreadedDL, valid_view
from twincar_fast.data.cache import build_cache, cache_rows, cache_size
from twincar_fast.data.cpu_aug import CpuAugment
from twincar_fast.data.demo import make_demo_data
from twincar_fast.data.geometry import crop_region
from twincar_fast.data.loaders import VALID_MEMO_SHARE
from twincar_fast.data.prepare import prepare_dataset
from twincar_fast.errors import ConfigError
from twincar_fast.model.learner import create_learner

matplotlib.use("Agg")


@pytest.fixture
def data(tmp_path) -> Path:
    """A fresh tiny prepared set this test may change."""
    return write_tiny_prepared(tmp_path / "data")


def cfg_for(root: Path, out: Path, **data):
    """The tiny config over `root`, cache on, with `data` overrides."""
    cfg = make_tiny_cfg(root, out)
    cfg.data = dataclasses.replace(cfg.data, cache="on", bbox_crop=True, **data)
    return cfg


def area_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in): the share of each source pixel in each output pixel of an area resize."""
    edges = np.arange(n_out + 1) * n_in / n_out
    lo, hi = edges[:-1, None], edges[1:, None]
    src = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, src + 1) - np.maximum(lo, src), 0, None)
    return overlap / (n_in / n_out)


def reference_pixels(path: str, box, margin: float, hw: tuple[int, int]) -> np.ndarray:
    """The region of the original, decoded in full by PIL and area-averaged to (h, w) in NumPy."""
    img = Image.open(path).convert("RGB")
    left, top, right, bottom = crop_region(box, margin, img.size) or (0, 0, *img.size)
    img = img.crop((int(left), int(top), int(np.ceil(right)), int(np.ceil(bottom))))
    arr = np.asarray(img).astype(float)
    ry, rx = area_weights(hw[0], arr.shape[0]), area_weights(hw[1], arr.shape[1])
    return np.rint(np.einsum("ij,jkc,lk->ilc", ry, arr, rx))


@pytest.mark.parametrize("bbox_crop, side", [(True, 8), (False, 16), (False, 20)])
def test_cached_pixels_equal_a_direct_decode_and_resize(data, tmp_path, bbox_crop, side):
    cfg = cfg_for(data, tmp_path, cache_size=side)
    cfg.data.bbox_crop = bbox_crop
    cache, seconds = build_cache(cfg, data)
    rows = cache_rows(data)
    assert seconds > 0 and len(cache) == len(rows) == N_CLASSES * N_TRAIN  # the train split only
    assert cache.path.parent == data / ".cache"
    for i in (0, 7, len(rows) - 1):
        row = rows.iloc[i]
        box = tuple(row[["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]].astype(float))
        got = cache.image(i)
        assert min(got.shape[:2]) == side  # the shorter side is cache_size
        box = box if bbox_crop else None
        want = reference_pixels(row["path"], box, cfg.data.bbox_margin, got.shape[:2])
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 1, diff.max()  # rounding


def test_default_size_leaves_room_for_the_zoom(tiny_cfg):
    tiny_cfg.data.img_size = 100
    assert cache_size(tiny_cfg) == 115
    tiny_cfg.aug.max_zoom = 1.5
    assert cache_size(tiny_cfg) == 150


def test_same_settings_reuse_the_cache_and_changes_rebuild_it(data, tmp_path):
    cfg = cfg_for(data, tmp_path, cache_size=16)
    first, built = build_cache(cfg, data)
    again, rebuilt = build_cache(cfg, data)
    assert built > 0 and rebuilt == 0 and again.path == first.path
    cfg.data.bbox_margin = 0.0  # a setting that changes the pixels: a new cache
    other, s = build_cache(cfg, data)
    assert s > 0 and other.path != first.path
    # annotations.csv changed (one box moved): the cache of the same settings is rebuilt
    cfg.data.bbox_margin = make_tiny_cfg(data, tmp_path).data.bbox_margin
    df = pd.read_csv(data / "annotations.csv")
    df.loc[0, ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]] = [1, 1, 48, 32]
    df.to_csv(data / "annotations.csv", index=False)
    moved, s = build_cache(cfg, data)
    assert s > 0 and moved.path != first.path
    assert moved.image(0).shape[:2] == (16, 24)  # the whole 48×32 image now
    # an image file rewritten in place (new mtime and size): rebuilt too
    img = Image.open(moved.paths[1]).convert("RGB")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(moved.paths[1], quality=70)
    os.utime(moved.paths[1], ns=(1, 1))
    _, s = build_cache(cfg, data)
    assert s > 0


def _same_size_rewrite(path: str, img: Image.Image, when: int) -> None:
    """Write `img` to `path` as an uncompressed PNG (size fixed by its dimensions), mtime `when`."""
    img.save(path, format="PNG", compress_level=0)
    os.utime(path, ns=(when, when))


def test_an_image_changed_in_place_with_its_size_and_mtime_kept_rebuilds_the_cache(data, tmp_path):
    """Issue 29.10: the key was the file's size and mtime, so a same-size rewrite was missed."""
    cfg = cfg_for(data, tmp_path, cache_size=16)
    path = cache_rows(data)["path"].iloc[1]
    img = Image.open(path).convert("RGB")
    _same_size_rewrite(path, img, 10**18)
    first, built = build_cache(cfg, data)
    size = os.stat(path).st_size
    _same_size_rewrite(path, img.transpose(Image.FLIP_LEFT_RIGHT), 10**18)
    assert os.stat(path).st_size == size and os.stat(path).st_mtime_ns == 10**18
    changed, rebuilt = build_cache(cfg, data)
    assert built > 0 and rebuilt > 0 and changed.path != first.path
    assert not np.array_equal(changed.image(1), first.image(1))
    os.utime(path, ns=(1, 1))  # the same bytes with another mtime: the cache is reused
    again, s = build_cache(cfg, data)
    assert s == 0 and again.path == changed.path


def test_a_truncated_cache_is_rebuilt_with_a_warning(data, tmp_path, capsys):
    cfg = cfg_for(data, tmp_path)
    cache, _ = build_cache(cfg, data)
    good = cache.image(3).copy()
    size = cache.path.stat().st_size
    with open(cache.path, "r+b") as f:
        f.truncate(size - 100)
    cache, s = build_cache(cfg, data)
    assert s > 0 and "damaged" in capsys.readouterr().out
    np.testing.assert_array_equal(cache.image(3), good)
    # flipped bytes inside the pixels (length intact): the checksum catches it
    with open(cache.path, "r+b") as f:
        f.seek(size - 50)
        f.write(b"\xff" * 20)
    cache, s = build_cache(cfg, data)
    assert s > 0 and "checksum" in capsys.readouterr().out
    np.testing.assert_array_equal(cache.image(3), good)


BUILD = """
import sys
from conftest import make_tiny_cfg
from twincar_fast.data.cache import build_cache
from pathlib import Path
cfg = make_tiny_cfg(Path(sys.argv[1]), Path(sys.argv[2]))
cfg.data.cache, cfg.data.bbox_crop = "on", True
cache, seconds = build_cache(cfg, sys.argv[1])
print(cache.path, seconds > 0)
"""


def test_two_processes_building_at_once_end_with_one_valid_cache(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-c", BUILD, str(data), str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][0] == outs[1][0]  # the same file
    assert sorted(o[1] for o in outs) == ["False", "True"]  # built once, read by the other
    files = sorted(p.name for p in (data / ".cache").iterdir())
    assert files == [".lock", Path(outs[0][0]).name]  # no temporary file left behind
    cache, s = build_cache(cfg_for(data, tmp_path), data)
    assert s == 0 and len(cache) == N_CLASSES * N_TRAIN


def test_a_cache_dir_that_cant_be_written_is_one_line(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = cfg_for(data, tmp_path, cache_dir=str(blocker / "cache"))
    with pytest.raises(ConfigError, match="data.cache_dir .* is not writable"):
        build_cache(cfg, data)
    cfg.data.cache_dir = None
    assert cli_main(["cache", str(_yaml(tmp_path, data, cache_dir=str(blocker / "c")))]) == 2


def test_a_full_disk_leaves_no_cache_a_later_run_trusts(data, tmp_path, monkeypatch):
    cfg = cfg_for(data, tmp_path)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ConfigError, match="No space left on device.*data.cache=off"):
        build_cache(cfg, data)
    assert [p.name for p in (data / ".cache").iterdir()] == [".lock"]  # nothing half-written
    monkeypatch.undo()
    cache, s = build_cache(cfg, data)
    assert s > 0 and len(cache) == N_CLASSES * N_TRAIN


def _yaml(tmp_path: Path, root: Path, **data) -> Path:
    """A YAML config over `root` for the CLI."""
    lines = [f"{k}: {v}" for k, v in {"root": root, "img_size": 32, **data}.items()]
    path = tmp_path / "cache.yaml"
    path.write_text("data:\n" + "".join(f"  {line}\n" for line in lines))
    return path


def test_twincar_cache_builds_then_reports_it_up_to_date(data, tmp_path, capsys):
    path = _yaml(tmp_path, data)
    assert cli_main(["cache", str(path)]) == 0
    assert "images, " in capsys.readouterr().out
    assert cli_main(["cache", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli_main(["cache", str(path), "data.cache=off"]) == 2
    assert "data.cache is off" in capsys.readouterr().err


# ---------------------------------------------------------------- the batch loader


def test_augmentation_draws_stay_in_their_ranges():
    aug = AugConfig(min_scale=0.5, max_zoom=1.2, max_rotate=10, max_warp=0.1, p_affine=1.0)
    tfm = CpuAugment(32, aug, "crop")
    rng = random.Random(0)
    draws = [tfm.draw_geometry(60, 40, rng) for _ in range(2000)]
    sides = np.array([d["box"][2] for d in draws]) / 40  # the square crop's side / min side
    assert sides.max() <= 1.0 + 1e-9 and sides.min() >= np.sqrt(0.5) / 1.2 - 1e-9
    assert sides.min() < 0.65  # the range is used, not just its top
    angles = np.array([d["angle"] for d in draws])
    assert np.abs(angles).max() <= 10 and np.abs(angles).max() > 9
    assert 0.45 < np.mean([d["flip"] for d in draws]) < 0.55
    assert max(abs(v) for d in draws for v in d["warp"]) <= 0.1
    # the same seed draws the same changes
    assert tfm.draw_geometry(60, 40, random.Random(5)) == tfm.draw_geometry(
        60, 40, random.Random(5)
    )


def test_cached_loaders_train_show_and_predict(tiny_data, tmp_path):
    cfg = make_tiny_cfg(tiny_data, tmp_path)  # cache: auto, on for a set this small
    dls = build_dls(cfg)
    assert isinstance(dls.train, CachedDL) and isinstance(dls.valid, ThreadedDL)  # exact path
    xb, yb = dls.one_batch()
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32 and yb.shape == (8,)
    learn = create_learner(cfg, dls)
    learn.fit(1, 1e-3)
    dls.show_batch(max_n=4)
    preds, targs = learn.get_preds(dl=dls.train.new(shuffle=False, drop_last=False))
    assert preds.shape == (len(dls.train_ds), N_CLASSES)
    assert torch.equal(targs, dls.train.labels)
    test = dls.test_dl(dls.valid_ds.items, with_labels=True)  # new data: the exact path
    assert isinstance(test, ThreadedDL) and not isinstance(test, CachedDL)
    p, t = learn.get_preds(dl=test)
    assert p.shape == (len(dls.valid_ds), N_CLASSES)


def test_the_same_seed_gives_the_same_batches(tiny_data, tmp_path):
    def first_epoch(seed):
        from fastai.torch_core import set_seed

        set_seed(seed)
        dl = build_dls(make_tiny_cfg(tiny_data, tmp_path)).train
        return torch.cat([xb for xb, _ in dl])

    a, b, c = first_epoch(1), first_epoch(1), first_epoch(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture(scope="module")
def demo_style(tmp_path_factory) -> Path:
    """A small prepared demo set: 4 classes × 8 train images, the demo's drawing and boxes."""
    root = tmp_path_factory.mktemp("demo_style")
    make_demo_data(root / "raw", n_classes=4, per_class=8, size=(192, 128), seed=0)
    return Path(prepare_dataset(root / "raw", root / "prepared"))


@pytest.mark.parametrize("resize", ["crop", "squish", "pad"])
def test_cached_validation_view_is_close_to_the_exact_path(demo_style, tmp_path, resize):
    """How far the cache's validation view is from the exact path (README, Performance)."""
    cfg = make_tiny_cfg(demo_style, tmp_path)
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True, img_size=96, resize=resize)
    cfg.data.cache = "off"
    exact_dl = build_dls(cfg).valid
    exact = torch.cat([exact_dl.decode((xb,))[0] for xb, _ in exact_dl])
    cfg.data.cache = "on"
    cache, _ = build_cache(cfg, demo_style)
    items = exact_dl.items
    views = [valid_view(cache.image(s), 96, resize) for s in cache.slots(items["path"])]
    cached = torch.from_numpy(np.stack(views).transpose(0, 3, 1, 2))
    mad = (cached.float() - exact.float()).abs().mean().item()
    assert mad < 4.0, mad  # grey levels of 255; the README states the measured figure


def test_shutil_copy_keeps_the_cache_keyed_to_the_new_files(tiny_data, tmp_path):
    """A copied data set (new paths, new mtimes) gets its own cache, never the original's."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy, ignore=shutil.ignore_patterns(".cache"))
    cfg = cfg_for(copy, tmp_path)
    cache, s = build_cache(cfg, copy)
    assert s > 0 and all(str(copy) in p for p in cache.paths)


def test_auto_leaves_a_cache_over_its_budget_off(data, tmp_path, capsys):
    cfg = make_tiny_cfg(data, tmp_path)  # a fresh set: no cache built yet (one built is used)
    cfg.data.cache_max_gb = 1e-9
    dls = build_dls(cfg)
    assert not isinstance(dls.train, CachedDL) and dls.train.fake_l.num_workers == 0
    assert "would exceed data.cache_max_gb" in capsys.readouterr().out
    cfg.aug.stage = "batch"  # presized for fastai's batch transforms: never from the cache
    cfg.data.cache_max_gb = 8
    assert not isinstance(build_dls(cfg).train, CachedDL)
    cfg.data.cache = "on"  # refused with the config, before any data loads
    with pytest.raises(ConfigError, match=r"key 'data.cache' is on, which needs aug.stage: item"):
        validate(cfg)


def test_yaml_on_and_off_are_the_cache_modes(tmp_path):
    from twincar_fast.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  cache: off\n")  # YAML 1.1 reads a bare off as false
    assert load_config(path).data.cache == "off"
    assert load_config(path, ["data.cache=on"]).data.cache == "on"
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(path, ["data.cache=sometimes"])


# ---------------------------------------------------------------- batched (the GPU's path)


def canvas_of(images: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 images on one zero canvas, each in its top-left corner."""
    h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    canvas = torch.zeros((len(images), 3, h, w), dtype=torch.uint8)
    for j, img in enumerate(images):
        canvas[j, :, : img.shape[0], : img.shape[1]] = torch.from_numpy(img.transpose(2, 0, 1))
    return canvas


@pytest.mark.parametrize("resize", ["crop", "squish", "pad"])
def test_batched_augmentation_matches_the_per_image_path(demo_style, tmp_path, resize):
    from twincar_fast.data.device_aug import BatchAugment

    cfg = make_tiny_cfg(demo_style, tmp_path)
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True, img_size=64, cache="on")
    cache, _ = build_cache(cfg, demo_style)
    item = CpuAugment(64, AugConfig(), resize)  # every change on, the recipe's strengths
    images = [cache.image(i).copy() for i in range(len(cache))]
    seeds = list(range(100, 100 + len(images)))
    per_image = np.stack(
        [item.augment(img, random.Random(s)) for img, s in zip(images, seeds, strict=True)]
    )
    batch = BatchAugment(item)
    draws = batch.draw([img.shape[:2] for img in images], seeds)
    got = batch(canvas_of(images), draws).permute(0, 2, 3, 1).numpy()
    diff = np.abs(got.astype(int) - per_image.astype(int))
    assert diff.mean() < 0.5, diff.mean()  # same draws, same maps: rounding (and pad's edge)
    if resize != "pad":
        assert np.percentile(diff, 99.9) <= 2


def test_batched_loader_gathers_on_the_device_or_from_host_memory(tiny_data, tmp_path):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.data.cache_aug = "batched"  # the GPU's path, here on the CPU
    dls = build_dls(cfg)
    assert dls.train.batched and dls.train.pixels is None  # no GPU: pixels stay in host memory

    def first_batch(dl, seed):
        dl.rng = random.Random(seed)
        return dl.one_batch()

    xb, yb = first_batch(dls.train, 3)
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32  # normalized
    on_device = dls.train.new(pixels=torch.from_numpy(np.array(dls.train.cache.pixels)))
    xd, yd = first_batch(on_device, 3)
    assert torch.equal(xb, xd) and torch.equal(yb, yd)  # the same pixels either way
    assert not torch.equal(xb, first_batch(dls.train, 4)[0])
    cfg.data.cache_device = "cuda"
    with pytest.raises(ConfigError, match="cache_device=cuda needs train.device"):
        build_dls(cfg)


def tensors_in(b) -> list[torch.Tensor]:
    """Every tensor in a batch's tuples, lists and dicts."""
    if isinstance(b, torch.Tensor):
        return [b]
    if isinstance(b, dict):
        b = list(b.values())
    return [t for o in b for t in tensors_in(o)] if isinstance(b, (list, tuple)) else []


@pytest.mark.parametrize("on_device", [True, False], ids=["pixels-on-device", "host-canvas"])
def test_batched_loader_hands_fastai_cpu_batches_whatever_the_device(
    tiny_data, tmp_path, monkeypatch, on_device
):
    """What the loader yields before fastai's `to_device` (and pinning) is on the CPU; the gather
    and the augmentation run after it, on the device. `meta` stands in for a GPU: the cache's
    pixels and the training device are both there, as `data.cache_device` puts them on CUDA."""
    import fastai.data.load as load

    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.data.cache_aug = "batched"
    dls = build_dls(cfg)
    handed = []

    def to_device(b, device=None, non_blocking=False):
        handed.append({t.device.type for t in tensors_in(b)})
        return real(b, device, non_blocking)

    real = load.to_device
    monkeypatch.setattr(load, "to_device", to_device)
    meta = torch.empty(len(dls.train.cache.pixels), dtype=torch.uint8, device="meta")
    dl = dls.train.new(pixels=meta if on_device else None, device="meta")
    xb, yb = dl.one_batch()
    assert handed and all(devices == {"cpu"} for devices in handed)
    assert xb.device.type == "meta" and yb.device.type == "meta"
    assert xb.shape == (8, 3, 32, 32) and xb.dtype == torch.float32  # augmented, normalized


def test_batched_batches_are_pinned_only_for_a_cuda_device(tiny_data, tmp_path, monkeypatch):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.data.cache_aug = "batched"
    train = build_dls(cfg).train
    assert not train.pin_memory and not train._pin()  # build_dls pins for CUDA only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.new(pin_memory=True)._pin() and not train._pin()


def test_validation_beside_the_cache_is_the_exact_path_in_threads(tiny_data, tmp_path):
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=True, num_workers=2)
    threaded = build_dls(cfg).valid
    cfg.data.cache = "off"
    plain = build_dls(cfg).valid  # fastai's own per-item loader, worker processes
    assert isinstance(threaded, ThreadedDL) and threaded.fake_l.num_workers == 0
    assert plain.fake_l.num_workers == 2
    a = torch.cat([xb for xb, _ in threaded])
    b = torch.cat([xb for xb, _ in plain])
    assert torch.equal(a, b)  # the same pixels, in the same order


def test_validation_items_are_decoded_in_the_first_pass_only(data, tmp_path):
    """The validation set is read every epoch: its exact-path items are made once and kept, so
    later passes read no file (at a GPU's speed); a copy for the same items shares them, other
    data, a pickled loader and fastai's TTA (training transforms) don't."""
    cfg = cfg_for(data, tmp_path)
    dls = build_dls(cfg)
    valid = dls.valid
    first = torch.cat([xb for xb, _ in valid])
    assert len(valid.memo) == len(dls.valid_ds)
    learn = create_learner(cfg, dls)
    plain, _ = learn.get_preds(ds_idx=1)
    tta, _ = learn.tta(n=2, beta=0)  # fastai's TTA: the training transforms on these items
    assert not torch.allclose(tta, plain)  # augmented items, not the kept ones
    assert torch.equal(torch.cat([xb for xb, _ in valid]), first)  # none of them was kept
    for path in dls.valid_ds.items["path"]:
        Path(path).unlink()  # a second pass that read a file would fail now
    assert torch.equal(torch.cat([xb for xb, _ in valid]), first)
    again = valid.new(shuffle=False, drop_last=False)  # what fastai's get_preds makes
    assert again.memo is valid.memo and torch.equal(torch.cat([x for x, _ in again]), first)
    assert dls.test_dl(dls.train_ds.items).memo is None  # other items: made as read
    assert pickle.loads(pickle.dumps(valid)).memo == {}  # learner.pkl carries no pixels
    write_tiny_prepared(data)  # the files back, for fastai's own loader
    cfg.data.cache = "off"
    assert torch.equal(torch.cat([xb for xb, _ in build_dls(cfg).valid]), first)  # exact


def test_validation_items_too_big_for_the_memory_budget_are_read_each_pass(data, tmp_path):
    cfg = cfg_for(data, tmp_path)
    n, side = len(build_dls(cfg).valid_ds), cfg.data.img_size
    cfg.data.cache_max_gb = n * 3 * side**2 / VALID_MEMO_SHARE / 2**30 * 0.99  # just over it
    assert build_dls(cfg).valid.memo is None
    cfg.data.cache_max_gb *= 1.02
    assert build_dls(cfg).valid.memo == {}
