"""Run folders: claim `reports/<run>/` + `models/<run>/`, reopen one to resume, snapshot the setup.

A run never reuses a folder (`create_run_folders`); an interrupted run is continued in its own
folders (`open_resume`, `resume_point`) with its own config; `write_snapshot` records what a person
needs to trust and reproduce it (config.yaml, env.json, classes.csv).
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
from fastai.learner import Learner

from twincar_fast.config import ExperimentConfig, config_to_dict, load_config, save_config
from twincar_fast.data import read_classes
from twincar_fast.errors import ConfigError, TwincarError
from twincar_fast.files import new_run_name, write_csv, write_json

__all__ = [
    "RunFolders",
    "create_run_folders",
    "env_info",
    "open_resume",
    "resume_point",
    "write_snapshot",
]

_RESUME_MAY_CHANGE = {"train.device", "data.num_workers"}  # where a run trains, not what it learns


@dataclass(frozen=True)
class RunFolders:
    """A run's two folders: reports/<run>/ and models/<run>/."""

    name: str
    report_dir: Path
    model_dir: Path

    @property
    def ckpt_dir(self) -> Path:
        """models/<run>/checkpoints/: fastai checkpoints with optimizer state."""
        return self.model_dir / "checkpoints"

    @property
    def metrics_csv(self) -> Path:
        """reports/<run>/metrics.csv."""
        return self.report_dir / "metrics.csv"


def create_run_folders(cfg: ExperimentConfig, now: datetime | None = None) -> RunFolders:
    """Claim new `reports/<run>/` and `models/<run>/` folders (`<run>` = name-timestamp[-n])."""
    reports, models = Path(cfg.reports_dir), Path(cfg.models_dir)
    while True:
        name = new_run_name(cfg.name or "run", [reports, models], now)
        try:  # mkdir is the lock: two runs started in the same second get different folders
            (reports / name).mkdir(parents=True)
        except FileExistsError:
            continue
        (models / name).mkdir(parents=True, exist_ok=True)
        return RunFolders(name, reports / name, models / name)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested config dict → {'section.key': value}."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_config(saved: ExperimentConfig, cfg: ExperimentConfig, run_dir: Path) -> None:
    """ConfigError unless `cfg` is the run's saved config (device and workers may differ)."""
    a, b = _flat(config_to_dict(saved)), _flat(config_to_dict(cfg))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    diff = [k for k in diff if k not in _RESUME_MAY_CHANGE]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{run_dir / 'config.yaml'}: --resume needs the run's own config, but {k} is "
            f"{a.get(k)!r} there and {b.get(k)!r} here; resume with "
            f"`twincar train {run_dir / 'config.yaml'} --resume {run_dir}`"
        )


def open_resume(run_dir: str | os.PathLike, cfg: ExperimentConfig) -> RunFolders:
    """The folders of an interrupted run to continue; one-line TwincarError when it can't be."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoints").is_dir() and not (run_dir / "config.yaml").exists():
        run_dir = Path(cfg.reports_dir) / run_dir.name  # models/<run> given: use its reports twin
    if not run_dir.is_dir():
        raise TwincarError(
            f"{run_dir}: no such run folder; give the reports/<run> folder to resume"
        )
    if not (run_dir / "config.yaml").is_file():
        raise TwincarError(f"{run_dir}: not a run folder (no config.yaml); give reports/<run>")
    if (run_dir / "summary.json").is_file():
        raise TwincarError(
            f"{run_dir}: run already finished (summary.json exists); start a new run instead"
        )
    _check_same_config(load_config(run_dir / "config.yaml"), cfg, run_dir)
    return RunFolders(run_dir.name, run_dir, Path(cfg.models_dir) / run_dir.name)


def resume_point(folders: RunFolders) -> tuple[int, list[dict]]:
    """(epochs finished, their metrics.csv rows): rows up to the newest last-epoch checkpoint."""
    csv = folders.metrics_csv
    rows = pd.read_csv(csv).to_dict("records") if csv.is_file() and csv.stat().st_size else []
    done = 0
    for path in folders.ckpt_dir.glob("last-epoch*.pth"):
        k = int(path.stem.removeprefix("last-epoch"))
        if k < len(rows) and [r["epoch"] for r in rows[: k + 1]] == list(range(k + 1)):
            done = max(done, k + 1)
    rows = rows[:done]  # a row whose checkpoint never landed is done again
    if csv.is_file():
        write_csv(csv, pd.DataFrame(rows, columns=pd.read_csv(csv).columns))
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


def env_info(learn: Learner) -> dict:
    """Versions, device and git commit: what a person needs to reproduce the run."""
    import fastai
    import timm
    import torchvision

    from twincar_fast import __version__

    device = next(learn.model.parameters()).device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastai": fastai.__version__,
        "timm": timm.__version__,
        "twincar_fast": __version__,
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
