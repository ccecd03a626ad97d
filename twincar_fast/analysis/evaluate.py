"""The full metric table of a trained model on the official test split (or the run's valid split).

Writes three files into the run's reports folder (or `out_dir`), each atomically:

- `eval_<split>.json`: the metrics of `metrics.METRIC_NAMES` and the loss, keys prefixed with the
  split like the columns of metrics.csv (`test_acc`, `test_loss`, ...), plus `split`, `run`,
  `model`, `data_dir`, `n_images`, `n_classes` and `device`.
- `per_class_<split>.csv`: `class_id, label, precision, recall, f1, support` (`per_class_table`).
- `predictions_<split>.csv`: one row per image: `image` (path relative to the data set, as in
  annotations.csv), `true_id, true, predicted_id, predicted, probability` (of the predicted class),
  `true_probability`, `loss`, `top5` (the five most probable class ids, best first, joined by `;`,
  e.g. `3;7;1;0;9`) and `top5_probability` (their probabilities, same order).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.callback.progress import ProgressCallback  # noqa: F401 - patches Learner.no_bar
from fastai.learner import Learner

from twincar_fast.analysis.learner_pkl import load_learner_pkl
from twincar_fast.analysis.metrics import classification_metrics, per_class_table
from twincar_fast.analysis.tta import TtaViews
from twincar_fast.config import ExperimentConfig, load_config
from twincar_fast.console import eval_bars
from twincar_fast.data import check_vocab, eval_dl
from twincar_fast.errors import TwincarError
from twincar_fast.files import write_csv, write_json
from twincar_fast.run_folder import (
    CLASSES_CSV,
    CONFIG_JSON,
    EVAL_JSON,
    LEARNER_PKL,
    PER_CLASS_CSV,
    PREDICTIONS_CSV,
    SAFETENSORS,
    SPLITS,
    RunFolder,
    read_json,
    resolve_run,
)

__all__ = [
    "SPLITS",
    "evaluate_learner",
    "evaluation_result",
    "load_run_config",
    "load_run_learner",
    "open_saved_run",
    "predictions_table",
    "relative_images",
    "require_learner",
    "split_dl",
]


def require_learner(run: RunFolder) -> Path:
    """The run's learner.pkl, or a one-line error saying the run has no saved model."""
    if run.learner is None and run.model_dir is not None:
        raise TwincarError(
            f"{run.model_dir}: no {LEARNER_PKL} and no {SAFETENSORS} + {CONFIG_JSON} pair; "
            "export the model again with `twincar run`"
        )
    if run.learner is None:
        raise TwincarError(
            f"{run.report_dir}: run '{run.name}' has no saved model (no models/{run.name}/"
            f"{LEARNER_PKL}); it stopped before export: finish it with `twincar train "
            f"{run.config_yaml} --resume {run.report_dir}` or train it again"
        )
    return run.learner


def load_run_config(run: RunFolder) -> ExperimentConfig | None:
    """The run's saved config.yaml, or None when the model lives outside a run."""
    return None if run.report_dir is None else load_config(run.config_yaml)


def load_run_learner(path: str | os.PathLike) -> Learner:
    """Load an exported learner, on the GPU when there is one."""
    return load_learner_pkl(path)


def open_saved_run(
    run: str | os.PathLike, data_dir: str | os.PathLike | None, split: str | None = None
) -> tuple[RunFolder, ExperimentConfig, Path, Learner]:
    """A saved run's folders, config, data set and learner, with `split` evaluated on that data.

    `split` None: the run's own (test when it evaluates the test split, else valid).
    """
    paths = resolve_run(run)
    learner = require_learner(paths)
    if paths.report_dir is None:
        raise TwincarError(
            f"{learner}: no reports/{paths.name}/config.yaml beside this model; "
            "give a run folder made by `twincar run`"
        )
    cfg = load_run_config(paths)
    data = Path(data_dir) if data_dir is not None else Path(cfg.data.root)
    if data_dir is None and not (data / CLASSES_CSV).is_file():
        raise TwincarError(
            f"{data}: the run's data set (data.root in {paths.config_yaml}) is "
            "not there; pass --data DIR with the prepared data set"
        )
    learn = load_run_learner(learner)
    split = split or ("test" if cfg.eval.test else "valid")
    done = read_json(paths.eval_json(split))
    if done.get("data_dir") != str(data.resolve()):  # not evaluated yet, or on other data
        evaluate_learner(learn, data, split, paths.report_dir, cfg, model_path=learner)
    return paths, cfg, data, learn


# ---------------------------------------------------------------- predictions


def relative_images(items, data_dir: Path) -> list[str]:
    """Image paths of a loader's items, relative to the data set when they lie inside it."""
    if isinstance(items, pd.DataFrame):
        if "image" in items.columns:
            return [str(p) for p in items["image"]]
        items = items["path"]
    root = data_dir.resolve()
    out = []
    for p in items:
        p = Path(p)
        try:
            out.append(str(p.resolve().relative_to(root)))
        except ValueError:
            out.append(str(p))
    return out


def predictions_table(
    images: list[str],
    targets: np.ndarray,
    probs: np.ndarray,
    losses: np.ndarray,
    classes: list[str],
) -> pd.DataFrame:
    """One row per image: true and predicted class, probabilities, loss and the top-5 ids."""
    rows = np.arange(len(targets))
    pred = probs.argmax(1)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    names = np.asarray(classes, dtype=object)
    return pd.DataFrame(
        {
            "image": images,
            "true_id": targets,
            "true": names[targets],
            "predicted_id": pred,
            "predicted": names[pred],
            "probability": probs[rows, pred],
            "true_probability": probs[rows, targets],
            "loss": losses,
            "top5": [";".join(map(str, t)) for t in top],
            "top5_probability": [
                ";".join(f"{v:.6g}" for v in probs[i, t]) for i, t in enumerate(top)
            ],
        }
    )


def split_dl(learn: Learner, data_dir: Path, split: str, cfg: ExperimentConfig | None):
    """The labelled loader over `split` with validation transforms (valid split from `cfg`)."""
    if split not in SPLITS:
        raise TwincarError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "valid" and cfg is None:
        raise TwincarError(
            "--split valid needs the run's config.yaml (valid_pct, split_seed) to rebuild the "
            "training split; give the run folder instead of a lone learner.pkl"
        )
    kw = {"valid_pct": cfg.data.valid_pct, "seed": cfg.data.split_seed} if cfg else {}
    return eval_dl(learn.dls, data_dir, split, **kw)


def _run_name(model_path, out_dir, cfg: ExperimentConfig | None) -> str | None:
    """The run folder's name: of the model's folder, else of the output folder, else cfg.name."""
    if model_path is not None:
        return Path(model_path).parent.name
    return Path(out_dir).name if out_dir is not None else (cfg.name if cfg else None)


def evaluate_learner(
    learn: Learner,
    data_dir: str | os.PathLike,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    cfg: ExperimentConfig | None = None,
    model_path: str | os.PathLike | None = None,
) -> dict:
    """Evaluate an in-memory learner on `split`; write eval/per-class/predictions files to `out_dir`.

    Args:
        learn: the trained learner (its dls give the vocab and validation transforms).
        data_dir: the prepared data set (annotations.csv, classes.csv).
        split: "test" (the official test split) or "valid" (the run's held-out train images).
        out_dir: where the three files go; None writes nothing.
        cfg: the run's config; needed for the valid split (valid_pct, split_seed).
        model_path: the learner file, recorded in eval_<split>.json.

    Returns:
        The contents of eval_<split>.json.
    """
    data_dir = Path(data_dir)
    classes = check_vocab(learn.dls, data_dir)
    dl = split_dl(learn, data_dir, split, cfg)
    probs, targets, losses = _predict(learn, dl)
    images = relative_images(dl.items, data_dir)
    tta = cfg.eval.tta if cfg is not None else "none"
    extra = {} if tta == "none" else _tta_metrics(learn, dl, tta, split, targets)
    return evaluation_result(
        probs, targets, losses, images, classes, split, data_dir, out_dir,
        device=str(dl.device or "cpu"), run=_run_name(model_path, out_dir, cfg),
        model_path=model_path, extra=extra,
    )  # fmt: skip


def _predict(learn: Learner, dl, cbs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, targets, losses) of `learn` over `dl`, as NumPy arrays."""
    with eval_bars(learn):
        probs, targets, losses = learn.get_preds(dl=dl, with_loss=True, cbs=cbs)
    return (
        probs.float().cpu().numpy(),
        targets.cpu().numpy().astype(int),
        losses.float().cpu().numpy(),
    )


def _tta_metrics(learn: Learner, dl, kind: str, split: str, targets: np.ndarray) -> dict:
    """`<split>_<metric>_tta` of the mean probabilities over the `kind` views (eval.tta)."""
    probs, tta_targets, losses = _predict(learn, dl, cbs=[TtaViews(kind)])
    if not np.array_equal(tta_targets, targets):  # the same images in the same order
        raise TwincarError(f"TTA saw other {split} images than the plain evaluation")
    table = classification_metrics(targets, probs)
    return {
        "tta": kind,
        f"{split}_loss_tta": float(losses.mean()),
        **{f"{split}_{k}_tta": v for k, v in table.items()},
    }


def evaluation_result(
    probs: np.ndarray,
    targets: np.ndarray,
    losses: np.ndarray,
    images: list[str],
    classes: list[str],
    split: str,
    data_dir: Path,
    out_dir: str | os.PathLike | None,
    device: str,
    run: str | None,
    model_path: str | os.PathLike | None = None,
    extra: dict | None = None,
) -> dict:
    """eval_<split>.json's contents from a model's probabilities; the three files into `out_dir`.

    `extra` (the TTA metrics) is added to the JSON after the plain metrics.
    """
    result = {
        "split": split,
        "run": run,
        "model": str(model_path) if model_path else None,
        "data_dir": str(Path(data_dir).resolve()),
        "n_images": len(targets),
        "n_classes": len(classes),
        "device": device,
        f"{split}_loss": float(losses.mean()),
        **{f"{split}_{k}": v for k, v in classification_metrics(targets, probs).items()},
        **(extra or {}),
    }
    if out_dir is not None:
        table = predictions_table(images, targets, probs, losses, classes)
        _write_eval(Path(out_dir), split, result, table, classes)
    return result


def _write_eval(
    out_dir: Path, split: str, result: dict, table: pd.DataFrame, classes: list[str]
) -> None:
    """per_class_<split>.csv, predictions_<split>.csv, then eval_<split>.json (the "done" mark)."""
    per_class = per_class_table(table["true_id"], table["predicted_id"], classes)
    write_csv(out_dir / PER_CLASS_CSV.format(split), per_class)
    write_csv(out_dir / PREDICTIONS_CSV.format(split), table)
    write_json(out_dir / EVAL_JSON.format(split), result)
