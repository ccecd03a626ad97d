"""`twincar import-torchvision`: a torchvision ResNet state dict (TwinCar's published checkpoint)
becomes a model folder with TwinCar's preprocessing (Resize 256, CenterCrop 224, ImageNet stats).

timm's ResNets name their tensors as torchvision's do, so the body's keys go over unchanged. The
head is either one Linear `fc` (TwinCar README's snippet: 2048 → 196; our `head: timm`, and the
folder then loads with plain timm too) or TwinCar's MLP `fc` (`fc.0` Linear, ReLU, Dropout,
`fc.3` Linear; our `head: mlp`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from twincar_fast.config import ModelConfig
from twincar_fast.data.dataset import read_classes
from twincar_fast.errors import TwincarError
from twincar_fast.run_folder import CONFIG_JSON, SAFETENSORS
from twincar_fast.ship.card import ModelCard
from twincar_fast.ship.export import save_safetensors, write_model_config
from twincar_fast.ship.integrity import file_sha256
from twincar_fast.train.runs import library_versions

__all__ = ["TWINCAR_PREPROCESSING", "import_torchvision", "read_checkpoint"]

# TwinCar's README: Resize(256), CenterCrop(224), ImageNet mean/std
TWINCAR_PREPROCESSING = {
    "item_size": 256,
    "img_size": 224,
    "resize": "short",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "draft": False,  # torchvision decodes in full
}


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a .pth file (weights only; also inside {'state_dict': ...})."""
    if not path.is_file():
        raise TwincarError(f"{path}: checkpoint not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors share no base class
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise TwincarError(f"{path}: not a readable weights-only state dict ({reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise TwincarError(f"{path}: holds no state dict of tensors")
    for key, v in sd.items():  # a NaN or inf weight makes every prediction nan
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise TwincarError(
                f"{path}: tensor '{key}' holds {bad} NaN/inf value(s) of {v.numel()}; "
                "this checkpoint is damaged or diverged: import a good one"
            )
    return {re.sub(r"^module\.", "", k): v for k, v in sd.items()}  # DataParallel saves


def _head(sd: dict, path: Path) -> tuple[str, int, dict]:
    """(head type, hidden size, our head's state dict) of the checkpoint's `fc`."""
    fc = {k[3:]: v for k, v in sd.items() if k.startswith("fc.")}
    if not fc:
        raise TwincarError(f"{path}: no 'fc.*' tensors; give a torchvision ResNet classifier")
    if set(fc) == {"weight", "bias"}:
        return "timm", 0, {"1.weight": fc["weight"], "1.bias": fc["bias"]}
    linears = sorted({int(k.split(".")[0]) for k in fc if re.match(r"^\d+\.(weight|bias)$", k)})
    if len(linears) != 2 or set(fc) != {f"{i}.{p}" for i in linears for p in ("weight", "bias")}:
        raise TwincarError(
            f"{path}: fc has tensors {', '.join(sorted(fc))}; expected one Linear (fc.weight, "
            "fc.bias) or TwinCar's MLP (fc.0 and fc.3: Linear → ReLU → Dropout → Linear)"
        )
    first, last = linears
    # our MLP head: [pool, flatten,] Linear(2), ReLU, Dropout, Linear(5)
    head = {
        f"1.{2 if i == first else 5}.{p}": fc[f"{i}.{p}"]
        for i in linears
        for p in ("weight", "bias")
    }
    return "mlp", int(fc[f"{first}.weight"].shape[0]), head


def _fit(model: nn.Module, state: dict, path: Path, arch: str) -> None:
    """Load `state` strictly into `model`; one-line errors for missing keys or other shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise TwincarError(
            f"{path}: not a torchvision {arch}: {len(missing)} tensors missing "
            f"(e.g. '{missing[0].removeprefix('0.model.')}'); check --arch"
        )
    for k, v in state.items():
        if k not in own or own[k].shape != v.shape:
            where = tuple(own[k].shape) if k in own else "nothing"
            name = k.removeprefix("0.model.")
            raise TwincarError(
                f"{path}: tensor '{name}' has shape {tuple(v.shape)}, {arch} expects {where}; "
                "check --arch and that the file is a torchvision ResNet state dict"
            )
    model.load_state_dict(state)


def _sized_head(sd: dict, path: Path, classes: str | os.PathLike, n_classes: int) -> tuple:
    """`_head` of the checkpoint, checked to have one output per class of `classes`."""
    head, hidden, head_sd = _head(sd, path)
    n_out = next(v for k, v in reversed(head_sd.items()) if k.endswith("weight")).shape[0]
    if n_out != n_classes:
        raise TwincarError(
            f"{path}: the head has {n_out} outputs but {classes} lists {n_classes} classes; "
            "give the classes.csv the model was trained with"
        )
    return head, hidden, head_sd


def _write_folder(out: Path, model: nn.Module, card: ModelCard, path: Path) -> None:
    """Save the weights and config.json, which names the checkpoint and its hash, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors(model, out / SAFETENSORS, card.weights_layout)
    source = {"checkpoint": str(path.resolve()), "sha256": file_sha256(path), "head": card.head}
    info = {
        "source": source,
        "versions": library_versions(),
        "sha256": {weights.name: file_sha256(weights)},
    }
    write_model_config(out, card, model[0].model.num_features, info)


def import_torchvision(
    checkpoint: str | os.PathLike,
    classes: str | os.PathLike,
    out: str | os.PathLike,
    arch: str = "resnet50",
) -> Path:
    """Write a model folder from a torchvision ResNet state dict and its classes.csv.

    Args:
        checkpoint: the .pth state dict (torchvision key names, `fc` = Linear or TwinCar's MLP).
        classes: a classes.csv (class_id,label) in the order of the checkpoint's outputs.
        out: the new model folder (must not hold a model yet).
        arch: the timm/torchvision ResNet name.
    """
    from twincar_fast.model.learner import check_arch, create_model

    path, out, labels = Path(checkpoint), Path(out), read_classes(classes)
    if (out / SAFETENSORS).exists() or (out / CONFIG_JSON).exists():
        raise TwincarError(f"{out} already holds a model; give another --out folder")
    check_arch(arch)
    sd = read_checkpoint(path)
    head, hidden, head_sd = _sized_head(sd, path, classes, len(labels))
    cfg = ModelConfig(arch=arch, pretrained=False, head=head, head_hidden=hidden or 512)
    model = create_model(cfg, len(labels), pretrained=False)
    body = {f"0.model.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    _fit(model, {**body, **head_sd}, path, arch)
    layout = "timm" if head == "timm" else "twincar"
    card = ModelCard(
        arch=arch, classes=labels, head=head, head_hidden=cfg.head_hidden, weights_layout=layout,
        **TWINCAR_PREPROCESSING,
    )  # fmt: skip
    _write_folder(out, model, card, path)
    return out
