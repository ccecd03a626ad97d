"""Stanford Cars on disk and in fastai: reading, checking, splitting, caching and loading the prepared set.

The names below load on first use, so that `twincar_fast.data.geometry` and `.images` (NumPy and PIL
only) serve the ONNX predictor without importing fastai.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twincar_fast.data.batches import CachedDL
    from twincar_fast.data.cache import ImageCache, build_cache
    from twincar_fast.data.dataset import (
        check_split,
        ensure_dataset,
        read_annotations,
        read_classes,
        read_rejected,
    )
    from twincar_fast.data.device import resolve_device
    from twincar_fast.data.images import open_region
    from twincar_fast.data.loaders import (
        build_dls,
        build_eval_dls,
        check_classes,
        check_vocab,
        data_summary,
        eval_dl,
        print_data_summary,
    )
    from twincar_fast.data.split import split_train_valid

_LAZY = {
    "CachedDL": "batches",
    "ImageCache": "cache",
    "build_cache": "cache",
    "check_split": "dataset",
    "ensure_dataset": "dataset",
    "read_annotations": "dataset",
    "read_classes": "dataset",
    "read_rejected": "dataset",
    "open_region": "images",
    "build_dls": "loaders",
    "build_eval_dls": "loaders",
    "check_classes": "loaders",
    "check_vocab": "loaders",
    "data_summary": "loaders",
    "eval_dl": "loaders",
    "print_data_summary": "loaders",
    "resolve_device": "device",
    "split_train_valid": "split",
}

__all__ = [
    "CachedDL",
    "ImageCache",
    "build_cache",
    "build_dls",
    "build_eval_dls",
    "check_classes",
    "check_split",
    "check_vocab",
    "data_summary",
    "ensure_dataset",
    "eval_dl",
    "open_region",
    "print_data_summary",
    "read_annotations",
    "read_classes",
    "read_rejected",
    "resolve_device",
    "split_train_valid",
]


def __getattr__(name: str) -> Any:
    """A public name of the data stage, imported from its module on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"twincar_fast.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'twincar_fast.data' has no attribute {name!r}")
