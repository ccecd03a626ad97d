"""Ship a trained model: fastai's `learner.pkl` plus a weights-only `model.safetensors` + `model.json`.

`learner.pkl` (`learn.export`) keeps the whole inference pipeline (transforms, vocab) and loads with
`fastai.learner.load_learner` without the training data, but it is a pickle: load only files you
trust. `model.safetensors` holds only tensors (safe to load from anywhere); `model.json` says how to
rebuild the network (`model.learner.create_model`) and feed it (sizes, normalization, classes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.vision.augment import Resize
from fastai.vision.core import imagenet_stats
from safetensors.torch import save_file
from torch import nn

from twincar_fast.config import ExperimentConfig, HeadName, build_typed, check_key
from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path, write_json
from twincar_fast.train.callbacks import EpochMetrics, SaveRun

__all__ = [
    "MODEL_FILES",
    "ModelCard",
    "read_model_card",
    "export_learner",
    "export_model",
    "load_safetensors",
    "model_card",
    "save_safetensors",
]

MODEL_FILES = {
    "learner": "learner.pkl",
    "safetensors": "model.safetensors",
    "model_json": "model.json",
}
_RUN_ONLY = (EpochMetrics, SaveRun)  # callbacks tied to one training run: never exported


@dataclass
class ModelCard:
    """model.json, typed: how to rebuild the network and prepare its input (see `model_card`)."""

    arch: str
    classes: list[str]
    img_size: int
    item_size: int
    mean: list[float]
    std: list[float]
    format: str = "twincar_fast/model-v1"
    twincar_fast: str = ""
    head: HeadName = "mlp"
    head_hidden: int = 512
    head_dropout: float = 0.3
    n_classes: int | None = None
    bbox_crop: bool = False
    bbox_margin: float = 0.0
    resize: Literal["crop", "squish", "pad"] = "crop"
    pad_mode: Literal["zeros", "border", "reflection"] = "reflection"
    draft: bool = True
    input: str = field(default="")


def _check_card(c: ModelCard, where: str) -> None:
    """Value ranges of a model card (ConfigError naming the file and key)."""
    check_key(len(c.classes) >= 2, where, "classes", "must list at least 2 classes")
    n = c.n_classes
    check_key(n is None or n == len(c.classes), where, "n_classes", "must be len(classes)")
    check_key(c.img_size >= 16, where, "img_size", f"must be at least 16, got {c.img_size}")
    check_key(c.item_size >= c.img_size, where, "item_size", "must be ≥ img_size")
    for key in ("mean", "std"):
        v = getattr(c, key)
        ok = len(v) == 3 and all(math.isfinite(x) for x in v)
        check_key(ok, where, key, f"must be 3 finite numbers (R, G, B), got {v}")
    check_key(min(c.std) > 0, where, "std", f"must be positive, got {c.std}")
    check_key(c.head_hidden >= 1, where, "head_hidden", "must be at least 1")
    check_key(0 <= c.head_dropout < 1, where, "head_dropout", "must be in [0, 1)")
    ok = math.isfinite(c.bbox_margin) and c.bbox_margin >= 0
    check_key(ok, where, "bbox_margin", f"must be a finite number ≥ 0, got {c.bbox_margin}")


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """Read and check a model.json (typed like an experiment config); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise TwincarError(
            f"{path} not found: model.safetensors needs the model.json written beside it "
            "by `twincar run`; copy both files"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TwincarError(f"{path}: not valid JSON ({e}); re-export the model") from None
    if not isinstance(data, dict):
        raise TwincarError(f"{path}: must be a JSON object, got {type(data).__name__}")
    missing = [
        k for k in ("arch", "classes", "img_size", "item_size", "mean", "std") if k not in data
    ]
    if missing:
        raise TwincarError(f"{path}: missing key(s) {', '.join(missing)}; re-export the model")
    card = build_typed(ModelCard, data, str(path))
    _check_card(card, str(path))
    return card


def _plain_model(learn: Learner) -> nn.Module:
    """The learner's network without a torch.compile wrapper."""
    model = learn.model
    return getattr(model, "_orig_mod", model)


def export_learner(learn: Learner, path: str | os.PathLike) -> Path:
    """`learn.export` to `path` atomically, without this run's callbacks and metrics."""
    path = Path(path)
    run_cbs = [cb for cb in learn.cbs if isinstance(cb, _RUN_ONLY)]
    metrics = learn.metrics
    # `model.compile()` keeps a dynamo wrapper on the module: export the plain module instead
    compiled = learn.model.__dict__.pop("_compiled_call_impl", None)
    try:
        learn.metrics = []
        with learn.removed_cbs(run_cbs), atomic_path(path) as tmp:
            learn.export(tmp.resolve())  # an absolute name: fastai writes learn.path / fname
    finally:
        learn.metrics = metrics
        if compiled is not None:
            learn.model._compiled_call_impl = compiled
    return path


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """The model's state dict as contiguous CPU tensors in a safetensors file, atomically."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return Path(path)


def _preprocessing(learn: Learner, cfg: ExperimentConfig) -> dict:
    """How the validation loader prepares an image: resize method, padding, normalization."""
    d = cfg.data
    out = {"resize": d.resize, "pad_mode": "reflection", "draft": d.draft}
    resize = next((t for t in learn.dls.valid.after_item.fs if isinstance(t, Resize)), None)
    if resize is not None:
        out.update(
            resize=str(resize.method), pad_mode=str(resize.pad_mode), item_size=int(resize.size[0])
        )
    norm = next((t for t in learn.dls.after_batch.fs if isinstance(t, Normalize)), None)
    mean, std = (
        (norm.mean, norm.std) if norm is not None else (imagenet_stats[0], imagenet_stats[1])
    )
    out.update(
        mean=torch.as_tensor(mean).flatten().tolist(), std=torch.as_tensor(std).flatten().tolist()
    )
    return out


def model_card(learn: Learner, cfg: ExperimentConfig) -> dict:
    """What `model.json` says: how to rebuild the network and prepare its input."""
    from twincar_fast import __version__

    classes = [str(c) for c in learn.dls.vocab]
    m, d = cfg.model, cfg.data
    return {
        "format": "twincar_fast/model-v1",
        "twincar_fast": __version__,
        "arch": m.arch,
        "head": m.head,
        "head_hidden": m.head_hidden,
        "head_dropout": m.head_dropout,
        "n_classes": len(classes),
        "classes": classes,
        "img_size": d.img_size,
        "item_size": d.item_size,
        "bbox_crop": d.bbox_crop,
        "bbox_margin": d.bbox_margin,
        **_preprocessing(learn, cfg),
        "input": "RGB scaled to [0, 1], normalized with mean/std, NCHW float32",
    }


def export_model(
    learn: Learner, model_dir: str | os.PathLike, cfg: ExperimentConfig
) -> dict[str, Path]:
    """Write learner.pkl, model.safetensors and model.json of `learn`'s current weights into `model_dir`."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: model_dir / name for key, name in MODEL_FILES.items()}
    export_learner(learn, paths["learner"])
    save_safetensors(_plain_model(learn), paths["safetensors"])
    write_json(paths["model_json"], model_card(learn, cfg))
    return paths


def load_safetensors(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a `model.safetensors` into a network built by `model.learner.create_model` (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model
