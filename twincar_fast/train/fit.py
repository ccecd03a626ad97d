"""The staged fit of one run: head-only epochs, then the main fit, resumable from any finished epoch.

`fit_run` drives fastai's own fits (`fit_one_cycle`, or `fit` under a cosine or flat
`ParamScheduler`) with `train.callbacks.SaveRun` committing every epoch, and continues an interrupted run
from its last committed epoch: freezing, LR schedule, early stopping and plateau state included.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, SchedNo, combine_scheds
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner, ValueMetric

from twincar_fast.config import ExperimentConfig
from twincar_fast.console import EpochPrinter, quiet_if_plain
from twincar_fast.errors import TwincarError
from twincar_fast.model.learner import apply_freeze, freeze_all_but_head, lr_for
from twincar_fast.run_folder import RunFolder
from twincar_fast.train.callbacks import (
    EarlyStop,
    EpochMetrics,
    Plateau,
    SaveRun,
    monitor_comp,
    replay_tracker,
    stopped_early,
)
from twincar_fast.train.checkpoints import load_checkpoint, set_rng_state
from twincar_fast.train.distributed import distributed_fit, scaled_lr
from twincar_fast.train.recipe import EmaWeights, recipe_callbacks

__all__ = ["attach_metrics", "fit_run", "fit_schedule", "per_epoch"]


def attach_metrics(learn: Learner) -> EpochMetrics:
    """Add `EpochMetrics` and its columns as the learner's metrics (once), its `valid_loss` as
    the Recorder's: the mean over every validation image, also gathered from all ranks (fastai's
    own averages one rank's batch means)."""
    cb = getattr(learn, "epoch_metrics", None)
    if not isinstance(cb, EpochMetrics):
        cb = EpochMetrics()
        learn.add_cb(cb)
    learn.metrics = cb.metrics()
    with warnings.catch_warnings():  # fastai warns that `learn.loss` has the name too
        warnings.simplefilter("ignore", UserWarning)
        learn.recorder.loss = ValueMetric(partial(cb.value, "valid_loss"), "loss")
    return cb


def per_epoch(sched: Callable[[float], Any], n_epoch: int) -> Callable[[float], Any]:
    """`sched` (of the fit's progress, 0 → 1) held at its value at the start of each epoch."""
    # the epoch's own start: pos × n_epoch can land a hair below a whole number in floating point
    return lambda pos: sched(math.floor(pos * n_epoch + 1e-6) / n_epoch)


def fit_schedule(
    learn: Learner,
    n_epoch: int,
    lr: float | np.ndarray,
    schedule: str,
    cbs: Sequence[Callback] = (),
    start_epoch: int = 0,
    warmup_epochs: float = 0.0,
    lr_step: str = "batch",
) -> None:
    """Fit `n_epoch` epochs with fastai's one-cycle, a cosine decay or a flat LR, from `start_epoch`.

    Cosine and flat start with `warmup_epochs` of linear warm-up from lr/100 (timm's `--warmup-epochs`);
    `lr_step="epoch"` holds each epoch at the schedule's value at its start (timm's default stepping).
    """
    if schedule == "one_cycle":
        learn.fit_one_cycle(n_epoch, lr, cbs=list(cbs), start_epoch=start_epoch)
        return
    if learn.opt is None:
        learn.create_opt()
    learn.opt.set_hyper("lr", lr)
    lr = np.array([h["lr"] for h in learn.opt.hypers])
    # a ParamScheduler even for the flat LR, so that `Plateau` scales every schedule the same way
    sched = SchedCos(lr, lr / 1e5) if schedule == "cosine" else SchedNo(lr, lr)
    if warmup_epochs:
        pct = warmup_epochs / n_epoch
        sched = combine_scheds([pct, 1 - pct], [SchedLin(lr / 100, lr), sched])
    if lr_step == "epoch":
        sched = per_epoch(sched, n_epoch)
    learn.fit(n_epoch, lr, cbs=[ParamScheduler({"lr": sched}), *cbs], start_epoch=start_epoch)


def _main_trackers(cfg: ExperimentConfig, rows: list[dict]) -> list[Callback]:
    """Early stopping and LR plateau of the main fit, continuing from its earlier `rows`."""
    t = cfg.train
    values, comp = [r[t.monitor] for r in rows], monitor_comp(t.monitor)
    cbs: list[Callback] = []
    if t.early_stopping:
        cbs.append(EarlyStop(t.monitor, t.early_stopping, replay_tracker(values, comp)))
    if t.plateau_patience:
        state = replay_tracker(values, comp, t.plateau_patience, t.plateau_factor)
        cbs.append(Plateau(t.monitor, t.plateau_patience, t.plateau_factor, state))
    return cbs


def _fit_stage(
    learn: Learner,
    cfg: ExperimentConfig,
    saver: SaveRun,
    stage: str,
    n_epoch: int,
    start: int,
    resume_from: int | None,
    cbs: Sequence[Callback],
) -> None:
    """One stage (`head` or `main`) from epoch `start`: freezing, resume checkpoint, trackers."""
    if stage == "head":
        freeze_all_but_head(learn)
    else:
        apply_freeze(learn, cfg)  # (clears the optimizer state, as fastai's fine_tune does)
    rng = None
    if resume_from is not None:  # weights, and mid-stage the optimizer state, of that epoch
        rng = load_checkpoint(learn, saver.last_path(resume_from), with_opt=start > 0)
    trackers = _main_trackers(cfg, saver.rows[cfg.train.head_epochs :]) if stage == "main" else []
    lr = scaled_lr(cfg, lr_for(cfg, learn))
    if rng is not None:  # last: the next shuffle and augmentation draw as they would have
        set_rng_state(learn, rng)
    warmup = cfg.train.warmup_epochs if stage == "main" else 0.0
    cbs = [saver, *trackers, *cbs]
    fit_schedule(learn, n_epoch, lr, cfg.train.schedule, cbs, start, warmup, cfg.train.lr_step)
    _check_diverged(learn, cfg, saver)


def _check_diverged(learn: Learner, cfg: ExperimentConfig, saver: SaveRun) -> None:
    """A one-line TwincarError when the loss went NaN/inf (the fit stopped before that epoch)."""
    if learn.epoch_metrics.diverged is None:
        return
    epoch, batch, lr = learn.epoch_metrics.diverged
    kept = f"epochs 0-{len(saver.rows) - 1} are saved" if saver.rows else "no epoch was saved"
    raise TwincarError(
        f"training diverged: the loss became NaN/inf at epoch {saver.offset + epoch}, batch {batch} "
        f"(lr {lr:.3g}); {kept}; lower train.lr (now {cfg.train.lr}) and start a new run"
    )


def _saver(
    learn: Learner, cfg: ExperimentConfig, folders: RunFolder, rows: Sequence[dict]
) -> SaveRun:
    """The run's SaveRun (with the epoch table it echoes to), its stale checkpoints pruned."""
    t = cfg.train
    columns = t.console_columns
    if cfg.data.valid_pct == 0:  # no validation split: its columns would be all blanks
        columns = [c for c in columns if not c.startswith("valid_")]
    echo = EpochPrinter(t.head_epochs + t.epochs, columns)
    keep_last = t.checkpoint == "last" or cfg.data.valid_pct == 0
    metrics = attach_metrics(learn)
    saver = SaveRun(
        t.monitor, folders.ckpt_dir, folders.metrics_csv, metrics, rows, echo, keep_last
    )
    saver.prune()  # checkpoints of epochs that were never committed
    return saver


def _recipe(
    learn: Learner, cfg: ExperimentConfig, saver: SaveRun, data_dir: Path, cbs: Sequence[Callback]
) -> list[Callback]:
    """The recipe's callbacks and gradient accumulation, then `cbs`."""
    if cfg.train.grad_accum > 1:
        cbs = [GradientAccumulation(n_acc=cfg.data.batch_size * cfg.train.grad_accum), *cbs]

    def run_epoch() -> int:
        return saver.offset + learn.epoch

    return [*recipe_callbacks(cfg, learn, data_dir, run_epoch), *cbs]


def fit_run(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolder,
    done: int = 0,
    rows: Sequence[dict] = (),
    cbs: Sequence[Callback] = (),
    data_dir: Path | None = None,
) -> SaveRun:
    """The staged fit (head-only epochs, then the main fit) from epoch `done`; the run's SaveRun.

    `data_dir` (default `data.root`) is where progressive resizing rebuilds the loaders from.
    """
    t = cfg.train
    saver = _saver(learn, cfg, folders, rows)
    cbs = _recipe(learn, cfg, saver, Path(data_dir or cfg.data.root), cbs)
    # the EMA stays on the learner for the whole staged fit (resume loads its state) and goes after
    # it, so the export pickles no EMA copy and later `get_preds` see the loaded weights
    ema = EmaWeights(t.ema, t.ema_warmup) if t.ema else None
    offset, resume_from = 0, (done - 1 if done else None)
    # fastai's own epoch table off: it is 281 columns wide and its train_loss is the smoothed one
    with (
        quiet_if_plain(learn),
        learn.no_logging(),
        learn.added_cbs(ema),
        distributed_fit(learn, cfg),
    ):
        for stage, n in (("head", t.head_epochs), ("main", t.epochs)):
            start = min(max(done - offset, 0), n)
            if stage == "main" and stopped_early(saver.rows, monitor_comp(t.monitor), t):
                start = n  # early stopping had ended the fit before the run was interrupted
            if start < n:
                saver.offset = offset  # metrics.csv epochs continue across stages
                _fit_stage(learn, cfg, saver, stage, n, start, resume_from, cbs)
                resume_from = None
            offset += n
    return saver
