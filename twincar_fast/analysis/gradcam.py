"""Grad-CAM++ for the timm body inside fastai's model: target layer, maps, overlays, box masks.

pytorch-grad-cam's `GradCAMPlusPlus` hooks the last feature stage of the body (model[0]; for
ResNets the last block of `layer4`, else timm's last `feature_info` module, else the last module
with a 4D output) and explains one class per image (`ClassifierOutputTarget`); Finer-CAM
(`model_finer_cams`: pytorch-grad-cam's `FinerCAM` on the same layer) explains a class against its
twin instead. Maps come at the model's input size, so they line up with the validation-transformed
image (`denormalize`) and with boxes mapped through the same geometry (`box_masks`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from pytorch_grad_cam import FinerCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget, FinerWeightedTarget
from torch import nn

from twincar_fast.data.geometry import InputGeometry
from twincar_fast.errors import TwincarError

__all__ = [
    "batch_tensor",
    "box_mass_ratio",
    "box_masks",
    "denormalize",
    "find_target_layer",
    "gradcam_maps",
    "model_cams",
    "model_finer_cams",
    "overlay",
]

FINER_ALPHA = 1.0  # FinerCAM's default: the twin's whole logit is subtracted from the target's


def _body(model: nn.Module) -> nn.Module:
    """The timm body inside fastai's model (model[0]; TimmBody keeps it in `.model`)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    body = model[0] if isinstance(model, nn.Sequential) and len(model) > 1 else model
    inner = getattr(body, "model", None)
    return inner if isinstance(inner, nn.Module) else body


def _last_spatial_module(body: nn.Module) -> nn.Module:
    """The last sub-module (in call order) of `body` whose output is a 4D feature map."""
    done: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: done.append(m) if getattr(o, "ndim", 0) == 4 else None
        )
        for m in body.modules()
        if m is not body
    ]
    p, training = next(body.parameters()), body.training
    try:
        with torch.no_grad():
            body.eval()(torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype))
    finally:
        body.train(training)
        for h in hooks:
            h.remove()
    if not done:
        raise TwincarError(f"Grad-CAM++: no layer of {type(body).__name__} gives a feature map")
    return done[-1]


def find_target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM++ explains: ResNet `layer4[-1]`, else timm's last feature stage."""
    body = _body(model)
    if isinstance(getattr(body, "layer4", None), nn.Sequential):
        return body.layer4[-1]
    info = getattr(body, "feature_info", None)
    if isinstance(info, list) and info and "module" in info[-1]:
        try:
            return body.get_submodule(info[-1]["module"])
        except AttributeError:
            pass
    return _last_spatial_module(body)


def _to_nchw(t: torch.Tensor) -> torch.Tensor:
    """Token outputs (B, N, C) of vision transformers as a (B, C, h, w) map; others unchanged."""
    if t.ndim != 3:
        return t
    side = math.isqrt(t.shape[1])
    grid = t[:, t.shape[1] - side * side :, :]  # drop class/register tokens in front
    return grid.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)


def batch_tensor(learn: Learner, images) -> torch.Tensor:
    """A normalized input batch from a tensor, image files or PIL images (validation transforms)."""
    if isinstance(images, torch.Tensor):
        return images
    items = [Path(p) if isinstance(p, (str, os.PathLike)) else p for p in images]
    dl = learn.dls.test_dl(items, with_labels=False, bs=max(1, min(len(items), 64)))
    return torch.cat([b[0] for b in dl])


@contextmanager
def _eager(model: nn.Module) -> Iterator[None]:
    """Run a model compiled in place (`model.compile()`) eagerly, so Grad-CAM's hooks fire."""
    compiled = getattr(model, "_compiled_call_impl", None)
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled


def gradcam_maps(
    learn: Learner,
    images: torch.Tensor | Sequence,
    targets: Sequence[int] | None = None,
    layer: nn.Module | None = None,
    bs: int = 32,
) -> np.ndarray:
    """Grad-CAM++ maps (N, H, W) in [0, 1] at the input size, one per image, for `targets`.

    Args:
        learn: the learner whose model is explained.
        images: a normalized input batch (N, 3, H, W) or items its dls can load (file paths).
        targets: the class id to explain per image; None = the predicted class.
        layer: the hooked layer; None = `find_target_layer(learn.model)`.
        bs: images per forward/backward pass.
    """
    return model_cams(learn.model, batch_tensor(learn, images), targets, layer, bs)


def model_cams(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int] | None = None,
    layer: nn.Module | None = None,
    bs: int = 32,
) -> np.ndarray:
    """Grad-CAM++ maps (N, H, W) of a model on a normalized input batch (as `gradcam_maps`)."""
    model = getattr(model, "_orig_mod", model)
    layer = layer or find_target_layer(model)
    objs = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    with _eager(model), GradCAMPlusPlus(model, [layer], reshape_transform=_to_nchw) as cam:
        return _cam_batches(cam, model, x, objs, bs)


def model_finer_cams(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int],
    twins: Sequence[int],
    alpha: float = FINER_ALPHA,
    layer: nn.Module | None = None,
    bs: int = 32,
) -> np.ndarray:
    """Finer-CAM maps (N, H, W) in [0, 1]: what tells each image's target from its twin class.

    pytorch-grad-cam's `FinerCAM` with `FinerWeightedTarget(target, [twin], alpha)`: the map of
    the target's logit minus `alpha` × the twin's, computed by Grad-CAM++ (`base_method`) on the
    layer `find_target_layer` picks, so it differs from `model_cams` only in what it explains.
    """
    model = getattr(model, "_orig_mod", model)
    layer = layer or find_target_layer(model)
    objs = [
        FinerWeightedTarget(int(t), [int(b)], alpha) for t, b in zip(targets, twins, strict=True)
    ]
    base = GradCAMPlusPlus
    with _eager(model), FinerCAM(model, [layer], _to_nchw, base_method=base) as cam:
        return _cam_batches(cam, model, x, objs, bs)


def _cam_batches(cam, model: nn.Module, x: torch.Tensor, targets: list | None, bs: int):
    """The maps of a pytorch-grad-cam `cam` over `x` in batches of `bs` (targets per image)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), bs):
        xb = x[i : i + bs].as_subclass(torch.Tensor).to(device).float()  # plain tensor:
        xb.requires_grad_(True)  # fastai's subclasses break grad-cam's hooks; grads if frozen
        out.append(cam(input_tensor=xb, targets=None if targets is None else targets[i : i + bs]))
    return np.concatenate(out) if out else np.zeros((0, *x.shape[-2:]), np.float32)


def denormalize(learn: Learner, x: torch.Tensor) -> np.ndarray:
    """The RGB images (N, H, W, 3) in [0, 1] behind a normalized input batch."""
    x = x.detach().float().cpu()
    for t in learn.dls.after_batch.fs:
        if isinstance(t, Normalize) and t.mean is not None:
            x = x * t.std.float().cpu() + t.mean.float().cpu()
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def overlay(rgb: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The CAM drawn as a heat map over the image (uint8 RGB)."""
    return show_cam_on_image(rgb.astype(np.float32), cam, use_rgb=True, image_weight=0.55)


def box_masks(
    learn: Learner,
    sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Sequence[float]],
    car_boxes: Sequence[Sequence[float] | None] | None = None,
) -> np.ndarray:
    """Where boxes (x1, y1, x2, y2; 1-based inclusive) of W×H images land in the model input.

    Mapped through the learner's own validation geometry (`data.geometry.InputGeometry`: car-box
    crop with its margin, resize, resample), the one the loader cuts the pixels with, so the
    (N, H, W) bool masks match the CAMs. `car_boxes`: each image's car box, for `bbox_crop`.
    """
    geo = InputGeometry.from_dls(learn.dls)
    cars = car_boxes if car_boxes is not None else [None] * len(boxes)
    masks = [
        geo.mask((int(w), int(h)), box, car)
        for (w, h), box, car in zip(sizes, boxes, cars, strict=True)
    ]
    return np.stack(masks) if masks else np.zeros((0, geo.img_size, geo.img_size), bool)


def box_mass_ratio(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per map: share of its mass inside the box ÷ the box's share of the image (1 = no focus)."""
    mass = cams.reshape(len(cams), -1).sum(1)
    inside = (cams * masks).reshape(len(cams), -1).sum(1) / np.maximum(mass, 1e-12)
    area = masks.reshape(len(masks), -1).mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area > 0, inside / area, np.nan)
