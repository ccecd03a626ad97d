"""twincar_fast: fastai + timm rapid experimentation for fine-grained car recognition."""

from twincar_fast.config import ExperimentConfig, load_config, save_config
from twincar_fast.errors import TwincarError

__version__ = "0.1.0"

__all__ = ["ExperimentConfig", "TwincarError", "__version__", "load_config", "save_config"]
