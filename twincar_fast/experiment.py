"""One experiment: seed → data → learner → fit → evaluate → interpret → export, in a run folder.

A run writes `reports/<run>/` (config.yaml, env.json, classes.csv, metrics.csv, valid_preds.npz,
summary.json, the test evaluation and the report) and `models/<run>/` (learner.pkl,
model.safetensors, config.json, README.md, checkpoints/). The fit itself is `train.fit.fit_run`: every epoch is
committed by `train.callbacks.SaveRun`, so `run_experiment(cfg, resume=run_dir)` continues an
interrupted run in the same folders from its last finished epoch, optimizer state included.
"""

from __future__ import annotations

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
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.torch_core import num_distrib, set_seed

from twincar_fast.analysis.evaluate import evaluate_learner
from twincar_fast.analysis.interpret import interpret_learner
from twincar_fast.analysis.metrics import METRIC_NAMES
from twincar_fast.analysis.twins import copy_twins
from twincar_fast.config import ExperimentConfig, validate
from twincar_fast.console import (
    console,
    eval_bars,
    print_config,
    print_paths,
    step,
)
from twincar_fast.data import build_dls, check_split, ensure_dataset, print_data_summary
from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path, write_json
from twincar_fast.model.learner import create_learner
from twincar_fast.model.precision import device_info
from twincar_fast.run_folder import (
    CKPT_DIR,
    RunFolder,
    create_run_folder,
    lock_run,
    open_resume,
    read_json,
)
from twincar_fast.ship.card import record_results
from twincar_fast.ship.export import export_model
from twincar_fast.train.callbacks import SaveRun
from twincar_fast.train.checkpoints import load_checkpoint
from twincar_fast.train.distributed import (
    broadcast_object,
    check_distributed,
    distributed,
    init_distributed,
    is_main,
    leave_group,
)
from twincar_fast.train.fit import fit_run
from twincar_fast.train.lr_find import lr_find_figure, lr_find_report, run_lr_find
from twincar_fast.train.runs import resume_point, write_snapshot
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


def kept_because(cfg: ExperimentConfig) -> str:
    """Why a run keeps the epoch it keeps: the words of summary.json, the report and the card."""
    if cfg.data.valid_pct == 0:
        return "the last epoch, as there is no validation split (data.valid_pct: 0) to choose by"
    if cfg.train.checkpoint == "last":
        return "the last epoch (train.checkpoint: last)"
    return f"the best {cfg.train.monitor} on the validation split (train.monitor)"


def _finite(row: dict) -> dict:
    """A metrics.csv row without its empty (NaN) columns: no validation split, no EMA, ..."""
    return {k: v for k, v in row.items() if not (isinstance(v, float) and not np.isfinite(v))}


def _summary(
    cfg: ExperimentConfig, saver: SaveRun, wall: float, paths: dict[str, Path], machine: dict
) -> dict:
    """summary.json: the kept epoch and why, its metrics, final metrics, timing, the machine, paths."""
    rows, m, kept = saver.rows, saver.epoch_metrics, saver.best_epoch
    total = cfg.train.head_epochs + cfg.train.epochs
    judged = {}  # without a validation split no epoch is judged: no monitor, no best value
    if cfg.data.valid_pct > 0:
        judged = {"monitor": cfg.train.monitor, "best_value": rows[kept].get(cfg.train.monitor)}
    return {
        "run": paths["report_dir"].name,
        "kept_epoch": kept,
        "kept_because": kept_because(cfg),
        **judged,
        "best_epoch": kept,
        "best": _finite(rows[kept]),
        "final": _finite(rows[-1]),
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


def _record_test(cfg: ExperimentConfig, folders: RunFolder, summary: dict) -> dict:
    """The test split's headline into summary.json, and the kept epoch and test metrics into
    the model card, once the run is evaluated; the summary."""
    test = read_json(folders.eval_json("test"))
    if test:
        keys = ("acc", "top5", "f1_macro", "loss")
        summary["test"] = {"n_images": test["n_images"], **{k: test[f"test_{k}"] for k in keys}}
        write_json(folders.summary_json, summary)
    results = {
        "epoch": summary.get("kept_epoch", summary["best_epoch"]),  # (runs of older versions)
        "kept_because": summary.get("kept_because") or kept_because(cfg),
    }
    names = ["loss", *METRIC_NAMES]
    results.update({f"test_{n}": test[f"test_{n}"] for n in names if f"test_{n}" in test})
    if test:
        results["test_images"] = test["n_images"]
    if folders.config_json.is_file():
        record_results(folders.model_dir, results)
    return summary


def _fit_or_hint(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolder,
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
        console.print(
            f"interrupted; continue with: twincar train {folders.config_yaml} --resume {r}"
        )
        raise


def _save_outputs(
    learn: Learner, cfg: ExperimentConfig, folders: RunFolder, saver: SaveRun
) -> dict[str, Path]:
    """Export the (best) model and its validation predictions; every output path by name."""
    paths = {"report_dir": folders.report_dir, "model_dir": folders.model_dir}
    rows = saver.rows
    best = rows[saver.best_epoch] if rows and saver.best_epoch is not None else {}
    metrics = {k: v for k, v in _finite(best).items() if k.startswith("valid_") or k == "epoch"}
    with step("exporting the model"):
        paths.update(export_model(learn, folders.model_dir, cfg, metrics))
    if len(learn.dls.valid_ds):  # data.valid_pct: 0 has no validation split
        paths["valid_preds"] = save_valid_preds(learn, folders.valid_preds_npz)
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
    _check_config(cfg)
    init_distributed()  # when launched with several processes
    with ExitStack() as held:
        folders = open_resume(resume, cfg) if resume is not None else None
        if folders is not None and is_main():  # before the data and model: busy runs fail fast
            held.enter_context(lock_run(folders))
        data_dir, dls, learn = _data_and_learner(cfg)
        if folders is None:
            folders = _new_folders(cfg)
            if is_main():
                held.enter_context(lock_run(folders))
        machine = _machine(learn, cfg, folders, data_dir, dls)
        trackers, ended = (make_trackers(cfg, folders) if is_main() else []), {}
        held.callback(_finish_trackers, trackers, ended)  # also when the run fails
        resumed, cbs = resume is not None, [*cbs, *trackers]
        trained = _train(learn, cfg, folders, data_dir, resumed, cbs, start, machine)
        if trained is None:  # a rank other than 0: the fit was its part
            return RunResult(folders.name, folders.report_dir, folders.model_dir, {}, learn)
        summary, paths = trained
        _report(learn, cfg, folders, data_dir, paths, summary)
        summary = _record_test(cfg, folders, summary)
        _print_result(cfg, summary, paths)
        ended["paths"] = paths  # the trackers get the outputs of a run that ended well
        return RunResult(folders.name, folders.report_dir, folders.model_dir, summary, learn)


def _check_config(cfg: ExperimentConfig) -> None:
    """Every rule of the config, before the data set and the model load."""
    validate(cfg)  # train.monitor and console_columns too (config_rules)
    check_trackers(cfg)
    check_distributed(cfg)


def _data_and_learner(cfg: ExperimentConfig) -> tuple[Path, DataLoaders, Learner]:
    """Seeded: the data set's folder, its loaders (checked for what the run needs), the learner."""
    set_seed(cfg.train.seed, reproducible=True)
    data_dir = ensure_dataset(cfg)
    dls = build_dls(cfg, data_dir)
    _check_needs(cfg, data_dir, dls)
    return data_dir, dls, create_learner(cfg, dls)


def _new_folders(cfg: ExperimentConfig) -> RunFolder:
    """A new run's folders: claimed by rank 0, its name broadcast to the other processes."""
    return RunFolder.of(cfg, broadcast_object(create_run_folder(cfg).name if is_main() else None))


def _machine(
    learn: Learner, cfg: ExperimentConfig, folders: RunFolder, data_dir: Path, dls: DataLoaders
) -> dict:
    """Point fastai's saves into the run's checkpoints, print the setup; the machine it runs on."""
    learn.path, learn.model_dir = folders.model_dir, CKPT_DIR  # fastai's saves stay here
    machine = device_info(cfg.train, learn.dls.device)
    if distributed():
        machine["processes"] = num_distrib()
    print_config(cfg, folders.name, machine)
    print_data_summary(cfg, data_dir, dls)
    return machine


def _finish_trackers(trackers: Sequence, ended: dict) -> None:
    """End every tracker's run: with the outputs after a whole run, as failed otherwise."""
    paths = ended.get("paths")
    for t in trackers:
        t.finish(paths or {}, ok=paths is not None)


def _train(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolder,
    data_dir: Path,
    resume: bool,
    cbs: Sequence[Callback],
    start: float,
    machine: dict,
) -> tuple[dict, dict[str, Path]] | None:
    """Fit, export the best model and write summary.json: (the summary, every output path); a
    trained run's kept model is loaded again instead.

    With several processes all of them fit; then only rank 0 goes on (the others get None).
    """
    if folders.finished:
        leave_group()  # nothing to train: rank 0 finishes the run alone
        if not is_main():
            return None
        state = folders.resume_state()
        load_checkpoint(learn, state.kept_checkpoint, with_opt=False)
        return state.summary, {k: Path(v) for k, v in state.summary["paths"].items()}
    if is_main():
        write_snapshot(cfg, folders, learn, data_dir)
    saver = _fit_or_hint(learn, cfg, folders, resume, cbs, data_dir)
    leave_group()
    if not is_main():
        return None
    load_checkpoint(learn, saver.best_path)
    paths = _save_outputs(learn, cfg, folders, saver)
    summary = _summary(cfg, saver, time.perf_counter() - start, paths, machine)
    write_json(folders.summary_json, summary)  # from here on the run is trained
    saver.prune(keep_last=False)  # ... and not resumable: drop the last-epoch checkpoint
    return summary, paths


def _report(
    learn: Learner,
    cfg: ExperimentConfig,
    folders: RunFolder,
    data_dir: Path,
    paths: dict,
    summary: dict,
) -> None:
    """Evaluate the kept model on the test split and draw the report, the steps still missing."""
    r = folders.report_dir
    missing = folders.missing(cfg)
    kept = summary.get("kept_epoch", summary.get("best_epoch"))
    try:
        if "test evaluation" in missing:
            with step(f"evaluating the model of epoch {kept} on the test split"):
                evaluate_learner(learn, data_dir, "test", r, cfg, paths.get("learner"))
        if "report" in missing:
            paths["index"] = interpret_learner(learn, cfg, r, data_dir)
            copy_twins(r, folders.model_dir)  # the app's twins, beside the exported model
    except BaseException:
        console.print(
            f"the model is saved; finish the {' and '.join(missing)} with: "
            f"twincar train {folders.config_yaml} --resume {r}"
        )
        raise
    if cfg.eval.test:
        paths["eval_test"] = folders.eval_json("test")
    if cfg.eval.interpret:
        paths.setdefault("index", folders.index_html)
        paths["figures"] = folders.figures_dir


def _print_result(cfg: ExperimentConfig, summary: dict, paths: dict[str, Path]) -> None:
    """The kept epoch and why, the test result and the report to open, then the output paths."""
    best, took = summary["best"], f"({summary['epochs_run']} epochs, {summary['wall_time_s']:.0f}s)"
    kept = summary.get("kept_epoch", summary["best_epoch"])
    line = f"kept epoch {kept}, {summary.get('kept_because') or kept_because(cfg)}"
    values = [
        f"{k} {best[k]:.4f}" for k in dict.fromkeys([cfg.train.monitor, "valid_acc"]) if k in best
    ]
    console.print(
        f"{line}: {', '.join(values)} {took}" if values else f"{line} {took}", markup=False
    )
    test = summary.get("test")
    if test:
        console.print(
            f"test split ({test['n_images']} images): acc {test['acc']:.4f}, "
            f"top-5 {test['top5']:.4f}, macro F1 {test['f1_macro']:.4f}",
            markup=False,
            style="bold",
        )
        tta = read_json(Path(paths["eval_test"])) if "eval_test" in paths else {}
        if "test_acc_tta" in tta:
            console.print(
                f"with TTA ({tta['tta']}): acc {tta['test_acc_tta']:.4f}, "
                f"top-5 {tta['test_top5_tta']:.4f}, macro F1 {tta['test_f1_macro_tta']:.4f}",
                markup=False,
            )
    print_paths("outputs", paths)
    if "index" in paths:
        console.print(f"open the report: {paths['index']}", markup=False, style="bold")
