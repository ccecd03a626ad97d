"""Benchmark sizes (tiny for the tests, quick, full) and our toolkit's config for each benchmark."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.data import BenchData
from twincar_fast.config import ExperimentConfig, load_config

BASELINE = Path(__file__).resolve().parent.parent / "experiments" / "baseline.yaml"


def default_workers() -> int:
    """Our toolkit's default DataLoader workers (one per usable core, at most 8); both sides use it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores or 1, 8)


@dataclass(frozen=True)
class Settings:
    """Everything both sides share in one benchmark run."""

    mode: str
    data: BenchData
    workers: int = field(default_factory=default_workers)
    batch_size: int = 32  # TwinCar's
    repeats: int = 2  # timed passes per side; the fastest counts
    pipe_repeat: int = 6  # data pipeline: each training image listed this many times per epoch
    train_repeat: int = 4  # training epoch: likewise (real epochs are long; start-up is not timed)
    limit_turns: int = 3  # timed turns of our epoch and the limit's, taken in one process
    pipe_img: int = 224  # data pipeline: training crops
    pipe_item: int = 320  # data pipeline: our presizing (the recipe's item_size)
    train_arch: str = "resnet18"  # training epoch: the same small model on both sides
    train_img: int = 128
    train_item: int = 160
    predict_arch: str = "resnet18"
    predict_img: int = 224  # TwinCar's README: Resize 256, CenterCrop 224
    predict_item: int = 320
    single_n: int = 10  # single-image predictions timed per side
    fastai_n: int = 10  # learn.predict calls timed (on the first of the single images)
    batch_n: int = 64  # images in the batch-throughput test
    presize: int | None = 320  # also time our pipeline on a `prepare --presize` copy (None: skip)


def settings_for(mode: str, workers: int | None = None) -> Settings:
    """The settings of `mode` (tiny, quick or full), optionally with another worker count."""
    if mode == "tiny":
        s = Settings(
            mode="tiny",
            data=BenchData(
                n_classes=3, per_class=8, size=(192, 128), big_frac=0.25, big_size=(768, 512)
            ),
            workers=0,
            batch_size=4,
            repeats=1,
            pipe_repeat=1,
            train_repeat=1,
            limit_turns=1,
            pipe_img=64,
            pipe_item=80,
            train_arch="test_resnet",
            train_img=32,
            train_item=40,
            predict_arch="test_resnet",
            predict_img=64,
            predict_item=80,
            single_n=3,
            fastai_n=2,
            batch_n=8,
            presize=None,
        )
    elif mode == "quick":
        s = Settings(mode="quick", data=BenchData(n_classes=8, per_class=20))
    elif mode == "full":
        s = Settings(
            mode="full",
            data=BenchData(),
            repeats=3,
            pipe_repeat=2,
            train_repeat=1,
            single_n=30,
            batch_n=256,
        )
    else:
        raise ValueError(f"unknown benchmark mode {mode!r}: tiny, quick or full")
    return s if workers is None else dataclasses.replace(s, workers=workers)


def ours_config(
    s: Settings, data_dir: str | os.PathLike, arch: str, img: int, item: int
) -> ExperimentConfig:
    """The recipe (experiments/baseline.yaml) with the benchmark's data, sizes, model and workers."""
    cfg = load_config(BASELINE) if BASELINE.is_file() else ExperimentConfig()
    cfg.data = dataclasses.replace(
        cfg.data,
        root=str(data_dir),
        img_size=img,
        item_size=item,
        batch_size=s.batch_size,
        num_workers=s.workers,
        balanced=True,  # TwinCar's WeightedRandomSampler, as the reference
    )
    cfg.model = dataclasses.replace(cfg.model, arch=arch, pretrained=False, weights=None)
    cfg.train = dataclasses.replace(cfg.train, epochs=1, device="auto")
    return cfg
