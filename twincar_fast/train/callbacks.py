"""Small fastai callbacks the recipe needs: the metric table per epoch, run saving, resumable trackers.

- `EpochMetrics` gathers each epoch's predictions and computes TwinCar's table once per epoch with
  scikit-learn (`metrics.classification_metrics`); thin fastai `ValueMetric`s show every column in
  fastai's progress table and make them monitorable by the trackers.
- `SaveRun` commits each finished epoch: best weights, last checkpoint with the optimizer
  (`train.checkpoints`), then the metrics.csv row, so an interrupted run always resumes from a consistent epoch.
- `EarlyStop` and `Plateau` are fastai's trackers that know which metrics are "lower is better",
  continue from a saved state on resume, and (for the plateau) also work under an LR schedule.

Epochs skipped by fastai's `SkipToEpoch` (the `start_epoch` of a resumed fit) are ignored by all.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import EarlyStoppingCallback, ReduceLROnPlateau, TrackerCallback
from fastai.learner import Learner, Recorder, ValueMetric

from twincar_fast.analysis.metrics import classification_metrics
from twincar_fast.config import TrainConfig
from twincar_fast.config_rules import METRICS_COLUMNS, MONITORS, VALID_COLUMNS
from twincar_fast.files import write_csv
from twincar_fast.run_folder import BEST_CKPT, CKPT_GLOB, LAST_CKPT
from twincar_fast.train.checkpoints import rng_state, save_checkpoint
from twincar_fast.train.distributed import is_main, rank_tag, sum_across

__all__ = [
    "MONITORS",
    "METRICS_COLUMNS",
    "EarlyStop",
    "EpochMetrics",
    "Plateau",
    "SaveRun",
    "TrackerState",
    "epoch_skipped",
    "monitor_comp",
    "replay_tracker",
    "stopped_early",
]

_LOWER_IS_BETTER = {"train_loss", "valid_loss", "valid_hamming"}


def monitor_comp(monitor: str) -> Callable:
    """`np.less` for losses and Hamming loss, `np.greater` for scores (fastai's `comp`)."""
    return np.less if monitor in _LOWER_IS_BETTER else np.greater


def epoch_skipped(learn: Learner) -> bool:
    """True during the epochs a resumed fit skips (fastai's `SkipToEpoch` of `start_epoch`)."""
    skip = getattr(learn, "skip_to_epoch", None)
    return skip is not None and learn.epoch < getattr(skip, "_skip_to", 0)


# ---------------------------------------------------------------- per-epoch metrics


class EpochMetrics(Callback):
    """Train loss/accuracy and TwinCar's validation table, computed once per epoch."""

    order = Recorder.order - 5  # values must be ready before the Recorder reads the metrics

    def __init__(self):
        self.values: dict[str, float] = {}
        self.probs: np.ndarray | None = None
        self.targets: np.ndarray | None = None
        self.train_images, self.train_seconds = 0, 0.0
        self.diverged: tuple[int, int, float] | None = None  # (epoch, batch, lr) of a NaN/inf loss

    def metrics(self) -> list[ValueMetric]:
        """fastai metrics (train_acc, valid_acc, ...) whose values this callback computes."""
        return [ValueMetric(partial(self.value, n), n) for n in ["train_acc", *VALID_COLUMNS]]

    def value(self, name: str) -> float:
        """The latest value of column `name` (nan before it is computed)."""
        return self.values.get(name, float("nan"))

    def before_fit(self):
        self.values, self.diverged = {}, None

    def before_train(self):
        self._n, self._correct, self._loss = 0, 0, 0.0
        self._finite, self._good = True, 0  # all losses finite so far; batches before the first bad
        self._start = time.perf_counter()

    def before_validate(self):
        self._probs, self._targets, self._losses = [], [], []

    def after_batch(self):
        if not len(self.yb):
            return
        y = self.yb[0]
        if self.training:  # tensors stay on the device: no sync per batch
            self._n += len(y)
            self._correct = self._correct + (self.pred.argmax(-1) == y).sum()
            self._loss = self._loss + self.loss.detach().float().mean() * len(y)
            self._finite = torch.isfinite(self.loss.detach()).all() & self._finite
            self._good = self._good + self._finite.int()
            self._size = self.xb[0].shape[
                -1
            ]  # the side this epoch trains at (progressive resizing)
        else:  # `learn.to_detach`: with several processes, every rank's items, padding dropped
            probs = torch.softmax(self.pred.detach().float(), -1)
            self._probs.append(self.learn.to_detach(probs))
            self._targets.append(self.learn.to_detach(y))
            self._losses.append(self.learn.to_detach(self._item_losses()))

    def _item_losses(self) -> torch.Tensor:
        """This validation batch's loss per image (averaged, the gathered `valid_loss`)."""
        with self.learn.loss_not_reduced():
            return self.learn.loss_func(self.pred.detach(), *self.yb).float().reshape(-1)

    def after_train(self):
        # one sync per epoch, over every rank's batches when several processes train (so all
        # ranks stop alike on a NaN loss, before validating it)
        bad = ~torch.as_tensor(self._finite)
        n, correct, loss, bad = sum_across([self._n, self._correct, self._loss, bad])
        if n and bad:
            self.diverged = (self.epoch, int(self._good), float(self.opt.hypers[-1]["lr"]))
            raise CancelFitException()
        if n:
            self.values["train_loss"] = loss / n
            self.values["train_acc"] = correct / n
            self.values["img_size"] = int(self._size)
            self.train_images += int(n)
            self.train_seconds += time.perf_counter() - self._start

    def after_validate(self):
        if not getattr(self, "_targets", None):
            return  # validation cancelled (lr_find) or empty
        self.probs = torch.cat(self._probs).numpy()
        self.targets = torch.cat(self._targets).numpy()
        self.values["valid_loss"] = float(torch.cat(self._losses).mean())
        table = classification_metrics(self.targets, self.probs)
        self.values.update({f"valid_{k}": v for k, v in table.items()})
        if (
            getattr(self.learn, "ema_weights", None) is None
        ):  # else EmaWeights measured the raw ones
            self.values["valid_acc_raw"] = self.values["valid_acc"]
        self._probs, self._targets, self._losses = [], [], []


# ---------------------------------------------------------------- trackers


@dataclass
class TrackerState:
    """Where a tracker stands after some epochs: best value and epoch, epochs waited, LR scale."""

    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    scale: float = 1.0


def _quietly(step: Callable[[], None]) -> None:
    """Run a fastai tracker's `after_epoch`, its own print silenced (ours names the monitor)."""
    with redirect_stdout(io.StringIO()):
        step()


def replay_tracker(
    values: list[float], comp: Callable, patience: int = 0, factor: float = 1.0
) -> TrackerState:
    """A monitor's history replayed through fastai's own trackers (for resume): the plateau's when
    `patience` and `factor` reduce the LR, else early stopping's (which never stops here)."""
    if patience and factor != 1.0:
        cb = ReduceLROnPlateau(comp=comp, patience=patience, factor=factor)
    else:
        cb = EarlyStoppingCallback(comp=comp, patience=math.inf)
    recorder, opt = SimpleNamespace(values=[]), SimpleNamespace(hypers=[{"lr": 1.0}])
    cb.learn = SimpleNamespace(recorder=recorder, opt=opt, epoch=0)
    cb.best, cb.idx, cb.wait, best_epoch = (math.inf if comp is np.less else -math.inf), 0, 0, None
    for epoch, value in enumerate(values):
        recorder.values, cb.learn.epoch = [[value]], epoch
        _quietly(cb.after_epoch)
        best_epoch = epoch if cb.new_best else best_epoch
    best = None if best_epoch is None else float(cb.best)
    return TrackerState(best, best_epoch, cb.wait, opt.hypers[0]["lr"])


def stopped_early(rows: list[dict], comp: Callable, train: TrainConfig) -> bool:
    """Whether the main fit's metrics.csv `rows` already reached the early-stopping patience."""
    values = [r[train.monitor] for r in rows if r["epoch"] >= train.head_epochs]
    state = replay_tracker(values, comp)
    return bool(train.early_stopping and values and state.wait >= train.early_stopping)


class SaveRun(TrackerCallback):
    """Commits each epoch: best weights (on improvement), last checkpoint, then the metrics.csv row.

    With `keep_last` every epoch counts as the best: the run keeps its last epoch (`train.checkpoint:
    last`, and always without a validation split, where there is nothing to monitor).
    """

    order = TrackerCallback.order + 1  # after the Recorder, before early stopping may end the fit

    def __init__(
        self,
        monitor: str,
        ckpt_dir: Path,
        metrics_csv: Path,
        metrics: EpochMetrics,
        rows: list[dict] | None = None,
        echo: Callable[[dict], None] | None = None,
        keep_last: bool = False,
    ):
        super().__init__(monitor=monitor, comp=monitor_comp(monitor), reset_on_fit=False)
        self.ckpt_dir, self.metrics_csv, self.epoch_metrics = ckpt_dir, metrics_csv, metrics
        self.rows = list(rows or [])
        self.echo, self.keep_last = echo, keep_last
        past = replay_tracker([r[monitor] for r in self.rows], self.comp)
        self.best, self.best_epoch = past.best, past.best_epoch
        if keep_last and self.rows:
            self.best, self.best_epoch = self.rows[-1][monitor], self.rows[-1]["epoch"]
        self.offset = 0  # epochs of earlier stages (staged fit): metrics.csv numbers continue

    @property
    def best_path(self) -> Path | None:
        """The best epoch's checkpoint."""
        return (
            None if self.best_epoch is None else self.ckpt_dir / BEST_CKPT.format(self.best_epoch)
        )

    def last_path(self, epoch: int) -> Path:
        """The checkpoint saved at the end of `epoch` (for resume)."""
        return self.ckpt_dir / LAST_CKPT.format(epoch)

    def before_epoch(self):
        self._start = time.perf_counter()

    def after_epoch(self):
        if epoch_skipped(self.learn):
            return
        epoch, main = self.offset + self.epoch, is_main()  # every rank decides, rank 0 writes
        if self.keep_last or self._improved():
            self.best_epoch = epoch
            if main:
                save_checkpoint(self.learn, self.best_path, best=True)
        rng = rng_state(self.learn)  # on every rank: each one's streams are saved
        if main:
            save_checkpoint(self.learn, self.last_path(epoch), rng=rng)
        self.rows.append(self._row(epoch))
        if main:
            write_csv(self.metrics_csv, pd.DataFrame(self.rows, columns=METRICS_COLUMNS))
        self.prune()
        if self.echo is not None and main:
            self.echo(self.rows[-1])

    def _improved(self) -> bool:
        """fastai's tracker update for this epoch: whether the monitor reached a new best."""
        super().after_epoch()
        return bool(self.new_best)

    def _row(self, epoch: int) -> dict:
        """This epoch's metrics.csv row."""
        valid_loss = self.recorder.values[-1][self.recorder.metric_names.index("valid_loss") - 1]
        row = {c: self.epoch_metrics.value(c) for c in METRICS_COLUMNS}
        row.update(epoch=epoch, valid_loss=float("nan" if valid_loss is None else valid_loss))
        row.update(lr=float(self.opt.hypers[-1]["lr"]), time_s=time.perf_counter() - self._start)
        return row

    def prune(self, keep_last: bool = True) -> None:
        """Delete checkpoints other than the best and (if `keep_last`) the newest last one."""
        if not is_main():
            return  # rank 0's files
        keep = {self.best_path}
        if keep_last and self.rows:
            keep.add(self.last_path(self.rows[-1]["epoch"]))
        for p in self.ckpt_dir.glob(CKPT_GLOB):
            if p not in keep:
                p.unlink(missing_ok=True)

    def after_fit(self):
        self.run = True  # the best weights are loaded once after every stage (train.load_best)


class _Resumed(TrackerCallback):
    """A fastai tracker with TwinCar's monitor direction that continues from a replayed state
    (the best so far, epochs waited) and leaves out the epochs a resumed fit skips."""

    def __init__(self, monitor: str, state: TrackerState | None, **kwargs):
        super().__init__(monitor=monitor, comp=monitor_comp(monitor), reset_on_fit=False, **kwargs)
        self.replayed = state or TrackerState()
        self.best = self.replayed.best

    def before_fit(self):
        super().before_fit()
        self.wait = self.replayed.wait

    def after_epoch(self):
        if not epoch_skipped(self.learn):
            _quietly(super().after_epoch)


class EarlyStop(_Resumed, EarlyStoppingCallback):
    """fastai's early stopping, continuing from a replayed state; its line names the monitor."""

    def __init__(self, monitor: str, patience: int, state: TrackerState | None = None):
        super().__init__(monitor, state, patience=patience)

    def after_epoch(self):
        try:
            super().after_epoch()
        except CancelFitException:
            print(
                f"No improvement of {self.monitor} for {self.wait} epochs: early stopping "
                f"after epoch {self.epoch} of this stage{rank_tag()}"
            )
            raise


class Plateau(_Resumed, ReduceLROnPlateau):
    """fastai's ReduceLROnPlateau that scales the scheduled LR, so it also works under a schedule.

    fastai's version divides the optimizer's LR once, which the next `ParamScheduler` step undoes;
    this one keeps that reduction as a scale applied after the scheduler sets each batch's LR.
    """

    def __init__(
        self, monitor: str, patience: int, factor: float, state: TrackerState | None = None
    ):
        super().__init__(monitor, state, patience=patience, factor=factor)
        self.scale = self.replayed.scale

    def before_batch(self):
        if self.training and self.scale != 1.0:
            for h in self.opt.hypers:
                h["lr"] *= self.scale

    def after_epoch(self):
        if epoch_skipped(self.learn):
            return
        super().after_epoch()
        if not self.new_best and self.wait == 0:  # fastai restarts the count after a reduction
            self.scale /= self.factor
            print(
                f"No improvement of {self.monitor} for {self.patience} epochs: LR ÷ {self.factor:g}"
            )
