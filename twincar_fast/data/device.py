"""The one device resolver: a device name (`train.device`, `--device`) → a torch device.

Training (the loaders, the learner) and inference (the Predictor) resolve names here, so `auto`
means the same everywhere and a device this machine lacks is refused the same way.
"""

from __future__ import annotations

import torch

from twincar_fast.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(
    name: str | torch.device | None = "auto", key: str = "train.device"
) -> torch.device:
    """`name` as a torch device: auto (or None) = cuda, then mps, then cpu; a one-line
    ConfigError naming `key` for a device torch doesn't know or this machine lacks."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name is None or name in ("", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(
            f"{key}: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and count == 0:
        raise ConfigError(f"{key}: no CUDA GPU is visible for device {name!r}; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ConfigError(
            f"{key}: this machine has {count} CUDA GPU(s), no device {name!r}; "
            f"use cuda:0 … cuda:{count - 1}, auto or cpu"
        )
    if device.type == "mps" and not has_mps:
        raise ConfigError(f"{key}: no MPS (Apple GPU) here for device {name!r}; use auto or cpu")
    return device
