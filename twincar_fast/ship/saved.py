"""A saved model evaluated again: from the safe files (model.safetensors + config.json), a pickle
only when trusted, into a folder that never replaces a finished run's own results."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import numpy as np
from fastai.learner import Learner

from twincar_fast.analysis.evaluate import (
    SPLITS,
    evaluate_learner,
    evaluation_result,
    load_run_config,
    load_run_learner,
    relative_images,
    require_learner,
)
from twincar_fast.config import DataConfig, ExperimentConfig, ModelConfig
from twincar_fast.console import console
from twincar_fast.data import build_eval_dls, check_classes, check_split, read_annotations
from twincar_fast.data.dataset import BBOX_COLUMNS
from twincar_fast.errors import TwincarError
from twincar_fast.files import new_run_name
from twincar_fast.model.learner import create_learner
from twincar_fast.run_folder import EVAL_JSON, SAFETENSORS, RunFolder, resolve_run
from twincar_fast.ship.export import ModelCard, load_safetensors, read_model_card
from twincar_fast.ship.integrity import check_sha256
from twincar_fast.ship.predict import Predictor, require_trust

__all__ = ["evaluate", "evaluate_predictor", "load_safe_learner"]


def _card_config(card: ModelCard) -> ExperimentConfig:
    """An experiment config with the model and validation preprocessing a model card describes."""
    if card.resize == "short":  # fastai's loaders have no shorter-side resize + centre crop
        raise TwincarError("resize 'short' models are evaluated by `evaluate_predictor`")
    cfg = ExperimentConfig()
    cfg.model = ModelConfig(
        arch=card.arch, head=card.head, head_hidden=card.head_hidden, head_dropout=card.head_dropout
    )
    cfg.data = DataConfig(
        img_size=card.img_size,
        item_size=card.item_size,
        resize=card.resize,
        draft=card.draft,
        bbox_crop=card.bbox_crop,
    )
    return cfg


def load_safe_learner(
    safetensors: str | os.PathLike, data_dir: str | os.PathLike, cfg: ExperimentConfig | None
) -> Learner:
    """A Learner over `data_dir` with the weights of a model.safetensors (no pickle involved)."""
    path = Path(safetensors)
    card = read_model_card(path.parent)
    check_sha256(path)
    check_classes(card.classes, data_dir)
    cfg = copy.deepcopy(cfg) if cfg is not None else _card_config(card)
    cfg.model = dataclasses.replace(cfg.model, pretrained=False, weights=None)
    learn = create_learner(cfg, build_eval_dls(cfg, data_dir))
    try:
        load_safetensors(learn.model, path, card.weights_layout)
    except (OSError, RuntimeError, ValueError) as e:
        reason = " ".join(str(e).split())[:160]
        raise TwincarError(f"{path}: can't load these weights ({reason}); re-export") from None
    return learn


def _out_dir(
    run: RunFolder, cfg: ExperimentConfig | None, data_dir: Path, split: str, out, force: bool
) -> Path:
    """Where the evaluation goes: the run's reports for its own data, else a new folder."""
    base = run.report_dir or run.model_dir
    if out is not None:
        out = Path(out)
    elif cfg is not None and Path(cfg.data.root).resolve() == data_dir.resolve():
        out = base
    else:  # other data: never in place of the run's own results
        out = base / new_run_name(f"eval-{data_dir.resolve().name}", [base])
    if (out / EVAL_JSON.format(split)).exists() and not force:
        raise TwincarError(
            f"{out / EVAL_JSON.format(split)} exists: an evaluation is never replaced silently; "
            "pass --force to redo it there, or --out another folder"
        )
    return out


def _safe_file(path: Path, run: RunFolder) -> Path | None:
    """The model.safetensors to evaluate, if the model given has one."""
    safe = path if path.suffix == ".safetensors" else None
    if safe is None and path.suffix != ".pkl" and run.model_dir is not None:
        safe = run.model_dir / SAFETENSORS
    return safe if safe is not None and safe.is_file() else None


def evaluate_predictor(
    folder: str | os.PathLike, data_dir: str | os.PathLike, split: str, out_dir: Path | None
) -> dict:
    """The test split through `Predictor` (an imported model's own preprocessing, e.g. TwinCar's
    Resize 256 + CenterCrop 224, which fastai's evaluation loader doesn't have)."""
    if split != "test":
        raise TwincarError(
            "--split valid needs the run's config.yaml; this model has none: use --split test"
        )
    data_dir = Path(data_dir)
    predictor = Predictor.from_path(folder)
    classes = check_classes(predictor.classes, data_dir)
    check_split(data_dir, "test")
    df = read_annotations(data_dir)
    df = df[df["split"] == "test"]
    boxes = df[BBOX_COLUMNS].to_numpy() if predictor.preprocess.bbox_crop else None
    probs = predictor.predict_proba(df["path"].tolist(), boxes=boxes)
    targets = df["class_id"].to_numpy().astype(int)
    losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))
    model = Path(folder) / SAFETENSORS
    images = relative_images(df, data_dir)
    return evaluation_result(
        probs, targets, losses, images, classes, split, data_dir, out_dir,
        device=str(predictor.device), run=Path(folder).name, model_path=model,
    )  # fmt: skip


def _load(path: Path, run: RunFolder, data_dir: Path, cfg, trust_pickle: bool):
    """(learner, model file): the safetensors pair when there is one, else a trusted pickle."""
    safe = _safe_file(path, run)
    if safe is not None:
        return load_safe_learner(safe, data_dir, cfg), safe
    pkl = require_learner(run)
    require_trust(pkl, trust_pickle)
    return load_run_learner(pkl), pkl


def evaluate(
    model: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str = "test",
    out_dir: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> dict:
    """Evaluate a saved model (models/<run>, reports/<run>, model.safetensors, or a trusted
    learner.pkl) on `split`; write eval/per-class/predictions files.

    Args:
        model: the run folder or model file.
        data_dir: the prepared data set.
        split: "test" or "valid" (the run's own held-out images).
        out_dir: where the files go (default: the run's reports for its own data, else a new
            `eval-<data>-<time>` folder inside them).
        trust_pickle: allow learner.pkl, a pickle that can run any code.
        force: replace an earlier evaluation of the same split in that folder.
    """
    if split not in SPLITS:
        raise TwincarError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path, data_dir = Path(model), Path(data_dir)
    run = resolve_run(path)
    cfg = load_run_config(run)
    out = _out_dir(run, cfg, data_dir, split, out_dir, force)
    safe = _safe_file(path, run)
    if safe is not None and read_model_card(safe.parent).resize == "short":
        result = evaluate_predictor(safe.parent, data_dir, split, out)
    else:
        learn, model_file = _load(path, run, data_dir, cfg, trust_pickle)
        result = evaluate_learner(learn, data_dir, split, out, cfg, model_path=model_file)
    console.print(
        f"{split}: {result['n_images']} images, acc {result[f'{split}_acc']:.4f}, "
        f"f1_macro {result[f'{split}_f1_macro']:.4f}, top5 {result[f'{split}_top5']:.4f}, "
        f"loss {result[f'{split}_loss']:.4f} → {out / EVAL_JSON.format(split)}"
    )
    return result
