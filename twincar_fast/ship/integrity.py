"""The weights files of a model folder, checked: a sha256 of each in config.json, written where the
file is written (export, import, ONNX export, int8) and compared on every load.

A flipped byte inside `model.safetensors` still loads (only the numbers change), so without the
hash a damaged folder answers wrongly with no error. json and hashlib only: the ONNX predictor
imports this module without torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twincar_fast.errors import TwincarError
from twincar_fast.ship.card import CONFIG_JSON, read_config

__all__ = ["SHA256_KEY", "check_sha256", "file_sha256", "record_sha256"]

SHA256_KEY = "sha256"  # config.json's twincar.sha256: {file name: hex digest}
_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def record_sha256(config: dict, *files: Path) -> dict:
    """`config` (a config.json dict) with the sha256 of each of `files` recorded by file name."""
    twincar = config.setdefault("twincar", {})
    hashes = dict(twincar.get(SHA256_KEY) or {})
    hashes.update({Path(f).name: file_sha256(f) for f in files})
    twincar[SHA256_KEY] = hashes
    return config


def check_sha256(path: str | os.PathLike) -> None:
    """A one-line TwincarError when the weights file's sha256 differs from config.json's record.

    Folders written before hashes were recorded (no record for this file) load unchecked.
    """
    path = Path(path)
    config_path = path.parent / CONFIG_JSON
    if not config_path.is_file():
        return
    hashes = read_config(config_path).get("twincar", {}).get(SHA256_KEY)
    expected = hashes.get(path.name) if isinstance(hashes, dict) else None
    if expected is None:
        return
    if not isinstance(expected, str) or file_sha256(path) != expected.lower():
        raise TwincarError(
            f"{path}: its sha256 differs from the one {CONFIG_JSON} records (the file was changed "
            "or damaged after export); re-export the model folder (`twincar export` for the ONNX "
            "files) or copy the file again"
        )
