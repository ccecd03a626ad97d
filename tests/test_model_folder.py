"""Issue 16.1: the model folder is self-describing in timm's Hub schema; `head: timm` folders load
with plain timm (`local-dir:`) to the same logits, without twincar code."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from twincar_fast.data import build_dls
from twincar_fast.model.learner import create_learner
from twincar_fast.ship.export import export_model
from twincar_fast.ship.predict import Predictor

PLAIN_TIMM = """
import sys, json, numpy as np, timm, torch
assert not any(m.startswith(("twincar_fast", "fastai")) for m in sys.modules)
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model(x).numpy())
print(json.dumps(model.pretrained_cfg["label_names"]))
assert not any(m.startswith(("twincar_fast", "fastai")) for m in sys.modules)
"""


@pytest.fixture(scope="module")
def timm_head(tiny_data, tmp_path_factory):
    """An untrained `head: timm` learner on the tiny set, exported."""
    from conftest import make_tiny_cfg

    out = tmp_path_factory.mktemp("timm_head")
    cfg = copy.deepcopy(make_tiny_cfg(tiny_data, out))
    cfg.model.head, cfg.train.mixed_precision = "timm", "none"
    torch.manual_seed(0)
    learn = create_learner(cfg, build_dls(cfg))
    export_model(learn, out / "m", cfg)
    return learn, out / "m"


def test_plain_timm_local_dir_gives_the_same_logits(timm_head, tmp_path):
    learn, folder = timm_head
    x = torch.randn(3, 3, 32, 32) * 2
    with torch.no_grad():
        expected = learn.model.eval()(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    # a fresh interpreter that never imports twincar_fast or fastai: timm alone
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, str(folder), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "y.npy")
    assert got.shape == (3, 4) and np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == list(learn.dls.vocab)


def test_timm_layout_folder_reloads_in_twincar(timm_head):
    learn, folder = timm_head
    keys = set(json.loads((folder / "config.json").read_text())["twincar"])
    assert {"head", "resize", "bbox_margin", "data_hash", "versions", "metrics"} <= keys
    from safetensors.torch import load_file

    assert "fc.weight" in load_file(folder / "model.safetensors")  # timm's own names
    paths = [str(p) for p in learn.dls.valid.items["path"]]
    with learn.no_bar():
        expected, _ = learn.get_preds(dl=learn.dls.valid)
    got = Predictor.from_path(folder, device="cpu").predict_proba(paths)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
