"""Benchmark 1, the data pipeline: normalized training batches per second, ours vs. the reference.

Both sides read the same training rows (the recipe's stratified split of the same
`annotations.csv`), with the same batch size, the same number of workers and class-balanced
sampling, and yield batches of `pipe_img`-px normalized crops on the device. Ours: `build_dls`
(JPEG draft decoding, presizing in the workers, fastai's batch augmentation on the device).
Reference: per-item PIL/torchvision augmentation in the workers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable

import pandas as pd
import torch

from benchmarks import reference
from benchmarks.measure import Timer, compare
from benchmarks.settings import Settings, ours_config
from twincar_fast.config import ExperimentConfig
from twincar_fast.data import build_dls, read_annotations, resolve_device, split_train_valid

Epoch = Callable[[], tuple[int, float]]


def split_rows(cfg: ExperimentConfig) -> pd.DataFrame:
    """The train-split rows of cfg's data set with the recipe's `is_valid` column."""
    return split_train_valid(
        read_annotations(cfg.data.root), cfg.data.valid_pct, cfg.data.split_seed
    )


def timed_epoch(batches: Callable[[], Iterable], device: torch.device) -> Epoch:
    """A function timing one pass over `batches()`: (images seen, seconds), batches on `device`."""

    def epoch() -> tuple[int, float]:
        n = 0
        with Timer() as t:
            for xb, _ in batches():
                xb = xb.to(device, non_blocking=True)
                n += len(xb)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return n, t.seconds

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


def race(epochs: dict[str, Epoch], repeats: int) -> dict[str, tuple[int, float]]:
    """Run the epochs in turns (so load changes hit all sides), `repeats` times; each one's best."""
    best: dict[str, tuple[int, float]] = {}
    for _ in range(repeats):
        for name, epoch in epochs.items():
            n, secs = epoch()
            if name not in best or secs < best[name][1]:
                best[name] = (n, secs)
    return best


def _entry(best: dict[str, tuple[int, float]], ours: str = "ours") -> dict:
    """The JSON entry comparing `ours` with the reference."""
    (n_o, s_o), (n_r, s_r) = best[ours], best["reference"]
    return compare(
        round(n_o / s_o, 1),
        round(n_r / s_r, 1),
        "img/s",
        higher_is_better=True,
        n_images={"ours": n_o, "reference": n_r},
        seconds={"ours": round(s_o, 3), "reference": round(s_r, 3)},
    )


def bench_pipeline(s: Settings, data_dir: os.PathLike, variants: dict | None = None) -> dict:
    """Benchmark 1: our loader vs. the reference's, plus `variants` (name → data dir or cfg edit)."""
    cfg = ours_config(s, data_dir, s.train_arch, s.pipe_img, s.pipe_item)
    epochs = {"ours": ours_epoch(cfg), "reference": reference_epoch(cfg)}
    for name, change in (variants or {}).items():
        vcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **change))
        epochs[name] = (reference_epoch if name.startswith("reference") else ours_epoch)(vcfg)
    best = race(epochs, s.repeats)
    out = _entry(best)
    if variants:
        out["variants"] = {
            name: {"img_per_s": round(n / secs, 1), "n_images": n, "seconds": round(secs, 3)}
            for name, (n, secs) in best.items()
        }
    return out
