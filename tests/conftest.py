"""Shared fixtures: a tiny prepared data set in the project's CSV form and a CPU-sized config.

The data set is drawn here (no downloads): 4 classes, each a coloured square at its own place on a
noisy background, small enough that `test_resnet` learns it in a few CPU steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.callback.core import Callback
from PIL import Image

from twincar_fast.config import ExperimentConfig

N_CLASSES, N_TRAIN, N_TEST, W, H = 4, 12, 6, 48, 32
CLASS_NAMES = [
    "AM General Hummer SUV 2000",
    "Acura RL Sedan 2012",
    "Audi R8 Coupe 2012",
    "BMW M3 Coupe 2012",
]


def draw_tiny_image(class_id: int, rng: np.random.Generator) -> tuple[Image.Image, tuple]:
    """One W×H image of class `class_id` and its bounding box (x1, y1, x2, y2), 1-based like the devkit."""
    arr = rng.integers(0, 80, size=(H, W, 3), dtype=np.uint8)
    x = 4 + 10 * class_id + int(rng.integers(0, 3))
    y = 8 + int(rng.integers(0, 8))
    arr[y : y + 10, x : x + 10] = (230, 200 - 40 * class_id, 40 + 50 * class_id)
    return Image.fromarray(arr), (x + 1, y + 1, x + 10, y + 10)


def write_tiny_prepared(root: Path, seed: int = 0) -> Path:
    """Write a prepared data set (annotations.csv, classes.csv, rejected.csv, images/) under `root`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c in range(N_CLASSES):
            for i in range(n):
                img, (x1, y1, x2, y2) = draw_tiny_image(c, rng)
                rel = f"images/{split}_{c}_{i:03d}.jpg"
                img.save(root / rel, quality=95)
                rows.append((rel, CLASS_NAMES[c], c, split, x1, y1, x2, y2))
    cols = ["image", "label", "class_id", "split", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"]
    pd.DataFrame(rows, columns=cols).to_csv(root / "annotations.csv", index=False)
    pd.DataFrame({"class_id": range(N_CLASSES), "label": CLASS_NAMES}).to_csv(
        root / "classes.csv", index=False
    )
    pd.DataFrame(columns=["image", "reason"]).to_csv(root / "rejected.csv", index=False)
    return root


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Tests share 2 cores; keep torch from oversubscribing them."""
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared tiny data set (read-only for tests: copy it before changing it)."""
    return write_tiny_prepared(tmp_path_factory.mktemp("tiny_data"))


def make_tiny_cfg(data_root: Path, out: Path) -> ExperimentConfig:
    """A CPU-sized config: test_resnet at 32 px, 2 epochs, no workers, outputs under `out`.

    Test-split evaluation and the report are off (tests that need them switch them on).
    """
    cfg = ExperimentConfig(
        name="tiny", reports_dir=str(out / "reports"), models_dir=str(out / "models")
    )
    cfg.data = dataclasses.replace(
        cfg.data,
        root=str(data_root),
        img_size=32,
        item_size=40,
        batch_size=8,
        num_workers=0,
        valid_pct=0.25,
    )
    cfg.model = dataclasses.replace(cfg.model, arch="test_resnet", pretrained=False, head_hidden=32)
    cfg.train = dataclasses.replace(
        cfg.train, epochs=2, lr=1e-2, device="cpu", early_stopping=0, plateau_patience=0
    )
    cfg.eval = dataclasses.replace(
        cfg.eval,
        test=False,
        interpret=False,
        top_losses=4,
        gradcam=2,
        confusion_zoom=4,
        most_confused=3,
    )
    return cfg


def sensitive_export(cfg: ExperimentConfig, model_dir: Path):
    """An untrained learner whose logits are rescaled to swing with the input, exported."""
    from fastcore.basics import noop

    from twincar_fast.data import build_dls
    from twincar_fast.model.learner import create_learner
    from twincar_fast.ship.export import export_model

    dls = build_dls(cfg)
    torch.manual_seed(0)
    learn = create_learner(cfg, dls)
    with learn.no_bar():
        logits, _ = learn.get_preds(dl=dls.valid, act=noop)
    with torch.no_grad():
        last = learn.model[1][-1]
        scale = 2.0 / logits.std(0).clamp_min(1e-6)
        last.bias -= logits.mean(0)
        last.weight *= scale[:, None]
        last.bias *= scale
    export_model(learn, model_dir, cfg)
    return learn, model_dir


@pytest.fixture(scope="session")
def shipped(tiny_data, tmp_path_factory):
    """(learner, model folder) of a tiny input-sensitive model, shared by the ship tests.

    Untrained nets give nearly the same logits for every image; the last layer is standardized
    on the validation logits so that probabilities swing with the input (see test_predict).
    The folder is read-only for tests: copy it before changing it.
    """
    out = tmp_path_factory.mktemp("shipped")
    cfg = make_tiny_cfg(tiny_data, out)
    cfg.train.mixed_precision = "none"
    return sensitive_export(cfg, out / "models" / "tiny-ship")


@pytest.fixture(scope="session")
def shipped_onnx(shipped):
    """The shared tiny model folder with its model.onnx exported and checked."""
    from twincar_fast.ship.onnx import export_onnx

    learn, folder = shipped
    export_onnx(folder)
    return learn, folder


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path) -> ExperimentConfig:
    """A fresh tiny config per test, writing its runs under the test's tmp_path."""
    return make_tiny_cfg(tiny_data, tmp_path)


class InterruptAfter(Callback):
    """Raise KeyboardInterrupt once `n` epochs are committed (like Ctrl-C between epochs)."""

    order = 100

    def __init__(self, n: int):
        self.n = n

    def after_epoch(self):
        if len(self.learn.save_run.rows) == self.n:
            raise KeyboardInterrupt
