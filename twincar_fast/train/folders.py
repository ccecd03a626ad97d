"""Run folders, light enough for the CLI: claim a new pair, lock one, reopen one to resume or finish.

Only the standard library and the config are imported here, so that `twincar train --resume` can
refuse a finished or busy run in a second, before torch and fastai load.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from twincar_fast.config import ExperimentConfig, config_to_dict, flat_dict, load_config
from twincar_fast.errors import ConfigError, TwincarError
from twincar_fast.files import check_folder, new_run_name, write_text

__all__ = [
    "RUN_NOTE_ENV",
    "RunFolders",
    "create_run_folders",
    "lock_run",
    "missing_steps",
    "open_resume",
]

RUN_NOTE_ENV = (
    "TWINCAR_RUN_NOTE"  # set by `twincar train --processes`: a file to name the new run in
)

_RESUME_MAY_CHANGE = {"train.device", "data.num_workers"}  # where a run trains, not what it learns
_LOCK = ".lock"
_TRIES = 100  # claims of a new run name before giving up (a race lost 100 times is a bug)


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

    @property
    def finished(self) -> bool:
        """Whether training ended (summary.json written); evaluation or the report may be missing."""
        return (self.report_dir / "summary.json").is_file()


def create_run_folders(cfg: ExperimentConfig, now: datetime | None = None) -> RunFolders:
    """Claim new `reports/<run>/` and `models/<run>/` folders (`<run>` = name-timestamp[-n])."""
    reports, models = Path(cfg.reports_dir), Path(cfg.models_dir)
    for key, folder in (("reports_dir", reports), ("models_dir", models)):
        check_folder(folder, key)
    for _ in range(_TRIES):
        name = new_run_name(cfg.name or "run", [reports, models], now)
        try:  # mkdir is the lock: two runs started in the same second get different folders
            (reports / name).mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as e:
            raise TwincarError(
                f"{reports}: can't create a run folder here ({e.strerror})"
            ) from None
        try:
            (models / name).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            (reports / name).rmdir()  # nothing half-way: no orphan report folder
            raise TwincarError(f"{models}: can't create a run folder here ({e.strerror})") from None
        _note_run(reports / name)
        return RunFolders(name, reports / name, models / name)
    raise TwincarError(f"{reports}: no free run name after {_TRIES} tries; check the folder")


def _note_run(report_dir: Path) -> None:
    """Tell the launcher that started this process where its run lives (for a resume hint)."""
    note = os.environ.get(RUN_NOTE_ENV)
    if note:
        write_text(note, str(report_dir))


class lock_run:  # noqa: N801 - used like a function: `with lock_run(folders):`
    """Hold an exclusive lock on a run folder while a process trains in it (released on exit)."""

    def __init__(self, folders: RunFolders):
        self.path = folders.report_dir / _LOCK

    def __enter__(self) -> lock_run:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise TwincarError(
                f"{self.path.parent}: this run is in use by process {holder}; "
                "wait for it to end (or stop it) before resuming"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the lock; a killed process releases it too


def _check_same_config(saved: ExperimentConfig, cfg: ExperimentConfig, run_dir: Path) -> None:
    """ConfigError unless `cfg` is the run's saved config (device and workers may differ)."""
    a, b = flat_dict(config_to_dict(saved)), flat_dict(config_to_dict(cfg))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    diff = [k for k in diff if k not in _RESUME_MAY_CHANGE]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{run_dir / 'config.yaml'}: --resume needs the run's own config, but {k} is "
            f"{a.get(k)!r} there and {b.get(k)!r} here; resume with "
            f"`twincar train {run_dir / 'config.yaml'} --resume {run_dir}`"
        )


def missing_steps(report_dir: Path, cfg: ExperimentConfig) -> list[str]:
    """The end-of-run steps a trained run still lacks: 'test evaluation', 'report'."""
    missing = []
    if cfg.eval.test and not (report_dir / "eval_test.json").is_file():
        missing.append("test evaluation")
    if cfg.eval.interpret and not (report_dir / "index.html").is_file():
        missing.append("report")
    return missing


def open_resume(run_dir: str | os.PathLike, cfg: ExperimentConfig) -> RunFolders:
    """The folders of an interrupted run to continue (or finish); one-line TwincarError if it can't."""
    run_dir = Path(run_dir).expanduser()
    if (run_dir / "checkpoints").is_dir() and not (run_dir / "config.yaml").exists():
        run_dir = Path(cfg.reports_dir) / run_dir.name  # models/<run> given: use its reports twin
    if not run_dir.is_dir():
        raise TwincarError(
            f"{run_dir}: no such run folder; give the reports/<run> folder to resume"
        )
    if not (run_dir / "config.yaml").is_file():
        raise TwincarError(f"{run_dir}: not a run folder (no config.yaml); give reports/<run>")
    _check_same_config(load_config(run_dir / "config.yaml"), cfg, run_dir)
    folders = RunFolders(run_dir.name, run_dir, Path(cfg.models_dir) / run_dir.name)
    if folders.finished and not missing_steps(run_dir, cfg):
        raise TwincarError(
            f"{run_dir}: run already finished (summary.json, evaluation and report are there); "
            "start a new run instead"
        )
    if not folders.model_dir.is_dir():
        raise TwincarError(
            f"{folders.model_dir}: the run's model folder is missing (models_dir "
            f"{cfg.models_dir!r}); it can't be resumed without its checkpoints"
        )
    return folders
