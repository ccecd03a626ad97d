"""What a timm model expects of its input: its normalization statistics, from `pretrained_cfg`.

fastai's `vision_learner` normalizes a timm model with the mean and std of its `pretrained_cfg`
(`_timm_norm`), and timm's own training script does the same for every model, from scratch too:
ImageNet's for ResNets, 0.5/0.5 for ViTs, Inception and `test_resnet`. The loaders normalize with
these; the export writes them into config.json, where the Predictor, ONNX and the app read them.
"""

from __future__ import annotations

import difflib

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from twincar_fast.errors import ConfigError

__all__ = ["check_arch", "model_stats"]

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def check_arch(arch: str) -> None:
    """Raise a ConfigError with close matches unless `arch` is a timm model name."""
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
    raise ConfigError(f"model.arch: {arch!r} is not a timm model; {hint}")


def model_stats(arch: str) -> Stats:
    """The normalization (mean, std) of 0-1 RGB pixels that timm's `arch` takes."""
    check_arch(arch)
    cfg = timm.models.get_pretrained_cfg(arch)
    mean = getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN
    std = getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
