"""Ship a trained model: `model.safetensors` + `config.json` + `README.md`, and fastai's `learner.pkl`.

`model.safetensors` holds only tensors (safe to load from anywhere); `config.json` (timm's Hub
schema + a `twincar` section, `ship.card`) says how to rebuild the network and feed it; with
`model.head: timm` the weights carry timm's own key names, so `timm.create_model("local-dir:...")`
loads the folder without twincar. `learner.pkl` (`learn.export`) keeps fastai's whole inference
pipeline for `load_learner`, but it is a pickle: load only files you trust.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fastai.learner import Learner
from safetensors.torch import save_file
from torch import nn

from twincar_fast.config import ExperimentConfig, config_to_dict
from twincar_fast.data.geometry import valid_input
from twincar_fast.files import atomic_path, write_json, write_text
from twincar_fast.run_folder import CONFIG_JSON, LEARNER_PKL, README_MD, SAFETENSORS
from twincar_fast.ship.card import (
    ModelCard,
    from_timm_keys,
    hub_config,
    model_readme,
    read_model_card,
    to_timm_keys,
)
from twincar_fast.ship.integrity import file_sha256
from twincar_fast.train.callbacks import EpochMetrics, SaveRun
from twincar_fast.train.runs import library_versions

__all__ = [
    "MODEL_FILES",
    "ModelCard",
    "classifier_name",
    "data_hash",
    "read_model_card",
    "export_learner",
    "export_model",
    "load_safetensors",
    "model_card",
    "save_safetensors",
    "write_model_config",
]

MODEL_FILES = {
    "learner": LEARNER_PKL,
    "safetensors": SAFETENSORS,
    "config": CONFIG_JSON,
    "readme": README_MD,
}
_RUN_ONLY = (EpochMetrics, SaveRun)  # callbacks tied to one training run: never exported


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


def classifier_name(model: nn.Module) -> str:
    """timm's name of the classifier of our `Sequential(TimmBody, head)` (`fc` for ResNets)."""
    name = model[0].model.pretrained_cfg.get("classifier") or "fc"
    return name if isinstance(name, str) else name[0]


def save_safetensors(model: nn.Module, path: str | os.PathLike, layout: str = "twincar") -> Path:
    """The model's state dict as contiguous CPU tensors in a safetensors file, atomically;
    `layout="timm"` names them as timm's own model (a `head: timm` model only)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if layout == "timm":
        state = to_timm_keys(state, classifier_name(model))
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return Path(path)


def _preprocessing(learn: Learner, cfg: ExperimentConfig) -> dict:
    """How the validation loader prepares an image: resize method, padding, normalization."""
    spec = valid_input(learn.dls)
    keys = ("resize", "pad_mode", "item_size", "mean", "std")
    return {"draft": cfg.data.draft} | {k: spec[k] for k in keys}


def model_card(learn: Learner, cfg: ExperimentConfig) -> dict:
    """The flat facts of the ModelCard: how to rebuild the network and prepare its input."""
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
        "weights_layout": "timm" if m.head == "timm" else "twincar",
    }


def data_hash(data_dir: str | os.PathLike) -> str | None:
    """sha256 of a prepared set's annotations.csv and classes.csv (None when absent)."""
    h = hashlib.sha256()
    files = [Path(data_dir) / n for n in ("annotations.csv", "classes.csv")]
    if not all(f.is_file() for f in files):
        return None
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def write_model_config(
    model_dir: str | os.PathLike, card: ModelCard, num_features: int, info: dict
) -> dict[str, Path]:
    """config.json (timm's schema + twincar section) and the README.md model card, atomically."""
    model_dir = Path(model_dir)
    config = hub_config(card, num_features, info)
    paths = {
        "config": model_dir / MODEL_FILES["config"],
        "readme": model_dir / MODEL_FILES["readme"],
    }
    write_json(paths["config"], config)
    write_text(paths["readme"], model_readme(config, card))
    return paths


def export_model(
    learn: Learner,
    model_dir: str | os.PathLike,
    cfg: ExperimentConfig,
    metrics: dict | None = None,
) -> dict[str, Path]:
    """Write learner.pkl, model.safetensors, config.json and README.md of `learn`'s current
    weights into `model_dir`; `metrics` (the run's) go into config.json and the README."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    card = ModelCard(**model_card(learn, cfg))
    model = _plain_model(learn)
    paths = {"learner": export_learner(learn, model_dir / MODEL_FILES["learner"])}
    paths["safetensors"] = save_safetensors(
        model, model_dir / MODEL_FILES["safetensors"], card.weights_layout
    )
    info = {
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        "data_hash": data_hash(cfg.data.root),
        "versions": library_versions(),
        "training": config_to_dict(cfg),
        "sha256": {paths["safetensors"].name: file_sha256(paths["safetensors"])},  # checked on load
    }
    paths.update(write_model_config(model_dir, card, model[0].model.num_features, info))
    return paths


def load_safetensors(
    model: nn.Module, path: str | os.PathLike, layout: str = "twincar"
) -> nn.Module:
    """Load a `model.safetensors` into a network built by `model.learner.create_model` (strict);
    `layout="timm"`: the file names the tensors as timm's own model."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    if layout == "timm":
        state = from_timm_keys(state, classifier_name(model))
    model.load_state_dict(state)
    return model
