"""One experiment: seed → data → learner → fit → best weights → export, in a run folder; resume; lr_find.

A run writes `reports/<run>/` (config.yaml, env.json, classes.csv, metrics.csv, valid_preds.npz,
summary.json) and `models/<run>/` (learner.pkl, model.safetensors, model.json, checkpoints/). Every
epoch is committed by `callbacks.SaveRun`, so `run_experiment(cfg, resume=run_dir)` continues an
interrupted run in the same folders from its last finished epoch, optimizer state included.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback  # noqa: F401 - patches Learner.no_bar
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedNo, minimum, slide, valley
from fastai.callback.training import GradientAccumulation
from fastai.learner import Learner
from fastai.torch_core import set_seed

from twincar_fast.callbacks import (
    MONITORS,
    EarlyStop,
    EpochMetrics,
    Plateau,
    SaveRun,
    load_checkpoint,
    monitor_comp,
    replay_tracker,
)
from twincar_fast.config import ExperimentConfig, save_config
from twincar_fast.console import (
    console,
    plain_output,
    print_config,
    print_epoch,
    print_paths,
    quiet_if_plain,
)
from twincar_fast.data import build_dls, ensure_dataset, print_data_summary
from twincar_fast.errors import ConfigError, TwincarError
from twincar_fast.evaluate import evaluate_learner
from twincar_fast.export import export_model
from twincar_fast.files import atomic_path, new_run_name, write_json
from twincar_fast.interpret import interpret_learner
from twincar_fast.learner import apply_freeze, create_learner, freeze_all_but_head, lr_for
from twincar_fast.runs import (
    RunFolders,
    create_run_folders,
    open_resume,
    resume_point,
    write_snapshot,
)

__all__ = [
    "RunResult",
    "attach_metrics",
    "check_monitor",
    "fit_run",
    "fit_schedule",
    "lr_find_report",
    "run_experiment",
    "run_lr_find",
    "save_valid_preds",
]


@dataclass
class RunResult:
    """What `run_experiment` returns: where the run is, its summary and the trained learner."""

    name: str
    report_dir: Path
    model_dir: Path
    summary: dict
    learn: Learner | None = field(default=None, repr=False)


# ---------------------------------------------------------------- fit


def check_monitor(cfg: ExperimentConfig) -> None:
    """ConfigError unless `train.monitor` is a validation column of metrics.csv."""
    if cfg.train.monitor not in MONITORS:
        raise ConfigError(
            f"train.monitor: {cfg.train.monitor!r} is not a validation metric; "
            f"use one of {', '.join(MONITORS)}"
        )


def attach_metrics(learn: Learner) -> EpochMetrics:
    """Add `EpochMetrics` and its columns as the learner's metrics (once)."""
    cb = getattr(learn, "epoch_metrics", None)
    if not isinstance(cb, EpochMetrics):
        cb = EpochMetrics()
        learn.add_cb(cb)
    learn.metrics = cb.metrics()
    return cb


def fit_schedule(
    learn: Learner,
    n_epoch: int,
    lr: float | np.ndarray,
    schedule: str,
    cbs: Sequence[Callback] = (),
    start_epoch: int = 0,
) -> None:
    """Fit `n_epoch` epochs with fastai's one-cycle, a cosine decay or a flat LR, from `start_epoch`."""
    if schedule == "one_cycle":
        learn.fit_one_cycle(n_epoch, lr, cbs=list(cbs), start_epoch=start_epoch)
        return
    if learn.opt is None:
        learn.create_opt()
    learn.opt.set_hyper("lr", lr)
    lr = np.array([h["lr"] for h in learn.opt.hypers])
    # a ParamScheduler even for the flat LR, so that `Plateau` scales every schedule the same way
    sched = SchedCos(lr, lr / 1e5) if schedule == "cosine" else SchedNo(lr, lr)
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


def _stopped_early(cfg: ExperimentConfig, rows: list[dict]) -> bool:
    """Whether the main fit's rows already reached the early-stopping patience."""
    t = cfg.train
    values = [r[t.monitor] for r in rows if r["epoch"] >= t.head_epochs]
    state = replay_tracker(values, monitor_comp(t.monitor))
    return bool(t.early_stopping and values and state.wait >= t.early_stopping)


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
    if resume_from is not None:  # weights, and mid-stage the optimizer state, of that epoch
        load_checkpoint(learn, saver.last_path(resume_from), with_opt=start > 0)
    trackers = _main_trackers(cfg, saver.rows[cfg.train.head_epochs :]) if stage == "main" else []
    lr = lr_for(cfg, learn)
    fit_schedule(learn, n_epoch, lr, cfg.train.schedule, [saver, *trackers, *cbs], start)


def fit_run(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolders,
    done: int = 0,
    rows: Sequence[dict] = (),
    cbs: Sequence[Callback] = (),
) -> SaveRun:
    """The staged fit (head-only epochs, then the main fit) from epoch `done`; the run's SaveRun."""
    t = cfg.train
    total = t.head_epochs + t.epochs
    echo = (lambda row: print_epoch(row, total)) if plain_output() else None
    metrics = attach_metrics(learn)
    saver = SaveRun(t.monitor, folders.ckpt_dir, folders.metrics_csv, metrics, rows, echo)
    saver.prune()  # checkpoints of epochs that were never committed
    if t.grad_accum > 1:
        cbs = [GradientAccumulation(n_acc=cfg.data.batch_size * t.grad_accum), *cbs]
    offset, resume_from = 0, (done - 1 if done else None)
    with quiet_if_plain(learn):
        for stage, n in (("head", t.head_epochs), ("main", t.epochs)):
            start = min(max(done - offset, 0), n)
            if stage == "main" and _stopped_early(cfg, saver.rows):
                start = n  # early stopping had ended the fit before the run was interrupted
            if start < n:
                saver.offset = offset  # metrics.csv epochs continue across stages
                _fit_stage(learn, cfg, saver, stage, n, start, resume_from, cbs)
                resume_from = None
            offset += n
    return saver


def save_valid_preds(learn: Learner, path: Path) -> Path:
    """The current model's validation `probs`, `targets` and `items` (image paths) as .npz."""
    with quiet_if_plain(learn):
        probs, targets = learn.get_preds(ds_idx=1)
    items = learn.dls.valid_ds.items
    if isinstance(items, pd.DataFrame):
        items = items["image"] if "image" in items else items.iloc[:, 0]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, probs=probs.numpy(), targets=targets.numpy(), items=np.array([str(i) for i in items])
        )
    return path


# ---------------------------------------------------------------- the experiment


def _summary(cfg: ExperimentConfig, saver: SaveRun, wall: float, paths: dict[str, Path]) -> dict:
    """summary.json: best epoch and metrics, final metrics, timing, output paths."""
    rows, m = saver.rows, saver.epoch_metrics
    total = cfg.train.head_epochs + cfg.train.epochs
    return {
        "run": paths["report_dir"].name,
        "monitor": cfg.train.monitor,
        "best_epoch": saver.best_epoch,
        "best_value": saver.best,
        "best": rows[saver.best_epoch],
        "final": rows[-1],
        "epochs_run": len(rows),
        "epochs_planned": total,
        "stopped_early": len(rows) < total,
        "wall_time_s": round(wall, 2),
        "train_images_per_s": round(m.train_images / m.train_seconds, 2)
        if m.train_seconds
        else None,
        "paths": {k: str(v) for k, v in paths.items()},
    }


def _fit_or_hint(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolders,
    resume: bool,
    cbs: Sequence[Callback],
) -> SaveRun:
    """`fit_run` from the run's resume point; on Ctrl-C, say how to continue."""
    done, rows = resume_point(folders) if resume else (0, [])
    try:
        return fit_run(learn, cfg, folders, done, rows, cbs)
    except KeyboardInterrupt:
        r = folders.report_dir
        console.print(f"interrupted; continue with: twincar train {r / 'config.yaml'} --resume {r}")
        raise


def _save_outputs(
    learn: Learner, cfg: ExperimentConfig, folders: RunFolders, saver: SaveRun
) -> dict[str, Path]:
    """Export the (best) model and its validation predictions; every output path by name."""
    paths = {"report_dir": folders.report_dir, "model_dir": folders.model_dir}
    paths.update(export_model(learn, folders.model_dir, cfg))
    paths["valid_preds"] = save_valid_preds(learn, folders.report_dir / "valid_preds.npz")
    paths["metrics"], paths["best_checkpoint"] = folders.metrics_csv, saver.best_path
    return paths


def run_experiment(
    cfg: ExperimentConfig, resume: str | os.PathLike | None = None, cbs: Sequence[Callback] = ()
) -> RunResult:
    """Train one experiment end to end (or continue `resume`, an interrupted run's folder).

    Args:
        cfg: the experiment.
        resume: reports/<run> of an interrupted run with the same config: its epochs are kept.
        cbs: extra fastai callbacks for the fit (loggers, ...).
    """
    start = time.perf_counter()
    check_monitor(cfg)
    folders = open_resume(resume, cfg) if resume is not None else None
    set_seed(cfg.train.seed, reproducible=True)
    data_dir = ensure_dataset(cfg)
    dls = build_dls(cfg, data_dir)
    learn = create_learner(cfg, dls)
    folders = folders or create_run_folders(cfg)
    learn.path, learn.model_dir = folders.model_dir, "checkpoints"  # fastai's own saves stay here
    print_config(cfg, folders.name)
    print_data_summary(cfg, data_dir, dls)
    write_snapshot(cfg, folders, learn, data_dir)
    saver = _fit_or_hint(learn, cfg, folders, resume is not None, cbs)
    load_checkpoint(learn, saver.best_path)
    paths = _save_outputs(learn, cfg, folders, saver)
    summary = _summary(cfg, saver, time.perf_counter() - start, paths)
    write_json(folders.report_dir / "summary.json", summary)  # from here on the run is finished
    saver.prune(keep_last=False)  # ... and not resumable: drop the last-epoch checkpoint
    _report(learn, cfg, folders.report_dir, data_dir, paths)
    _print_result(cfg, summary, paths)
    return RunResult(folders.name, folders.report_dir, folders.model_dir, summary, learn)


def _report(
    learn: Learner, cfg: ExperimentConfig, report_dir: Path, data_dir: Path, paths: dict
) -> None:
    """Evaluate the best model on the test split and draw the report, as the config asks."""
    if cfg.eval.test:
        evaluate_learner(learn, data_dir, "test", report_dir, cfg, paths.get("learner"))
    if cfg.eval.interpret:
        paths["index"] = interpret_learner(learn, cfg, report_dir, data_dir)


def _print_result(cfg: ExperimentConfig, summary: dict, paths: dict[str, Path]) -> None:
    """The best epoch in one line, then the output paths."""
    console.print(
        f"best epoch {summary['best_epoch']}: {cfg.train.monitor} {summary['best_value']:.4f}, "
        f"valid_acc {summary['best']['valid_acc']:.4f} ({summary['epochs_run']} epochs, "
        f"{summary['wall_time_s']:.0f}s)"
    )
    print_paths("outputs", paths)


# ---------------------------------------------------------------- lr_find


def lr_find_report(learn: Learner, out_dir: str | os.PathLike, num_it: int = 100) -> dict:
    """fastai's `lr_find` (valley, slide, minimum) → lr_find.png + lr_find.json in `out_dir`.

    Weights and optimizer state are left as they were (fastai restores them; the optimizer's
    hyper-parameters, which `fit` resets to `learn.lr`, are restored here too).
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hypers = copy.deepcopy(learn.opt.hypers) if learn.opt is not None else None
    old_path, old_model_dir = learn.path, learn.model_dir
    learn.path, learn.model_dir = out_dir, "."  # fastai's temporary save lands in out_dir
    try:
        with quiet_if_plain(learn):
            found = learn.lr_find(num_it=num_it, suggest_funcs=(valley, slide, minimum))
    except IndexError:  # fastai's suggestions need about 20 recorded steps
        n = len(learn.recorder.losses)
        raise TwincarError(
            f"lr_find: only {n} steps before the loss diverged, too few to suggest an LR; "
            "try again with more steps or a smaller batch size"
        ) from None
    finally:
        learn.path, learn.model_dir = old_path, old_model_dir
        if hypers is not None:
            learn.opt.hypers = hypers
    fig = plt.gcf()
    with atomic_path(out_dir / "lr_find.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    result = {k: float(v) for k, v in found._asdict().items()}  # minimum = lowest-loss LR / 10
    result.update(num_it=num_it, plot=str(out_dir / "lr_find.png"))
    write_json(out_dir / "lr_find.json", result)
    return result


def run_lr_find(cfg: ExperimentConfig) -> dict:
    """`twincar lr-find`: lr_find on the configured learner, saved to reports/<name>-lrfind-<stamp>/."""
    set_seed(cfg.train.seed, reproducible=True)
    data_dir = ensure_dataset(cfg)
    learn = create_learner(cfg, build_dls(cfg, data_dir))
    reports = Path(cfg.reports_dir)
    out = reports / new_run_name(f"{cfg.name or 'run'}-lrfind", [reports])
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    result = lr_find_report(learn, out)
    console.print(
        f"lr_find: valley {result['valley']:.2e}, slide {result['slide']:.2e}, "
        f"minimum/10 {result['minimum']:.2e}  (set train.lr, e.g. train.lr={result['valley']:.1e})"
    )
    print_paths("outputs", {"plot": out / "lr_find.png", "suggestions": out / "lr_find.json"})
    return result
