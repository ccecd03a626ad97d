"""What training adds to a run folder (`run_folder.RunFolder`): the resume point, the snapshot.

An interrupted run is continued in its own folders (`run_folder.open_resume`) from `resume_point`;
`write_snapshot` records what a person needs to trust and reproduce it (config.yaml, env.json,
classes.csv).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pandas as pd
import torch
from fastai.learner import Learner

from twincar_fast.config import ExperimentConfig, save_config
from twincar_fast.data import read_classes
from twincar_fast.files import write_csv, write_json
from twincar_fast.run_folder import RunFolder
from twincar_fast.train.callbacks import METRICS_COLUMNS
from twincar_fast.train.distributed import is_main

__all__ = ["env_info", "library_versions", "resume_point", "write_snapshot"]


def resume_point(folder: RunFolder) -> tuple[int, list[dict]]:
    """(epochs finished, their metrics.csv rows), and metrics.csv cut back to those rows (a row
    whose checkpoint never landed is done again)."""
    state = folder.resume_state()
    if folder.metrics_csv.is_file() and is_main():  # (several processes: rank 0 writes)
        write_csv(folder.metrics_csv, pd.DataFrame(state.rows, columns=METRICS_COLUMNS))
    return state.done, state.rows


def _git_commit() -> dict:
    """The package's git commit and whether the tree had changes (None outside a checkout)."""
    try:
        here = Path(__file__).parent
        run = lambda *a: subprocess.run(  # noqa: E731
            ["git", *a], cwd=here, capture_output=True, text=True, timeout=10
        )
        head, status = run("rev-parse", "HEAD"), run("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if head.returncode:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def library_versions() -> dict[str, str]:
    """The versions of twincar_fast and the libraries a run or a model folder is made with (each
    module's own `__version__`: torch's names its CUDA build, which the package metadata drops)."""
    import fastai
    import timm
    import torchvision

    from twincar_fast import __version__

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastai": fastai.__version__,
        "timm": timm.__version__,
        "twincar_fast": __version__,
    }


def env_info(learn: Learner) -> dict:
    """Versions, device and git commit: what a person needs to reproduce the run."""
    device = next(learn.model.parameters()).device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **library_versions(),
        "device": str(device),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        **_git_commit(),
    }


def write_snapshot(
    cfg: ExperimentConfig, folder: RunFolder, learn: Learner, data_dir: Path
) -> None:
    """config.yaml, env.json and classes.csv of the run (kept as they are on resume)."""
    if not folder.config_yaml.is_file():
        save_config(cfg, folder.config_yaml)
    if not folder.env_json.is_file():
        write_json(folder.env_json, env_info(learn))
    classes = read_classes(data_dir)
    table = pd.DataFrame({"class_id": range(len(classes)), "label": classes})
    write_csv(folder.classes_csv, table)
