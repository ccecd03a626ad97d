"""Benchmark 1, the data pipeline: normalized training batches per second, ours vs. the reference.

Both sides read the same training rows (the recipe's stratified split of the same
`annotations.csv`), with the same batch size, the same number of workers and class-balanced
sampling, and yield batches of `pipe_img`-px normalized crops on the device. Ours: `build_dls`
(JPEG draft decoding and, by default, augmentation in the workers; `aug.stage: batch` is timed as
a variant: presizing in the workers, fastai's batch augmentation on the device).
Reference: per-item PIL/torchvision augmentation in the workers. The variant `plain_torch_items`
does our item-stage work (draft decode, `CpuAugment`, `FusedNormalize`) in a plain torch
`Dataset`/`DataLoader`: the difference from ours is what fastai's per-item machinery (Datasets,
TfmdLists, Pipelines over (x, y) tuples) costs.

Both loaders start their worker processes and fill a first batch every epoch, a fixed cost that a
real epoch (254 batches of Stanford Cars) spreads thin; so each training image is listed
`pipe_repeat` times (a longer epoch over the same files), and the time to the first batch is
reported beside the throughput, which counts the whole epoch.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable

import pandas as pd
import torch
from fastai.torch_core import TensorImage
from fastai.vision.core import PILImage, imagenet_stats
from torch.utils.data import DataLoader, Dataset

from benchmarks import reference
from benchmarks.data import repeated_dataset
from benchmarks.measure import Timer, compare
from benchmarks.settings import Settings, ours_config
from twincar_fast.config import ExperimentConfig
from twincar_fast.data import build_dls, read_annotations, resolve_device, split_train_valid
from twincar_fast.data.batch_tfms import FusedNormalize
from twincar_fast.data.cache import build_cache, cache_size
from twincar_fast.data.cpu_aug import CpuAugment
from twincar_fast.data.images import open_region
from twincar_fast.data.loaders import presize


def split_rows(cfg: ExperimentConfig) -> pd.DataFrame:
    """The train-split rows of cfg's data set with the recipe's `is_valid` column."""
    return split_train_valid(
        read_annotations(cfg.data.root), cfg.data.valid_pct, cfg.data.split_seed
    )


Pass = tuple[int, float, float]  # images, seconds, seconds to the first batch
Epoch = Callable[[], Pass]


def timed_epoch(batches: Callable[[], Iterable], device: torch.device) -> Epoch:
    """A function timing one pass over `batches()` (on `device`), and its first batch."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def epoch() -> Pass:
        n, first = 0, None
        with Timer() as t:
            for xb, _ in batches():
                xb = xb.to(device, non_blocking=True)
                n += len(xb)
                if first is None:
                    sync()
                    first = t.elapsed()
            sync()
        return n, t.seconds, first or 0.0

    return epoch


def ours_epoch(cfg: ExperimentConfig) -> Epoch:
    """One epoch of our training DataLoader (batch augmentation on its device included)."""
    dls = build_dls(cfg)
    return timed_epoch(lambda: dls.train, dls.device)


def reference_epoch(cfg: ExperimentConfig) -> Epoch:
    """One epoch of the reference's training DataLoader over the same rows."""
    df = split_rows(cfg)
    device = resolve_device(cfg.train.device)
    dl = reference.train_loader(
        df[~df["is_valid"]],
        cfg.data.img_size,
        cfg.data.batch_size,
        cfg.data.num_workers,
        seed=cfg.train.seed,
        pin_memory=device.type == "cuda",
    )
    return timed_epoch(lambda: dl, device)


class PlainItems(Dataset):
    """Our training items (draft decode + `CpuAugment`, no bbox crop) from a plain torch Dataset."""

    def __init__(self, df: pd.DataFrame, cfg: ExperimentConfig):
        self.paths, self.labels = df["path"].tolist(), df["class_id"].astype(int).tolist()
        self.aug = CpuAugment(cfg.data.img_size, cfg.aug, cfg.data.resize)
        self.min_side = presize(cfg) if cfg.data.draft else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = PILImage(open_region(self.paths[i], min_side=self.min_side))
        return self.aug.encodes(img).as_subclass(torch.Tensor), self.labels[i]


def plain_items_epoch(cfg: ExperimentConfig) -> Epoch:
    """One epoch of our item-stage work in a plain torch DataLoader (the reference's sampler)."""
    if cfg.data.bbox_crop or not cfg.aug.enabled or cfg.aug.stage != "item":
        raise ValueError("plain_torch_items times the item stage on whole images only")
    train = split_rows(cfg).query("~is_valid")
    device = resolve_device(cfg.train.device)
    ds = PlainItems(train, cfg)
    dl = DataLoader(
        ds,
        batch_size=cfg.data.batch_size,
        sampler=reference.balanced_sampler(ds.labels, cfg.train.seed),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    norm = FusedNormalize.from_uint8(*imagenet_stats)

    def batches() -> Iterable:
        for xb, yb in dl:
            yield norm(TensorImage(xb.to(device, non_blocking=True))), yb

    return timed_epoch(batches, device)


def race(epochs: dict[str, Callable[[], tuple]], repeats: int) -> dict[str, tuple]:
    """Run the sides in turns (so load changes hit all), `repeats` times; each one's fastest.

    Each side returns (images, seconds, ...extras); the pass with the most images/s counts.
    """
    best: dict[str, tuple] = {}
    for _ in range(repeats):
        for name, epoch in epochs.items():
            result = epoch()
            if name not in best or result[0] / result[1] > best[name][0] / best[name][1]:
                best[name] = result
    return best


def _entry(best: dict[str, Pass], ours: str = "ours") -> dict:
    """The JSON entry comparing `ours` with the reference."""
    (n_o, s_o, f_o), (n_r, s_r, f_r) = best[ours], best["reference"]
    return compare(
        round(n_o / s_o, 1),
        round(n_r / s_r, 1),
        "img/s",
        higher_is_better=True,
        what="whole epochs; first_batch_s: worker start-up and the first batch",
        n_images={"ours": n_o, "reference": n_r},
        seconds={"ours": round(s_o, 3), "reference": round(s_r, 3)},
        first_batch_s={"ours": round(f_o, 3), "reference": round(f_r, 3)},
    )


def bench_cache_build(s: Settings, data_dir: os.PathLike) -> dict:
    """Seconds and MB to build the benchmark set's image cache once (in a fresh folder)."""
    cfg = ours_config(s, data_dir, s.train_arch, s.pipe_img, s.pipe_item)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        cfg.data = dataclasses.replace(cfg.data, cache="on", cache_dir=tmp)
        cache, seconds = build_cache(cfg, data_dir)
        return {
            "seconds": round(seconds, 3),
            "mb": round(cache.nbytes / 2**20, 1),
            "images": len(cache),
            "cache_size": cache_size(cfg),
            "what": "one-time: decode, box crop, area resize of the train split, checksum",
        }


def bench_pipeline(s: Settings, data_dir: os.PathLike, variants: dict | None = None) -> dict:
    """Benchmark 1: our loader vs. the reference's, plus `variants` (name → data dir or cfg edit)."""
    longer = repeated_dataset(data_dir, s.pipe_repeat)
    cfg = ours_config(s, longer, s.train_arch, s.pipe_img, s.pipe_item)
    epochs = {"ours": ours_epoch(cfg), "reference": reference_epoch(cfg)}
    for name, change in (variants or {}).items():
        data = {k: v for k, v in change.items() if k != "aug"}
        if "root" in data:
            data["root"] = str(repeated_dataset(data["root"], s.pipe_repeat))
        vcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))
        if "aug" in change:
            vcfg.aug = dataclasses.replace(cfg.aug, **change["aug"])
        side = {"reference": reference_epoch, "plain": plain_items_epoch}.get(
            name.split("_")[0], ours_epoch
        )
        epochs[name] = side(vcfg)
    best = race(epochs, s.repeats)
    out = _entry(best)
    if variants:
        out["variants"] = {
            name: {
                "img_per_s": round(n / secs, 1),
                "n_images": n,
                "seconds": round(secs, 3),
                "first_batch_s": round(first, 3),
            }
            for name, (n, secs, first) in best.items()
        }
    return out
