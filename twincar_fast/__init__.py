"""twincar_fast: fastai + timm rapid experimentation for fine-grained car recognition.

The public API, re-exported by name. The light part (config, errors) is imported at once; the rest
(fastai, timm, torch) on first use, so that `twincar` can check a config before those load.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

from twincar_fast.config import ExperimentConfig, load_config, save_config
from twincar_fast.errors import TwincarError

if TYPE_CHECKING:
    from twincar_fast.data import build_dls
    from twincar_fast.experiment import run_experiment
    from twincar_fast.model.learner import create_learner
    from twincar_fast.ship.predict import Predictor

try:  # one source for the version: the installed distribution's (pyproject.toml)
    __version__ = importlib.metadata.version("twincar-fast")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


class _QuietFastaiLayers(importlib.abc.MetaPathFinder):
    """Import `fastai.layers` with torch's `torch.jit.script` deprecation notice silenced.

    fastai decorates four activations with `torch.jit.script` in that module's body, so torch
    warns when our imports first load fastai; the notice is not the user's to act on. Only that
    one module's import is silenced (the user's own `torch.jit.script` calls still warn), and
    the finder removes itself after it.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "fastai.layers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def quiet_exec(module) -> None:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", r"`torch\.jit\.script` is deprecated", category=FutureWarning
                )
                exec_module(module)

        loader.exec_module = quiet_exec
        return spec


if "fastai.layers" not in sys.modules:
    sys.meta_path.insert(0, _QuietFastaiLayers())

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
