"""Run folders: claim `reports/<run>/` + `models/<run>/`, reopen one to resume, snapshot the setup.

A run never reuses a folder (`create_run_folders`); an interrupted run is continued in its own
folders (`open_resume`, `resume_point`) with its own config; `write_snapshot` records what a person
needs to trust and reproduce it (config.yaml, env.json, classes.csv).
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
from twincar_fast.errors import TwincarError
from twincar_fast.files import write_csv, write_json
from twincar_fast.train.callbacks import METRICS_COLUMNS
from twincar_fast.train.distributed import is_main
from twincar_fast.train.folders import RunFolders, create_run_folders, lock_run, open_resume

__all__ = [
    "RunFolders",
    "create_run_folders",
    "env_info",
    "library_versions",
    "lock_run",
    "open_resume",
    "resume_point",
    "write_snapshot",
]


def _read_metrics(csv: Path) -> list[dict]:
    """metrics.csv rows ([] when missing or 0 bytes); a one-line error when it can't be read."""
    if not csv.is_file() or not csv.stat().st_size:
        return []
    try:
        return pd.read_csv(csv).to_dict("records")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        reason = " ".join(str(e).split())[:120]
        raise TwincarError(f"{csv}: can't read it to resume ({reason}); start a new run") from None


def resume_point(folders: RunFolders) -> tuple[int, list[dict]]:
    """(epochs finished, their metrics.csv rows): rows up to the newest last-epoch checkpoint."""
    csv = folders.metrics_csv
    rows = _read_metrics(csv)
    ckpts = sorted(folders.ckpt_dir.glob("last-epoch*.pth"))
    done = 0
    for path in ckpts:
        k = int(path.stem.removeprefix("last-epoch"))
        if k < len(rows) and [r["epoch"] for r in rows[: k + 1]] == list(range(k + 1)):
            done = max(done, k + 1)
    if done == 0 and (rows or ckpts):  # never restart a run whose epochs can't be matched up
        raise TwincarError(
            f"{folders.report_dir}: {len(rows)} epoch(s) in metrics.csv but no matching "
            f"last-epoch checkpoint in {folders.ckpt_dir}; resuming would restart it: start a new run"
        )
    rows = rows[:done]  # a row whose checkpoint never landed is done again
    if csv.is_file() and is_main():  # (several processes: rank 0 writes)
        write_csv(csv, pd.DataFrame(rows, columns=METRICS_COLUMNS))
    return done, rows


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
    cfg: ExperimentConfig, folders: RunFolders, learn: Learner, data_dir: Path
) -> None:
    """config.yaml, env.json and classes.csv of the run (kept as they are on resume)."""
    r = folders.report_dir
    if not (r / "config.yaml").is_file():
        save_config(cfg, r / "config.yaml")
    if not (r / "env.json").is_file():
        write_json(r / "env.json", env_info(learn))
    classes = read_classes(data_dir)
    write_csv(r / "classes.csv", pd.DataFrame({"class_id": range(len(classes)), "label": classes}))
