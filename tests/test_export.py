"""Export: learner.pkl loads in a fresh process without the training data and predicts the same;
model.safetensors + model.json rebuild the same network without fastai's pickle."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, make_tiny_cfg
from safetensors.torch import load_file

from twincar_fast.config import ModelConfig
from twincar_fast.data.loaders import presize
from twincar_fast.experiment import run_experiment
from twincar_fast.model.learner import create_model
from twincar_fast.ship.card import read_model_card
from twincar_fast.ship.checkpoint import import_torchvision
from twincar_fast.train.callbacks import EpochMetrics, SaveRun
from twincar_fast.train.runs import library_versions

LOAD_AND_PREDICT = """
import sys, numpy as np
from fastai.learner import load_learner
learn = load_learner(sys.argv[1])
names = [type(cb).__name__ for cb in learn.cbs]
assert "EpochMetrics" not in names and "SaveRun" not in names and len(learn.metrics) == 0, names
dl = learn.dls.test_dl(sys.argv[3:])
probs, _ = learn.get_preds(dl=dl)
np.save(sys.argv[2], probs.numpy())
"""


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """A one-epoch run on a private copy of the tiny data set, exported as every run is."""
    root = tmp_path_factory.mktemp("export")
    data = shutil.copytree(tiny_data, root / "data")
    cfg = make_tiny_cfg(data, root)
    cfg.train = dataclasses.replace(cfg.train, epochs=1)
    res = run_experiment(cfg)
    return res, cfg, data


def test_export_writes_the_model_folder(exported):
    res, cfg, _ = exported
    config = json.loads((res.model_dir / "config.json").read_text())
    card, pre = config["twincar"], config["pretrained_cfg"]
    assert config["architecture"] == "test_resnet" and card["head"] == cfg.model.head
    assert card["head_hidden"] == cfg.model.head_hidden and config["num_classes"] == 4
    assert config["label_names"] == CLASS_NAMES and config["num_features"] > 0
    # item-stage augmentation: validation images are resized straight to img_size
    assert (card["img_size"], card["item_size"]) == (cfg.data.img_size, presize(cfg))
    assert pre["input_size"] == [3, cfg.data.img_size, cfg.data.img_size]
    assert len(pre["mean"]) == len(pre["std"]) == 3 and card["resize"] == cfg.data.resize
    assert card["metrics"]["valid_acc"] == pytest.approx(res.summary["best"]["valid_acc"])
    assert len(card["data_hash"]) == 64 and card["versions"]["timm"]
    assert card["versions"] == library_versions()  # the run's env.json records the same
    readme = (res.model_dir / "README.md").read_text()
    assert "## Metrics" in readme and "| metric | valid (epoch 0) |" in readme
    assert (
        f"| acc | {res.summary['best']['valid_acc']:.4f} |" in readme and CLASS_NAMES[3] in readme
    )
    # the learner keeps training after export: its run callbacks and metrics are back
    assert any(isinstance(cb, EpochMetrics) for cb in res.learn.cbs)
    assert len(res.learn.metrics) == 14
    assert not any(isinstance(cb, SaveRun) for cb in res.learn.cbs)


def test_learner_pkl_predicts_the_same_in_a_fresh_process_without_data(exported, tmp_path):
    res, _, data = exported
    images = [shutil.copy(p, tmp_path) for p in sorted((data / "images").glob("test_*.jpg"))[::6]]
    expected, _ = res.learn.get_preds(dl=res.learn.dls.test_dl(images))
    moved = data.rename(data.with_name("data_moved"))  # no training data at load time
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOAD_AND_PREDICT, str(res.model_dir / "learner.pkl"),
             str(tmp_path / "probs.npy"), *map(str, images)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
    finally:
        moved.rename(data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probs = np.load(tmp_path / "probs.npy")
    assert probs.shape == (len(images), 4)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-5)


def test_safetensors_rebuild_gives_the_same_logits(exported):
    res, _, _ = exported
    card = dataclasses.asdict(read_model_card(res.model_dir))
    keys = ("arch", "head", "head_hidden", "head_dropout")
    model = create_model(
        ModelConfig(**{k: card[k] for k in keys}, pretrained=False), len(card["classes"]), False
    )
    model.load_state_dict(load_file(res.model_dir / "model.safetensors"))
    x = torch.rand(5, 3, card["img_size"], card["img_size"])
    trained = res.learn.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trained(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_model_card_names_the_version_and_the_library_that_loads_it(head, tiny_data, tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    if head == "linear":
        net.fc = torch.nn.Linear(512, len(CLASS_NAMES))
    else:  # TwinCar's MLP head: timm has no such classifier
        net.fc = torch.nn.Sequential(
            torch.nn.Linear(512, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
            torch.nn.Linear(16, len(CLASS_NAMES)),
        )  # fmt: skip
    torch.save(net.state_dict(), tmp_path / "ckpt.pth")
    out = import_torchvision(
        tmp_path / "ckpt.pth", tiny_data / "classes.csv", tmp_path / "m", arch="resnet18"
    )
    version = importlib.metadata.version("twincar-fast")
    config = json.loads((out / "config.json").read_text())
    assert config["twincar"]["twincar_fast"] == version  # was "" in imported folders
    readme = (out / "README.md").read_text()
    assert f"exported by twincar_fast {version}." in readme
    if head == "linear":  # timm's own classifier and key names: timm loads it
        assert "library_name: timm" in readme and 'timm.create_model("local-dir:' in readme
    else:
        assert "library_name: timm" not in readme and "timm.create_model" not in readme
        line = next(ln for ln in readme.splitlines() if "needs twincar_fast" in ln)
        assert line.startswith("This mlp head needs twincar_fast to load") and "timm alone" in line


def test_run_exported_mlp_head_card_says_it_needs_twincar_fast(exported):
    res, cfg, _ = exported
    assert cfg.model.head == "mlp"
    readme = (res.model_dir / "README.md").read_text()
    assert "library_name: timm" not in readme and "This mlp head needs twincar_fast" in readme
