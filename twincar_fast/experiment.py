"""One experiment: seed → data → learner → fit → evaluate → interpret → export, in a run folder; lr_find.

A run writes `reports/<run>/` (config.yaml, env.json, classes.csv, metrics.csv, valid_preds.npz,
summary.json, the test evaluation and the report) and `models/<run>/` (learner.pkl,
model.safetensors, config.json, README.md, checkpoints/). The fit itself is `train.fit.fit_run`: every epoch is
committed by `train.callbacks.SaveRun`, so `run_experiment(cfg, resume=run_dir)` continues an
interrupted run in the same folders from its last finished epoch, optimizer state included.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback  # noqa: F401 - patches Learner.no_bar
from fastai.callback.schedule import minimum, slide, valley
from fastai.learner import Learner
from fastai.torch_core import num_distrib, set_seed

from twincar_fast.analysis.evaluate import evaluate_learner
from twincar_fast.analysis.interpret import interpret_learner
from twincar_fast.analysis.twins import copy_twins
from twincar_fast.config import ExperimentConfig, save_config, validate
from twincar_fast.console import (
    console,
    eval_bars,
    plain_output,
    print_config,
    print_paths,
    quiet_if_plain,
    step,
)
from twincar_fast.data import build_dls, check_split, ensure_dataset, print_data_summary
from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path, new_run_name, write_json
from twincar_fast.model.learner import create_learner
from twincar_fast.model.precision import device_info
from twincar_fast.ship.export import export_model
from twincar_fast.train.callbacks import SaveRun, load_checkpoint
from twincar_fast.train.distributed import (
    broadcast_object,
    check_distributed,
    distributed,
    init_distributed,
    is_main,
    leave_group,
)
from twincar_fast.train.fit import check_console_columns, check_monitor, fit_run
from twincar_fast.train.folders import missing_steps
from twincar_fast.train.runs import (
    RunFolders,
    create_run_folders,
    lock_run,
    open_resume,
    resume_point,
    write_snapshot,
)
from twincar_fast.train.trackers import check_trackers, make_trackers

__all__ = [
    "RunResult",
    "lr_find_figure",
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


def save_valid_preds(learn: Learner, path: Path) -> Path:
    """The current model's validation `probs`, `targets` and `items` (image paths) as .npz."""
    with eval_bars(learn):
        probs, targets = learn.get_preds(ds_idx=1)
    items = learn.dls.valid_ds.items
    if isinstance(items, pd.DataFrame):
        items = items["image"] if "image" in items else items.iloc[:, 0]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, probs=probs.numpy(), targets=targets.numpy(), items=np.array([str(i) for i in items])
        )
    return path


def _summary(
    cfg: ExperimentConfig, saver: SaveRun, wall: float, paths: dict[str, Path], machine: dict
) -> dict:
    """summary.json: best epoch and metrics, final metrics, timing, the machine, output paths."""
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
        "machine": machine,  # device, precision, threads: what the figures depend on
        "paths": {k: str(v) for k, v in paths.items()},
    }


def _fit_or_hint(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolders,
    resume: bool,
    cbs: Sequence[Callback],
    data_dir: Path,
) -> SaveRun:
    """`fit_run` from the run's resume point; on Ctrl-C, say how to continue."""
    done, rows = resume_point(folders) if resume else (0, [])
    try:
        return fit_run(learn, cfg, folders, done, rows, cbs, data_dir)
    except KeyboardInterrupt:
        r = folders.report_dir
        console.print(f"interrupted; continue with: twincar train {r / 'config.yaml'} --resume {r}")
        raise


def _save_outputs(
    learn: Learner, cfg: ExperimentConfig, folders: RunFolders, saver: SaveRun
) -> dict[str, Path]:
    """Export the (best) model and its validation predictions; every output path by name."""
    paths = {"report_dir": folders.report_dir, "model_dir": folders.model_dir}
    rows = saver.rows
    best = rows[saver.best_epoch] if rows and saver.best_epoch is not None else {}
    metrics = {k: v for k, v in best.items() if k.startswith("valid_") or k == "epoch"}
    with step("exporting the model"):
        paths.update(export_model(learn, folders.model_dir, cfg, metrics))
    if len(learn.dls.valid_ds):  # data.valid_pct: 0 has no validation split
        paths["valid_preds"] = save_valid_preds(learn, folders.report_dir / "valid_preds.npz")
    paths["metrics"], paths["best_checkpoint"] = folders.metrics_csv, saver.best_path
    return paths


def _check_needs(cfg: ExperimentConfig, data_dir: Path, dls) -> None:
    """Before the first epoch: what the run will need later (training batches, a test split)."""
    if len(dls.train) == 0:
        n = len(dls.train_ds)
        raise TwincarError(
            f"data.batch_size {cfg.data.batch_size} is larger than the {n} training images, so "
            f"no full batch is left to train on; set data.batch_size to at most {n}"
        )
    if cfg.eval.test:
        check_split(data_dir, "test")


def run_experiment(
    cfg: ExperimentConfig, resume: str | os.PathLike | None = None, cbs: Sequence[Callback] = ()
) -> RunResult:
    """Train one experiment end to end (or continue `resume`, an interrupted run's folder).

    Args:
        cfg: the experiment.
        resume: reports/<run> of an interrupted run with the same config: its epochs are kept;
            a run that trained but lacks its evaluation or report gets just those.
        cbs: extra fastai callbacks for the fit (loggers, ...).
    """
    start = time.perf_counter()
    validate(cfg)
    check_monitor(cfg)
    check_console_columns(cfg)
    check_trackers(cfg)
    check_distributed(cfg)
    init_distributed()  # when launched with several processes
    with ExitStack() as held:
        folders = open_resume(resume, cfg) if resume is not None else None
        if folders is not None and is_main():  # before the data and model: busy runs fail fast
            held.enter_context(lock_run(folders))
        set_seed(cfg.train.seed, reproducible=True)
        data_dir = ensure_dataset(cfg)
        dls = build_dls(cfg, data_dir)
        _check_needs(cfg, data_dir, dls)
        learn = create_learner(cfg, dls)
        if folders is None:
            folders = _new_folders(cfg)
            if is_main():
                held.enter_context(lock_run(folders))
        learn.path, learn.model_dir = folders.model_dir, "checkpoints"  # fastai's saves stay here
        machine = device_info(cfg.train, learn.dls.device)
        if distributed():
            machine["processes"] = num_distrib()
        print_config(cfg, folders.name, machine)
        print_data_summary(cfg, data_dir, dls)
        trackers, ended = (make_trackers(cfg, folders) if is_main() else []), {}
        held.callback(_finish_trackers, trackers, ended)  # also when the run fails
        if folders.finished:
            leave_group()  # nothing to train: rank 0 finishes the run alone
            if not is_main():
                return RunResult(folders.name, folders.report_dir, folders.model_dir, {}, learn)
            summary = json.loads((folders.report_dir / "summary.json").read_text())
            load_checkpoint(learn, Path(summary["paths"]["best_checkpoint"]), with_opt=False)
            paths = {k: Path(v) for k, v in summary["paths"].items()}
        else:
            trained = _train(
                learn, cfg, folders, data_dir, resume is not None, [*cbs, *trackers], start, machine
            )
            if trained is None:  # a rank other than 0: the fit was its part
                return RunResult(folders.name, folders.report_dir, folders.model_dir, {}, learn)
            summary, paths = trained
        _report(learn, cfg, folders, data_dir, paths)
        _print_result(cfg, summary, paths)
        ended["paths"] = paths  # the trackers get the outputs of a run that ended well
        return RunResult(folders.name, folders.report_dir, folders.model_dir, summary, learn)


def _new_folders(cfg: ExperimentConfig) -> RunFolders:
    """A new run's folders: claimed by rank 0, its name broadcast to the other processes."""
    name = broadcast_object(create_run_folders(cfg).name if is_main() else None)
    return RunFolders(name, Path(cfg.reports_dir) / name, Path(cfg.models_dir) / name)


def _finish_trackers(trackers: Sequence, ended: dict) -> None:
    """End every tracker's run: with the outputs after a whole run, as failed otherwise."""
    paths = ended.get("paths")
    for t in trackers:
        t.finish(paths or {}, ok=paths is not None)


def _train(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolders,
    data_dir: Path,
    resume: bool,
    cbs: Sequence[Callback],
    start: float,
    machine: dict,
) -> tuple[dict, dict[str, Path]] | None:
    """Fit, export the best model and write summary.json: (the summary, every output path).

    With several processes all of them fit; then only rank 0 goes on (the others get None).
    """
    if is_main():
        write_snapshot(cfg, folders, learn, data_dir)
    saver = _fit_or_hint(learn, cfg, folders, resume, cbs, data_dir)
    leave_group()
    if not is_main():
        return None
    load_checkpoint(learn, saver.best_path)
    paths = _save_outputs(learn, cfg, folders, saver)
    summary = _summary(cfg, saver, time.perf_counter() - start, paths, machine)
    write_json(folders.report_dir / "summary.json", summary)  # from here on the run is trained
    saver.prune(keep_last=False)  # ... and not resumable: drop the last-epoch checkpoint
    return summary, paths


def _report(
    learn: Learner, cfg: ExperimentConfig, folders: RunFolders, data_dir: Path, paths: dict
) -> None:
    """Evaluate the best model on the test split and draw the report, the steps still missing."""
    r = folders.report_dir
    missing = missing_steps(r, cfg)
    try:
        if "test evaluation" in missing:
            with step("evaluating the best model on the test split"):
                evaluate_learner(learn, data_dir, "test", r, cfg, paths.get("learner"))
        if "report" in missing:
            paths["index"] = interpret_learner(learn, cfg, r, data_dir)
            copy_twins(r, folders.model_dir)  # the app's twins, beside the exported model
    except BaseException:
        console.print(
            f"the model is saved; finish the {' and '.join(missing)} with: "
            f"twincar train {r / 'config.yaml'} --resume {r}"
        )
        raise
    if cfg.eval.test:
        paths["eval_test"] = r / "eval_test.json"
    if cfg.eval.interpret:
        paths.setdefault("index", r / "index.html")
        paths["figures"] = r / "figures"


def _print_result(cfg: ExperimentConfig, summary: dict, paths: dict[str, Path]) -> None:
    """The best epoch, the test result and the report to open, then the output paths."""
    best, took = summary["best"], f"({summary['epochs_run']} epochs, {summary['wall_time_s']:.0f}s)"
    if cfg.data.valid_pct == 0:
        line = f"kept the last epoch, {summary['best_epoch']}: no validation split {took}"
    else:
        kept = "last" if cfg.train.checkpoint == "last" else "best"
        line = (
            f"{kept} epoch {summary['best_epoch']}: {cfg.train.monitor} "
            f"{best[cfg.train.monitor]:.4f}, valid_acc {best['valid_acc']:.4f} {took}"
        )
    console.print(line, markup=False)
    if "eval_test" in paths:
        test = json.loads(Path(paths["eval_test"]).read_text())
        console.print(
            f"test split ({test['n_images']} images): acc {test['test_acc']:.4f}, "
            f"top-5 {test['test_top5']:.4f}, macro F1 {test['test_f1_macro']:.4f}",
            markup=False,
            style="bold",
        )
        if "test_acc_tta" in test:
            console.print(
                f"with TTA ({test['tta']}): acc {test['test_acc_tta']:.4f}, "
                f"top-5 {test['test_top5_tta']:.4f}, macro F1 {test['test_f1_macro_tta']:.4f}",
                markup=False,
            )
    print_paths("outputs", paths)
    if "index" in paths:
        console.print(f"open the report: {paths['index']}", markup=False, style="bold")


# ---------------------------------------------------------------- lr_find


def lr_find_figure(learn: Learner, result: dict):
    """fastai's lr_find plot, each point labelled with its name and LR as lr_find.json has them."""
    lrs = np.asarray(learn.recorder.lrs, dtype=float)
    losses = np.asarray([float(v) for v in learn.recorder.losses])
    names = {"valley": "valley", "slide": "slide", "minimum": "minimum (lowest loss)"}
    points, labels = [], []
    for key, label in names.items():
        x = result[key]
        points.append((x, float(np.interp(np.log10(x), np.log10(lrs), losses))))
        labels.append(f"{label} {x:.1e}")
    import matplotlib.pyplot as plt

    learn.recorder.plot_lr_find(suggestions=points, nms=labels)  # draws; returns no figure
    return plt.gcf()


def lr_find_report(learn: Learner, out_dir: str | os.PathLike, num_it: int = 100) -> dict:
    """fastai's `lr_find` (valley, slide, minimum) → lr_find.png + lr_find.json in `out_dir`.

    `minimum` is the LR of the lowest loss, the plot's point of that name; fastai's own
    suggestion, a tenth of it, is `minimum_div10`. Weights and optimizer state are left as they
    were (fastai restores them; the optimizer's hyper-parameters, which `fit` resets to
    `learn.lr`, are restored here too).
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hypers = copy.deepcopy(learn.opt.hypers) if learn.opt is not None else None
    old_path, old_model_dir = learn.path, learn.model_dir
    learn.path, learn.model_dir = out_dir, "."  # fastai's temporary save lands in out_dir
    try:
        with quiet_if_plain(learn):
            found = learn.lr_find(
                num_it=num_it, suggest_funcs=(valley, slide, minimum), show_plot=False
            )
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
        if not plain_output():
            console.print()  # end the line of a bar that stopped early (the loss diverged)
    result = {k: float(v) for k, v in found._asdict().items()}
    result["minimum_div10"] = result["minimum"]  # fastai's suggestion: lowest-loss LR / 10
    result["minimum"] *= 10
    fig = lr_find_figure(learn, result)
    with atomic_path(out_dir / "lr_find.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    result.update(num_it=num_it, plot=str(out_dir / "lr_find.png"))
    write_json(out_dir / "lr_find.json", result)
    return result


def run_lr_find(cfg: ExperimentConfig) -> dict:
    """`twincar lr-find`: lr_find on the configured learner, saved to reports/<name>-lrfind-<stamp>/."""
    if distributed():  # fastai's lr_find under DDP hangs (fastai #3688)
        raise TwincarError(
            "lr-find runs in one process: start `twincar lr-find CONFIG` without a launcher, then "
            "train with several"
        )
    set_seed(cfg.train.seed, reproducible=True)
    data_dir = ensure_dataset(cfg)
    learn = create_learner(cfg, build_dls(cfg, data_dir))
    reports = Path(cfg.reports_dir)
    out = reports / new_run_name(f"{cfg.name or 'run'}-lrfind", [reports])
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    result = lr_find_report(learn, out)
    console.print(
        f"lr_find: valley {result['valley']:.1e}, slide {result['slide']:.1e}, "
        f"minimum (lowest loss) {result['minimum']:.1e}, minimum/10 {result['minimum_div10']:.1e}"
        f"  (set train.lr, e.g. train.lr={result['valley']:.1e})",
        markup=False,
    )
    print_paths("outputs", {"plot": out / "lr_find.png", "suggestions": out / "lr_find.json"})
    return result
