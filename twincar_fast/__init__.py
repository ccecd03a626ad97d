"""twincar_fast: fastai + timm rapid experimentation for fine-grained car recognition.

The public API, re-exported by name. The light part (config, errors) is imported at once; the rest
(fastai, timm, torch) on first use, so that `twincar` can check a config before those load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from twincar_fast.config import ExperimentConfig, load_config, save_config
from twincar_fast.errors import TwincarError

if TYPE_CHECKING:
    from twincar_fast.data import build_dls
    from twincar_fast.experiment import run_experiment
    from twincar_fast.model.learner import create_learner
    from twincar_fast.ship.predict import Predictor

__version__ = "0.1.0"

_LAZY = {
    "build_dls": "twincar_fast.data",
    "create_learner": "twincar_fast.model.learner",
    "run_experiment": "twincar_fast.experiment",
    "Predictor": "twincar_fast.ship.predict",
}

__all__ = [
    "ExperimentConfig",
    "Predictor",
    "TwincarError",
    "__version__",
    "build_dls",
    "create_learner",
    "load_config",
    "run_experiment",
    "save_config",
]


def __getattr__(name: str) -> Any:
    """The heavy half of the API (`build_dls`, `create_learner`, ...), imported on first use."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'twincar_fast' has no attribute {name!r}")
