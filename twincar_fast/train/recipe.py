"""The high-resolution recipe's fastai callbacks: weight EMA, mixup/CutMix, progressive resizing.

- `EmaWeights` keeps timm's `ModelEmaV3` of the weights, updated after every optimizer step;
  each epoch validates the EMA weights (metrics.csv's valid_* columns) and the raw ones beside
  them (`valid_acc_raw`); the best checkpoint holds the EMA weights, the last one both (resume).
- `MixBatches` mixes training batches with timm's `Mixup` (mixup and/or CutMix), whose soft
  targets carry `train.label_smoothing`, and stops `aug.mix_off_epochs` before the end.
- `ProgressiveResize` rebuilds the loaders at the epochs of `data.img_size_schedule` (and
  `data.batch_size_schedule`), keeping their shuffle state, so a resumed run lands on the same
  size and the same batches.

Epochs here are the run's (head-only epochs first, as in metrics.csv), not one fit's.
"""

from __future__ import annotations

import dataclasses
import gc
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.torch_core import get_model
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from twincar_fast.config import ExperimentConfig
from twincar_fast.data import build_dls
from twincar_fast.train.callbacks import epoch_skipped

__all__ = [
    "EmaWeights",
    "MixBatches",
    "ProgressiveResize",
    "recipe_callbacks",
    "scheduled",
]


class EmaWeights(Callback):
    """timm's ModelEmaV3 of the weights: updated every step, validated each epoch, checkpointed."""

    order = 20  # after fastai's device move (-10) and channels-last (11): the copy matches them

    def __init__(self, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.ema: ModelEmaV3 | None = None
        self.steps = 0  # optimizer steps so far in the whole run (the warm-up's clock)
        self._pending: dict | None = None  # a resumed state, applied once the copy exists
        self.active = False  # only inside fit: get_preds after the fit sees the loaded weights

    @property
    def module(self) -> torch.nn.Module:
        """The averaged model (created from the learner's model on first use)."""
        if self.ema is None:
            self.ema = ModelEmaV3(
                get_model(self.learn.model), decay=self.decay, use_warmup=self.warmup
            )
        if self._pending is not None:
            self.ema.module.load_state_dict(self._pending["module"])
            self.steps, self._pending = int(self._pending["steps"]), None
        return self.ema.module

    def state(self) -> dict:
        """What a checkpoint keeps: the averaged weights and the step count."""
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state(self, state: dict) -> None:
        """Continue from a checkpoint's `state()`."""
        self._pending = state
        if self.ema is not None:
            self.module  # noqa: B018 - applies it now

    def before_fit(self):
        self.module  # noqa: B018 - the copy is made on the model's device, in its memory format
        self.active = True

    def after_step(self):
        self.steps += 1
        self.ema.update(get_model(self.learn.model), step=self.steps)

    def before_validate(self):
        if self.active:  # validate the EMA weights; the raw model runs beside them (after_pred)
            self._raw, self._correct, self._n = self.learn.model, 0, 0
            self.learn.model = self.ema.module

    def after_pred(self):
        if self.active and not self.training and len(self.yb):
            y = self.yb[0]
            self._correct += (self._raw(*self.xb).argmax(-1) == y).sum().item()
            self._n += len(y)

    def after_validate(self):
        if self.active:
            self.learn.model = self._raw
            metrics = getattr(self.learn, "epoch_metrics", None)
            if metrics is not None and self._n:
                metrics.values["valid_acc_raw"] = self._correct / self._n

    def after_cancel_validate(self):
        if self.active:
            self.learn.model = self._raw

    def after_fit(self):
        self.active = False


class MixBatches(Callback):
    """timm's Mixup/CutMix on training batches until `aug.mix_off_epochs` before the run's end.

    The targets stay the images' own labels (train_acc is measured against them); the loss is the
    soft-target cross entropy on timm's mixed, label-smoothed targets.
    """

    order = 30  # after the batch is on the device and in its memory format

    def __init__(self, cfg: ExperimentConfig, n_classes: int, epoch_of: Callable[[], int]):
        a, t = cfg.aug, cfg.train
        self.mixup = Mixup(
            mixup_alpha=a.mixup,
            cutmix_alpha=a.cutmix,
            prob=a.mix_prob,
            label_smoothing=t.label_smoothing,
            num_classes=n_classes,
        )
        self.until = t.head_epochs + t.epochs - a.mix_off_epochs  # first epoch without mixing
        self.epoch_of, self.soft_loss = epoch_of, SoftTargetCrossEntropy()
        self.mixing, self.targets = False, None

    def before_train(self):
        self.mixing = self.epoch_of() < self.until
        if self.mixing:
            self.old_loss, self.learn.loss_func = self.learn.loss_func, self.loss

    def before_batch(self):
        if self.training and self.mixing:
            x, self.targets = self.mixup(self.xb[0], self.yb[0])
            self.learn.xb = (x,)

    def loss(self, pred: torch.Tensor, *yb) -> torch.Tensor:
        """Soft-target cross entropy against this batch's mixed targets."""
        return self.soft_loss(pred.float(), self.targets)

    def _restore(self):
        if self.mixing:
            self.learn.loss_func, self.mixing = self.old_loss, False

    def after_train(self):
        self._restore()

    def after_cancel_train(self):
        self._restore()

    def after_cancel_fit(self):
        self._restore()


def scheduled(schedule: list[list[int]], epoch: int, default: int) -> int:
    """The value a `[[epoch, value], ...]` schedule gives `epoch` (`default` without one)."""
    value = default
    for start, v in schedule:
        if epoch >= start:
            value = v
    return value


def _rng_states() -> tuple:
    """Python's, NumPy's and torch's global random states."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_states(states: tuple) -> None:
    """Undo what building loaders drew from the global random states."""
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


class ProgressiveResize(Callback):
    """Rebuild the loaders at the scheduled epochs with that image size and batch size."""

    order = -20  # before fastai's TrainEvalCallback reads the training loader's length

    def __init__(self, cfg: ExperimentConfig, data_dir: Path, epoch_of: Callable[[], int]):
        self.cfg, self.data_dir, self.epoch_of = cfg, data_dir, epoch_of
        self.current = (cfg.data.img_size, cfg.data.batch_size)  # what create_learner built

    def size_at(self, epoch: int) -> tuple[int, int]:
        """(image size, batch size) of the run's `epoch`."""
        d = self.cfg.data
        return scheduled(d.img_size_schedule, epoch, d.img_size), scheduled(
            d.batch_size_schedule, epoch, d.batch_size
        )

    def before_epoch(self):
        if epoch_skipped(self.learn):
            return
        wanted = self.size_at(self.epoch_of())
        if wanted != self.current:
            self.learn.dls = self.rebuilt(*wanted)
            self.current = wanted

    def rebuilt(self, size: int, bs: int):
        """The loaders at `size`/`bs`, continuing the current loaders' shuffle generators."""
        old = self.learn.dls
        rngs, device = [dl.rng.getstate() for dl in old.loaders], old.device
        self.learn.dls = self.learn.dl = old = None  # the old loaders' memory goes first
        gc.collect()
        data = dataclasses.replace(self.cfg.data, img_size=size, batch_size=bs)
        states = _rng_states()
        dls = build_dls(dataclasses.replace(self.cfg, data=data), self.data_dir)
        _set_rng_states(states)
        for dl, state in zip(dls.loaders, rngs, strict=False):
            dl.rng.setstate(state)
        return dls.to(device)


def recipe_callbacks(
    cfg: ExperimentConfig, learn: Learner, data_dir: Path, epoch_of: Callable[[], int]
) -> list[Callback]:
    """The fit callbacks the config switches on: mixing and progressive resizing."""
    cbs: list[Callback] = []
    if cfg.aug.mixup > 0 or cfg.aug.cutmix > 0:
        cbs.append(MixBatches(cfg, len(learn.dls.vocab), epoch_of))
    if cfg.data.img_size_schedule or cfg.data.batch_size_schedule:
        cbs.append(ProgressiveResize(cfg, data_dir, epoch_of))
    return cbs
