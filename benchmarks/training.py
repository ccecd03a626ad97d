"""Benchmarks 2 and 4, a training epoch: its wall time and peak memory, ours vs. the reference.

Each side runs in its own spawned process (so neither inherits the other's memory or warm
caches in Python), on the same rows, with the same model (`create_model`: timm body + TwinCar's
MLP head, random init), the same frozen groups, batch size, workers and image size, for two
epochs of training plus a validation pass each; the second epoch is timed (the first one pays
one-time costs: kernel set-up, first allocations) and the first is reported beside it. Each
training image is listed `train_repeat` times (a longer epoch over the same files), so that the
epoch's own work, not the start of its worker processes, is what is timed.
Ours: `build_dls` + `create_learner` + `fit_one_cycle(2)`. Reference: TwinCar's plain loop
(`reference.train_one_epoch`). Limit: the same learner (model, frozen groups, precision,
channels_last, callbacks) fed batches of random tensors already on its device, as many training
and validation images as ours: the most any loader can reach. The ratio to the limit comes from
one more process, where that one learner runs epochs on its own loaders and on the in-memory
batches in turns (`limit_turns` of each after a warm-up turn; medians): measured a minute apart
in two processes, the drift of a shared machine was larger than the gap being measured.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import fastai.callback.schedule  # noqa: F401 - patches Learner.fit_one_cycle
import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import TensorCategory, TensorImage

from benchmarks import reference
from benchmarks.data import repeated_dataset
from benchmarks.measure import Timer, compare, run_in_child
from benchmarks.pipeline import split_rows
from benchmarks.settings import Settings, ours_config
from twincar_fast.data import build_dls, resolve_device
from twincar_fast.model.learner import create_learner, create_model, param_groups


class EpochStats(Callback):
    """Wall time of each epoch (training + validation) and the images it saw."""

    order = 0

    def before_fit(self) -> None:
        self.epochs: list[dict] = []

    def before_epoch(self) -> None:
        self.epochs.append({"n_train": 0, "n_valid": 0})
        self.start = time.perf_counter()

    def before_validate(self) -> None:
        self.epochs[-1]["train_seconds"] = time.perf_counter() - self.start

    def after_batch(self) -> None:
        self.epochs[-1]["n_train" if self.training else "n_valid"] += len(self.yb[0])

    def after_epoch(self) -> None:
        self.epochs[-1]["seconds"] = time.perf_counter() - self.start


def train_config(s: Settings, data_dir: str):
    """Our config for the epoch: the frozen groups stay wholly frozen, BatchNorm too.

    The recipe's `train_bn: true` would train the frozen groups' BatchNorm weights, so the
    backward pass would run down to layer1 while TwinCar's stops at layer3: not the same work.
    """
    cfg = ours_config(s, data_dir, s.train_arch, s.train_img, s.train_item)
    cfg.train = dataclasses.replace(cfg.train, train_bn=False)
    return cfg


def ours_train_epoch(s: Settings, data_dir: str) -> dict:
    """Two epochs of our `Learner`; the second one's figures (runs in the child process)."""
    torch.manual_seed(42)
    cfg = train_config(s, data_dir)
    learn = create_learner(cfg, build_dls(cfg))
    stats = EpochStats()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, learn.lr, cbs=stats)
    first, second = stats.epochs
    return {**second, "first_seconds": first["seconds"]}


def memory_dl(n_images: int, bs: int, size: int, n_classes: int, device) -> DataLoader:
    """A fastai loader of `n_images` random normalized images on `device`, in batches of `bs`."""
    x = TensorImage(torch.randn(bs, 3, size, size, device=device))
    y = TensorCategory(torch.randint(0, n_classes, (bs,), device=device))
    sizes = [bs] * (n_images // bs) + ([n_images % bs] if n_images % bs else [])
    batches = [(x[:k], y[:k]) for k in sizes]
    return DataLoader(batches, bs=None, device=None)  # pre-batched: served as they are


def _one_epoch(learn, dls: DataLoaders) -> dict:
    """One `fit_one_cycle(1)` of `learn` on `dls`: its EpochStats."""
    learn.dls = dls
    stats = EpochStats()
    learn.fit_one_cycle(1, learn.lr, cbs=stats)
    return stats.epochs[0]


def turns_train_epoch(s: Settings, data_dir: str) -> dict:
    """Our learner's epochs on its own loaders and on in-memory random batches, in turns (in the
    child): one model, optimizer and process, so only the loader differs between the two and a
    change of the machine's speed hits both alike. The first turn warms both up, untimed."""
    torch.manual_seed(42)
    cfg = train_config(s, data_dir)
    dls = build_dls(cfg)
    learn = create_learner(cfg, dls)
    n_train, n_valid = len(dls.train) * dls.train.bs, len(dls.valid_ds)
    args = (cfg.data.batch_size, cfg.data.img_size, len(dls.vocab), dls.device)
    memory = DataLoaders(memory_dl(n_train, *args), memory_dl(n_valid, *args), device=None)
    turns: dict[str, list[dict]] = {"ours": [], "limit": []}
    with learn.no_bar(), learn.no_logging():
        for turn in range(s.limit_turns + 1):
            for side, side_dls in (("ours", dls), ("limit", memory)):
                epoch = _one_epoch(learn, side_dls)
                if turn:
                    turns[side].append(epoch)
    return turns


def _to_limit(turns: dict[str, list[dict]]) -> dict:
    """The JSON of the turns: each side's median epoch and their ratio (limit / ours)."""
    sides = {k: turns[k] for k in ("ours", "limit")}  # the child's result also holds its memory
    med = {k: round(statistics.median(e["seconds"] for e in v), 3) for k, v in sides.items()}
    return {
        "limit": med["limit"],
        "ratio_to_limit": round(med["limit"] / med["ours"], 3),
        "limit_turns": {
            "what": "our learner's epochs, its own loaders and in-memory batches in turns, "
            "one process; medians",
            "ours": med["ours"],
            "limit": med["limit"],
            "ours_seconds": [round(e["seconds"], 3) for e in turns["ours"]],
            "limit_seconds": [round(e["seconds"], 3) for e in turns["limit"]],
            "train_only": {
                k: round(statistics.median(e["train_seconds"] for e in v), 3)
                for k, v in sides.items()
            },
            "valid_only": {  # the validation pass apart: it must not be what holds a GPU back
                k: round(statistics.median(e["seconds"] - e["train_seconds"] for e in v), 3)
                for k, v in sides.items()
            },
        },
    }


def reference_train_epoch(s: Settings, data_dir: str) -> dict:
    """One epoch of TwinCar's plain PyTorch loop on the same model and rows (in the child)."""
    torch.manual_seed(42)
    cfg = train_config(s, data_dir)
    df = split_rows(cfg)
    model = create_model(cfg.model, df["class_id"].nunique(), pretrained=False)
    frozen = set(cfg.train.freeze)
    for name, params in param_groups(model):
        for p in params:
            p.requires_grad_(name not in frozen)
    device = resolve_device(cfg.train.device)
    pin = device.type == "cuda"
    args = (s.train_img, s.batch_size, s.workers)
    train_dl = reference.train_loader(df[~df["is_valid"]], *args, pin_memory=pin)
    valid_dl = reference.valid_loader(df[df["is_valid"]], *args, pin_memory=pin)
    epochs = []
    for _ in range(2):
        with Timer() as t:
            stats = reference.train_one_epoch(model, train_dl, valid_dl, device=device)
        epochs.append(
            {"seconds": t.seconds, "n_train": stats["n_train"], "n_valid": stats["n_valid"]}
        )
    first, second = epochs
    return {**second, "first_seconds": first["seconds"]}


def bench_training(s: Settings, data_dir: os.PathLike) -> tuple[dict, dict]:
    """Benchmarks 2 (epoch wall time) and 4 (peak memory), each side in its own process."""
    data_dir = repeated_dataset(data_dir, s.train_repeat)
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    sides = {"ours": ours_train_epoch, "reference": reference_train_epoch}
    for _ in range(max(1, s.repeats - 1)):  # each run is a whole process; alternate the sides
        for side, fn in sides.items():
            runs[side].append(run_in_child(fn, s=s, data_dir=str(data_dir)))
    turns = run_in_child(turns_train_epoch, s=s, data_dir=str(data_dir))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    peak = {k: max(r["vm_hwm_mb"] for r in v) for k, v in runs.items()}
    tree = {k: max(r["tree_peak_mb"] for r in v) for k, v in runs.items()}
    counted = best | {"limit": turns["limit"][0]}  # the limit's count is the same every turn
    n_images = {k: {"train": r["n_train"], "valid": r["n_valid"]} for k, r in counted.items()}
    epoch = compare(
        round(best["ours"]["seconds"], 3),
        round(best["reference"]["seconds"], 3),
        "s",
        higher_is_better=False,
        n_images=n_images,
        what="second epoch (training + validation); the first one pays one-time warm-up",
        first_epoch={k: round(r["first_seconds"], 3) for k, r in best.items()},
        train_only={  # the limit's: in limit_turns
            k: round(r["train_seconds"], 3) for k, r in best.items() if "train_seconds" in r
        },
        **_to_limit(turns),
    )
    memory = compare(
        round(peak["ours"], 1),
        round(peak["reference"], 1),
        "MB",
        higher_is_better=False,
        what="VmHWM of the training process",
        with_workers={"ours": tree["ours"], "reference": tree["reference"], "unit": "MB PSS"},
    )
    return epoch, memory
