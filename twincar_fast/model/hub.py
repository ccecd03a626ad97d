"""timm hub weights offline: find them in the local cache, or say at once that they can't be fetched."""

from __future__ import annotations

import os
import socket

import timm

from twincar_fast.errors import ConfigError
from twincar_fast.run_folder import SAFETENSORS

__all__ = ["check_hub_reachable"]


def _hub_cached(arch: str) -> bool:
    """Whether timm's hub weights of `arch` are in the local Hugging Face cache already."""
    from huggingface_hub import try_to_load_from_cache

    repo = getattr(timm.models.get_pretrained_cfg(arch), "hf_hub_id", None)
    files = (SAFETENSORS, "pytorch_model.bin", "open_clip_pytorch_model.bin")  # (hub's names)
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def check_hub_reachable(arch: str) -> None:
    """ConfigError at once when uncached hub weights can't be fetched (offline or no network)."""
    if _hub_cached(arch):
        return
    hint = "set model.weights to a local .safetensors/.pth file, or model.pretrained: false"
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    offline = [v for v in names if os.environ.get(v, "0").lower() not in ("0", "false", "")]
    offline += ["HF_HUB_OFFLINE"] * bool(constants.HF_HUB_OFFLINE)
    if offline:
        raise ConfigError(
            f"model.pretrained: {arch} weights are not cached and {offline[0]} is set (offline); {hint}"
        )
    try:  # one short attempt instead of the hub client's minute of retries
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as e:
        raise ConfigError(
            f"model.pretrained: no network to download {arch} weights from the timm hub "
            f"({e.strerror or type(e).__name__}); {hint}"
        ) from None
