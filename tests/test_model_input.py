"""A model's input statistics come from timm's `pretrained_cfg` (issue 30): the loaders, config.json,
the Predictor and the ONNX graph all normalize with the model's own mean and std."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import timm
from fastai.data.transforms import Normalize
from onnx import numpy_helper
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from twincar_fast.data import build_dls
from twincar_fast.data.model_input import model_stats
from twincar_fast.errors import ConfigError
from twincar_fast.ship.predict import Predictor


def test_stats_are_timm_pretrained_cfg_of_the_arch():
    assert model_stats("resnet18") == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert model_stats("vit_tiny_patch16_224") == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match="did you mean resnet18"):
        model_stats("resnet1")


def test_loaders_normalize_with_the_model_stats(tiny_cfg):
    for arch in ("test_resnet", "resnet18"):  # 0.5/0.5 and ImageNet's
        tiny_cfg.model.arch = arch
        cfg = timm.get_pretrained_cfg(arch)
        norm = next(t for t in build_dls(tiny_cfg).after_batch.fs if isinstance(t, Normalize))
        np.testing.assert_allclose(norm.mean.flatten().cpu(), cfg.mean, atol=1e-7)
        np.testing.assert_allclose(norm.std.flatten().cpu(), cfg.std, atol=1e-7)


def test_the_model_stats_travel_into_config_predictor_and_onnx(shipped_onnx):
    """test_resnet (the tests' and the demo's model) was pretrained with 0.5/0.5, not ImageNet's."""
    _, folder = shipped_onnx
    mean, std = [0.5] * 3, [0.5] * 3
    assert mean != list(IMAGENET_DEFAULT_MEAN)
    config = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert config["mean"] == mean and config["std"] == std
    pre = Predictor.from_path(folder, device="cpu").preprocess
    assert list(pre.mean) == mean and list(pre.std) == std
    graph = onnx.load(str(folder / "model.onnx")).graph
    consts = [numpy_helper.to_array(t) for t in graph.initializer]
    consts += [
        numpy_helper.to_array(a.t) for n in graph.node for a in n.attribute if a.name == "value"
    ]
    shaped = [c.ravel() for c in consts if c.shape == (1, 3, 1, 1)]
    assert shaped and all(np.allclose(c, 0.5) for c in shaped), shaped
