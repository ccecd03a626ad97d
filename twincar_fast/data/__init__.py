"""Stanford Cars on disk and in fastai: reading, checking, splitting, caching and loading the prepared set."""

from twincar_fast.data.batches import CachedDL
from twincar_fast.data.cache import ImageCache, build_cache
from twincar_fast.data.dataset import (
    check_split,
    ensure_dataset,
    read_annotations,
    read_classes,
    read_rejected,
)
from twincar_fast.data.images import open_region
from twincar_fast.data.loaders import (
    build_dls,
    build_eval_dls,
    check_classes,
    check_vocab,
    data_summary,
    eval_dl,
    print_data_summary,
    resolve_device,
)
from twincar_fast.data.split import split_train_valid

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
