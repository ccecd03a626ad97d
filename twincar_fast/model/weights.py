"""Local weights files into a model: a timm, torchvision or TwinCar state dict (`model.weights`).

The body takes whatever matches the timm network (its classifier left out); a TwinCar file's head
loads too when it fits the data's classes. A file for another architecture is a one-line error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch
from torch import nn

from twincar_fast.errors import ConfigError

__all__ = ["load_weights"]

log = logging.getLogger(__name__)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors/.pth file (also inside {'model': ...} / {'state_dict': ...})."""
    if path.is_dir():
        raise ConfigError(f"model.weights: {path} is a folder; give a .safetensors/.pth file in it")
    if not path.is_file():
        raise ConfigError(
            f"model.weights: {path} not found; give the path of a .safetensors/.pth file"
        )
    try:
        sd = timm.models.load_state_dict(str(path), use_ema=False)
    except Exception as e:  # safetensors, pickle and zip errors share no base class
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ConfigError(
            f"model.weights: {path} is not a readable .safetensors/.pth state dict "
            f"({type(e).__name__}: {first})"
        ) from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ConfigError(f"model.weights: {path} holds no state dict of tensors")
    return sd


def _split_state_dict(sd: dict, net: nn.Module, path: Path) -> tuple[dict, dict]:
    """(body keys, head keys) of a file saved from our model (`0.*`/`1.*`) or a timm/torchvision one."""
    if all(k.split(".", 1)[0] in ("0", "1") for k in sd):
        body = {re.sub(r"^0\.(model\.)?", "", k): v for k, v in sd.items() if k.startswith("0.")}
        return body, {k[2:]: v for k, v in sd.items() if k.startswith("1.")}
    classifier = net.pretrained_cfg.get("classifier") or "fc"
    drop = tuple(f"{c}." for c in ((classifier,) if isinstance(classifier, str) else classifier))
    dropped = [k for k in sd if k.startswith(drop)]
    if dropped:
        log.info("%s: left out the classifier (%d tensors: %s...)", path, len(dropped), dropped[0])
    return {k: v for k, v in sd.items() if not k.startswith(drop)}, {}


def _load_body(net: nn.Module, sd: dict, path: Path, arch: str) -> dict[str, list[str]]:
    """Load `sd` into the timm model; ConfigError when it is for another architecture."""
    own = net.state_dict()
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        raise ConfigError(
            f"model.weights: {path} is not for {arch}: {len(bad)} tensors have other shapes "
            f"(e.g. {k}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in {arch})"
        )
    found = [k for k in own if k in sd]
    if len(found) < len(own) / 2:
        missing = next(k for k in own if k not in sd)
        raise ConfigError(
            f"model.weights: {path} is not for {arch}: only {len(found)} of its {len(own)} tensors "
            f"are in the file (e.g. no '{missing}')"
        )
    res = net.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        log.warning(
            "%s: %d missing keys (%s), %d unexpected keys (%s)",
            path,
            len(res.missing_keys),
            ", ".join(res.missing_keys[:3]),
            len(res.unexpected_keys),
            ", ".join(res.unexpected_keys[:3]),
        )
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys)}


def _final_out_features(head_sd: dict) -> int | None:
    """Out features of the head's last Linear in a saved head state dict (keys `<idx>.weight`)."""
    linears = [
        (int(k.split(".")[0]), v) for k, v in head_sd.items() if re.match(r"^\d+\.weight$", k)
    ]
    linears = [(i, v) for i, v in linears if v.ndim == 2]
    return max(linears, key=lambda iv: iv[0])[1].shape[0] if linears else None


def _load_head(head: nn.Module, head_sd: dict, n_classes: int, path: Path) -> None:
    """Load a saved head; ConfigError when it is for another class count or head layout."""
    n_out = _final_out_features(head_sd)
    if n_out is not None and n_out != n_classes:
        raise ConfigError(
            f"model.weights: {path} holds a head for {n_out} classes but the data has {n_classes}; "
            "use a file with the body only (timm/torchvision state dict) or the matching data"
        )
    try:
        head.load_state_dict(head_sd)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(
            f"model.weights: {path} holds another head ({detail[:160]}); "
            "set model.head/head_hidden as when it was saved"
        ) from None


def load_weights(model: nn.Module, path: str | Path, n_classes: int) -> dict[str, list[str]]:
    """Load a local state dict (timm, torchvision or our own model) into `model`; missing/unexpected keys."""
    path = Path(path).expanduser()
    sd = _read_state_dict(path)
    net = model[0].model
    body_sd, head_sd = _split_state_dict(sd, net, path)
    report = _load_body(net, body_sd, path, net.pretrained_cfg.get("architecture", "the model"))
    if head_sd:
        _load_head(model[1], head_sd, n_classes, path)
    return report
