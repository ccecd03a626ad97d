"""Annotations → fastai DataLoaders: items augmented in the workers (or presized for fastai's batch
augmentation on the device), eval loaders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.callback.data import WeightedDL  # noqa: F401 - patches DataBlock.weighted_dataloaders
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor
from fastai.vision.augment import Resize, ResizeMethod
from fastai.vision.core import PILImage
from fasttransform import Transform
from PIL import Image
from rich.table import Table

from twincar_fast.config import ExperimentConfig
from twincar_fast.console import console
from twincar_fast.data.batch_tfms import batch_transforms
from twincar_fast.data.batches import CachedDL, device_pixels
from twincar_fast.data.cache import ImageCache, open_cache
from twincar_fast.data.cpu_aug import CpuAugment, ValidResize
from twincar_fast.data.dataset import BBOX_COLUMNS, read_annotations, read_classes, read_rejected
from twincar_fast.data.device import resolve_device
from twincar_fast.data.geometry import PAD_MODE, aug_on_items, presize
from twincar_fast.data.images import open_region
from twincar_fast.data.split import split_train_valid
from twincar_fast.errors import DataError

__all__ = [
    "check_vocab",
    "CenterResize",
    "ImageLoader",
    "aug_on_items",
    "build_dls",
    "build_eval_dls",
    "cached_dls",
    "check_classes",
    "class_weights",
    "data_summary",
    "eval_dl",
    "item_transforms",
    "presize",
    "print_data_summary",
]

VALID_MEMO_SHARE = 0.25  # of data.cache_max_gb: the most the kept validation items may take
_RESIZE = {"crop": ResizeMethod.Crop, "squish": ResizeMethod.Squish, "pad": ResizeMethod.Pad}


# ---------------------------------------------------------------- items


class ImageLoader(Transform):
    """Open an annotations row (or an image path) as a PILImage, cropped and draft-decoded."""

    # fastai's test_dl/predict read this to accept rows, paths and images alike
    input_types = (pd.Series, str, Path, Image.Image)

    def __init__(
        self, item_size: int, bbox_crop: bool = False, bbox_margin: float = 0.0, draft: bool = True
    ):
        super().__init__()
        self.item_size, self.bbox_crop, self.bbox_margin = item_size, bbox_crop, bbox_margin
        self.draft = draft

    def encodes(self, item) -> PILImage:
        if isinstance(item, Image.Image):
            return PILImage.create(item.convert("RGB"))
        if isinstance(item, pd.Series):
            path = item["path"]
            box = (
                tuple(float(item.get(c, np.nan)) for c in BBOX_COLUMNS) if self.bbox_crop else None
            )
        elif isinstance(item, (str, os.PathLike)):
            path, box = item, None
        else:
            raise DataError(
                f"can't open {item!r} as an image: give a file path or an annotations row"
            )
        min_side = self.item_size if self.draft else None
        return PILImage.create(open_region(path, box, self.bbox_margin, min_side))


class CenterResize(Resize):
    """fastai's `Resize`, but cropping at the centre in training too (no augmentation at all)."""

    def before_call(self, b, split_idx: int) -> None:
        self.pcts = (0.5, 0.5)


def item_transforms(cfg: ExperimentConfig) -> list:
    """Items on the CPU: presized to item_size (random crop place in training) for batch-stage
    augmentation; or, at the item stage, augmented to img_size (training) and resized straight
    to img_size (validation)."""
    d = cfg.data
    args = dict(size=presize(cfg), method=_RESIZE[d.resize], pad_mode=PAD_MODE)
    if aug_on_items(cfg):
        return [CpuAugment(d.img_size, cfg.aug, d.resize), ValidResize(**args)]
    return [(Resize if cfg.aug.enabled else CenterResize)(**args)]


def class_weights(df: pd.DataFrame) -> np.ndarray:
    """Per-row sampling weights 1 / (train images of the row's class): classes drawn equally."""
    counts = df.loc[~df["is_valid"], "label"].value_counts()
    return 1.0 / df["label"].map(counts).fillna(1).to_numpy(dtype=float)


def make_datablock(cfg: ExperimentConfig, classes: list[str]) -> DataBlock:
    """The DataBlock over annotation rows: image → class, vocab in classes.csv order."""
    d = cfg.data
    loader = ImageLoader(presize(cfg), d.bbox_crop, d.bbox_margin, d.draft)
    on_items = aug_on_items(cfg)
    return DataBlock(
        blocks=(
            # item stage: FusedNormalize converts the uint8 batches itself, in the same pass
            TransformBlock(type_tfms=loader, batch_tfms=None if on_items else IntToFloatTensor),
            CategoryBlock(vocab=classes, sort=False),
        ),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=item_transforms(cfg),
        batch_tfms=batch_transforms(cfg),
        n_inp=1,
    )


def build_dls(cfg: ExperimentConfig, data_dir: str | os.PathLike | None = None) -> DataLoaders:
    """Train/valid DataLoaders of the prepared set at `data_dir` (default `cfg.data.root`).

    Training batches come from the decoded-image cache when `data.cache` allows it.
    """
    data_dir = Path(data_dir or cfg.data.root)
    classes = read_classes(data_dir)
    df = split_train_valid(read_annotations(data_dir), cfg.data.valid_pct, cfg.data.split_seed)
    device = resolve_device(cfg.train.device)
    workers = cfg.data.num_workers
    kwargs = dict(
        bs=cfg.data.batch_size,
        num_workers=min(os.cpu_count() or 1, 8) if workers is None else workers,
        device=device,
        pin_memory=device.type == "cuda",
    )
    dblock = make_datablock(cfg, classes)
    image_cache = open_cache(cfg, data_dir)
    if image_cache is not None:
        return cached_dls(cfg, dblock, df, image_cache, **kwargs)
    if cfg.data.balanced:
        return dblock.weighted_dataloaders(df, wgts=class_weights(df), **kwargs)
    return dblock.dataloaders(df, **kwargs)


def cached_dls(
    cfg: ExperimentConfig, dblock: DataBlock, df: pd.DataFrame, cache: ImageCache, **kwargs
) -> DataLoaders:
    """The DataBlock's Datasets over `df`: training batches from `cache` (`CachedDL`),
    validation through the exact per-item path, the one `twincar evaluate` and the Predictor use,
    so the checkpoint is chosen on the pixels the model will be judged on."""
    dsets = dblock.datasets(df)
    d, workers, device = cfg.data, kwargs.pop("num_workers"), kwargs["device"]
    batched = d.cache_aug == "batched" or (d.cache_aug == "auto" and device.type == "cuda")
    on_gpu = batched or d.cache_device == "cuda"  # device_pixels refuses cuda without a GPU
    pixels = device_pixels(cache, device, d.cache_device, d.cache_gpu_share) if on_gpu else None
    train = CachedDL(
        dsets.train,
        cache=cache,
        size=d.img_size,
        resize=d.resize,
        augment=CpuAugment(d.img_size, cfg.aug, d.resize) if cfg.aug.enabled else None,
        threads=max(1, workers),
        wgts=class_weights(df)[dsets.splits[0]] if d.balanced else None,  # as fastai's WeightedDL
        batched=batched,
        pixels=pixels,
        shuffle=True,
        drop_last=True,
        after_item=dblock.item_tfms,
        after_batch=dblock.batch_tfms,
        **kwargs,
    )
    # fastai's per-item loader (in threads) with the same transforms and batch types, made as
    # fastai's `dataloaders` makes its validation loader; its items kept after the first epoch
    # when they fit (on 2 cores, decoding them each epoch was 8.6× slower: benchmarks.valid_pass)
    kept = len(dsets.valid) * 3 * d.img_size**2 <= VALID_MEMO_SHARE * d.cache_max_gb * 2**30
    valid = train.new(dsets.valid, shuffle=False, drop_last=False, memo={} if kept else None)
    return DataLoaders(train, valid, device=kwargs["device"])


def build_eval_dls(cfg: ExperimentConfig, data_dir: str | os.PathLike) -> DataLoaders:
    """DataLoaders with `cfg`'s validation transforms and classes, for evaluation only.

    Needs no training split (every image goes to the unused valid side but one), so a saved model
    can be evaluated on a test-only set.
    """
    data_dir = Path(data_dir)
    df = read_annotations(data_dir).assign(is_valid=True)
    df.loc[0, "is_valid"] = False
    device = resolve_device(cfg.train.device)
    dblock = make_datablock(cfg, read_classes(data_dir))
    return dblock.dataloaders(df, bs=cfg.data.batch_size, num_workers=0, device=device)


# ---------------------------------------------------------------- evaluation and summary


def check_vocab(dls: DataLoaders, data_dir: str | os.PathLike) -> list[str]:
    """The data set's classes; a one-line DataError unless classes.csv is the model's vocab."""
    return check_classes([str(v) for v in dls.vocab], data_dir)


def check_classes(vocab: list[str], data_dir: str | os.PathLike) -> list[str]:
    """The data set's classes; a one-line DataError unless classes.csv lists `vocab` in order."""
    data_dir = Path(data_dir)
    classes = read_classes(data_dir)
    if classes == vocab:
        return classes
    diff = next((i for i, (a, b) in enumerate(zip(classes, vocab, strict=False)) if a != b), None)
    what = (
        f"{len(classes)} classes vs the model's {len(vocab)}"
        if diff is None
        else f"class {diff} is {classes[diff]!r} there but {vocab[diff]!r} in the model"
    )
    raise DataError(
        f"{data_dir / 'classes.csv'} doesn't match the model's classes ({what}); "
        "evaluate on the data set the model was trained on"
    )


def eval_dl(
    dls: DataLoaders,
    data_dir: str | os.PathLike,
    split: str = "test",
    valid_pct: float = 0.1,
    seed: int = 42,
    **kwargs,
) -> TfmdDL:
    """A labelled loader over `split` ('test', or 'valid': the training run's own valid split).

    Uses the validation transforms of `dls` (e.g. a loaded learner's, with no training data
    present); `valid_pct` and `seed` must be the run's `data.valid_pct` and `data.split_seed`.
    Extra keyword arguments (bs, num_workers, ...) go to `dls.test_dl`.
    """
    data_dir = Path(data_dir)
    if split not in ("test", "valid"):
        raise DataError(f"split must be 'test' or 'valid', got {split!r}")
    check_vocab(dls, data_dir)
    df = read_annotations(data_dir)
    if split == "valid":
        df = split_train_valid(df, valid_pct, seed)
        df = df[df["is_valid"]]
    else:
        df = df[df["split"] == "test"]
    if df.empty:
        raise DataError(f"{data_dir / 'annotations.csv'} has no {split} images to evaluate")
    return dls.test_dl(df.reset_index(drop=True), with_labels=True, rm_type_tfms=0, **kwargs)


def data_summary(cfg: ExperimentConfig, data_dir: str | os.PathLike, dls: DataLoaders) -> dict:
    """Classes and images per part (train, valid, test, rejected) of a run's data."""
    data_dir = Path(data_dir)
    splits = pd.read_csv(data_dir / "annotations.csv", usecols=["split"])["split"]
    return {
        "data_dir": str(data_dir),
        "classes": len(dls.vocab),
        "train": len(dls.train_ds),
        "valid": len(dls.valid_ds),
        "test": int((splits == "test").sum()),
        "rejected": len(read_rejected(data_dir)),
        "item_size": cfg.data.item_size,
        "img_size": cfg.data.img_size,
        "batch_size": cfg.data.batch_size,
        "balanced": cfg.data.balanced,
        "bbox_crop": cfg.data.bbox_crop,
        "augment": cfg.aug.enabled,
    }


def print_data_summary(
    cfg: ExperimentConfig, data_dir: str | os.PathLike, dls: DataLoaders
) -> dict:
    """Print `data_summary` as a rich table and return it."""
    summary = data_summary(cfg, data_dir, dls)
    table = Table(title="data", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
    return summary
