"""`twincar sweep`: many ordinary runs of one experiment, chosen by Optuna, sharing one study.

Each trial is `run_experiment` on the config plus the trial's overrides, in
`reports/<sweep>/<trial>/` and `models/<sweep>/<trial>/`; its objective is `train.monitor` on the
validation split (the test split never chooses). The sweep command itself only plans, starts W
worker processes (`python -m twincar_fast.lab.worker`) and shows their trials live; the workers
claim trials from the study until none is left. Re-running the command continues the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from twincar_fast.config import ExperimentConfig, check_name, load_config
from twincar_fast.console import console, plain_output
from twincar_fast.errors import TwincarError
from twincar_fast.files import write_json
from twincar_fast.lab.space import SearchSpec, check_space
from twincar_fast.lab.study import (
    claim_trial,
    hidden_url,
    open_storage,
    open_study,
    recover_dead_trials,
    trials_left,
)
from twincar_fast.run_folder import STUDY_DB, SWEEP_JSON, open_resume

__all__ = ["Sweep", "die_with_parent", "plan_sweep", "run_sweep", "run_worker", "STORAGE_ENV"]

STORAGE_ENV = "TWINCAR_SWEEP_STORAGE"  # the URL reaches workers here, never in a file
PARENT_ENV = "TWINCAR_SWEEP_PARENT"  # the sweep's pid: a worker dies with it


@dataclass
class Sweep:
    """A planned sweep: the experiment, its search, where the study and trial folders live."""

    name: str
    config: str  # the experiment YAML
    spec: SearchSpec
    storage: str  # SQLAlchemy URL
    reports_dir: str  # reports/<sweep>/
    models_dir: str  # models/<sweep>/
    direction: str  # minimize or maximize train.monitor
    seed: int  # train.seed of the base config: seed 0 of every point, and the samplers' seed
    prune: bool = False

    def to_json(self) -> dict:
        """sweep.json: everything a worker needs except the storage URL's password."""
        d = dataclasses.asdict(self)
        d["storage"] = hidden_url(self.storage)
        return d

    @classmethod
    def from_json(cls, d: dict, storage: str) -> Sweep:
        """The inverse of `to_json`, given the real storage URL."""
        return cls(**{**d, "spec": SearchSpec.from_dict(d["spec"]), "storage": storage})


def plan_sweep(
    config: str | os.PathLike,
    spec: SearchSpec,
    name: str | None = None,
    storage: str | None = None,
    prune: bool = False,
) -> Sweep:
    """Check the experiment and its search space, and say where the sweep lives (no trial runs)."""
    from twincar_fast.train.callbacks import monitor_comp  # torch: after the cheap checks
    from twincar_fast.train.trackers import check_trackers

    base = check_space(config, spec)
    check_trackers(base)
    if base.data.valid_pct == 0:
        raise TwincarError(
            f"{config}: data.valid_pct is 0, so there is no validation split to choose trials "
            "on (the test split never chooses); sweep with data.valid_pct=0.1"
        )
    if spec.seeds < 1 or (spec.n is not None and spec.n < 1):
        raise TwincarError("--seeds and the number of points must be at least 1")
    check_name(name, "--name")
    name = name or f"{base.name}-sweep"
    reports, models = Path(base.reports_dir) / name, Path(base.models_dir) / name
    reports.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(reports / STUDY_DB).resolve()}"
    direction = "minimize" if monitor_comp(base.train.monitor) is np.less else "maximize"
    return Sweep(
        name,
        str(config),
        spec,
        storage,
        str(reports),
        str(models),
        direction,
        base.train.seed,
        prune,
    )


def _open(sweep: Sweep) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """The sweep's storage and study (created with its queue on first use)."""
    folder = Path(sweep.reports_dir)
    storage = open_storage(sweep.storage, folder)
    study = open_study(
        storage, sweep.name, sweep.spec, sweep.direction, sweep.seed, folder, sweep.prune
    )
    return study, storage


# ---------------------------------------------------------------- one trial (in a worker)


def _trial_config(sweep: Sweep, trial: optuna.Trial, overrides: list[str]) -> ExperimentConfig:
    """The trial's experiment: the config + fixed + trial overrides, its seed, its folders."""
    seed = sweep.seed + int(trial.user_attrs["seed_index"])
    cfg = load_config(sweep.config, [*sweep.spec.fixed, *overrides, f"train.seed={seed}"])
    name = trial.user_attrs.get("run_name") or f"trial-{trial.number:03d}"
    trial.set_user_attr("run_name", name)
    cfg.name, cfg.reports_dir, cfg.models_dir = name, sweep.reports_dir, sweep.models_dir
    return cfg


def _resumable(trial: optuna.Trial, cfg: ExperimentConfig) -> str | None:
    """The folder of the interrupted run this retried trial continues, if it can be continued."""
    run_dir = trial.user_attrs.get("run_dir")
    if not run_dir:
        return None
    try:
        open_resume(run_dir, cfg)
    except TwincarError as e:  # e.g. killed before its first epoch landed: start afresh
        console.print(f"not continuing {run_dir} ({e}); the trial starts afresh", markup=False)
        return None
    return run_dir


def _one_line(e: BaseException) -> str:
    """An exception as one line: the message of a user mistake, else its type and message."""
    text = " ".join(str(e).split())
    return text if isinstance(e, TwincarError) else f"{type(e).__name__}: {text}"


def run_trial(sweep: Sweep, study: optuna.Study, trial: optuna.Trial, overrides: list[str]) -> None:
    """Run one trial to its end and tell the study: its value, pruned, or failed with the reason."""
    from twincar_fast.experiment import run_experiment
    from twincar_fast.lab.callbacks import OptunaPrune, RecordRun

    try:
        cfg = _trial_config(sweep, trial, overrides)
        cbs = [RecordRun(trial, sweep.reports_dir)]
        if sweep.prune:
            cbs.append(OptunaPrune(trial, cfg.train.monitor))
        result = run_experiment(cfg, resume=_resumable(trial, cfg), cbs=cbs)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return
    except Exception as e:  # noqa: BLE001 - a failed trial is recorded; the sweep goes on
        if not isinstance(e, TwincarError):
            traceback.print_exc()  # into the worker's log
        trial.set_user_attr("error", _one_line(e)[:500])
        study.tell(trial, state=TrialState.FAIL)
        return
    trial.set_user_attr("run_dir", str(result.report_dir))
    study.tell(trial, float(result.summary["best_value"]))


def run_worker(sweep: Sweep) -> int:
    """Claim and run trials until the sweep has none left; the number run."""
    study, storage = _open(sweep)
    done = 0
    while (claimed := claim_trial(study, storage, sweep.spec, Path(sweep.reports_dir))) is not None:
        trial, overrides = claimed
        console.print(f"trial {trial.number}: {' '.join(overrides)}", markup=False)
        run_trial(sweep, study, trial, overrides)
        done += 1
    return done


# ---------------------------------------------------------------- the sweep command


def die_with_parent() -> None:
    """In a worker: get SIGKILL when the sweep process dies (Linux), so no worker is orphaned.

    Called by the worker itself after exec, not as Popen's `preexec_fn`: Python code between
    fork and exec in a process with threads (torch's, jemalloc's) can deadlock the child.
    """
    parent = os.environ.get(PARENT_ENV)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != int(parent):  # the sweep died before prctl: follow it now
        os._exit(1)


def _worker_env(i: int, workers: int, storage: str) -> dict[str, str]:
    """A worker's environment: the storage URL, its share of CPU threads, its GPU."""
    env = {**os.environ, STORAGE_ENV: storage, PARENT_ENV: str(os.getpid())}
    if workers > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = gpus.split(",") if gpus else [str(g) for g in range(_cuda_count())]
        if ids:
            env["CUDA_VISIBLE_DEVICES"] = ids[i % len(ids)]  # one device each, round robin
    return env


def _cuda_count() -> int:
    """GPUs torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count()


def start_workers(sweep: Sweep, workers: int) -> list[subprocess.Popen]:
    """W worker processes, each logging to reports/<sweep>/workers/worker-<i>.log."""
    folder = Path(sweep.reports_dir)
    write_json(folder / SWEEP_JSON, sweep.to_json())
    (folder / "workers").mkdir(exist_ok=True)
    procs = []
    for i in range(workers):
        log = open(folder / "workers" / f"worker-{i}.log", "a")  # noqa: SIM115 - the child holds it
        cmd = [sys.executable, "-m", "twincar_fast.lab.worker", str(folder / SWEEP_JSON)]
        procs.append(
            subprocess.Popen(
                cmd,
                env=_worker_env(i, workers, sweep.storage),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        log.close()
    return procs


def run_sweep(sweep: Sweep, workers: int = 1) -> optuna.Study:
    """Continue or start the sweep with W workers, showing its trials live until it ends."""
    from twincar_fast.lab.table import watch_trials

    if workers < 1:
        raise TwincarError(f"--workers must be at least 1, got {workers}")
    study, storage = _open(sweep)
    for t in recover_dead_trials(study, storage, Path(sweep.reports_dir)):
        console.print(f"trial {t.number} was interrupted: it runs again", markup=False)
    console.print(
        f"sweep {sweep.name}: {sweep.spec.mode}, study {hidden_url(sweep.storage)}, "
        f"{workers} worker(s), logs in {Path(sweep.reports_dir) / 'workers'}",
        markup=False,
    )
    procs = start_workers(sweep, workers)
    try:
        watch_trials(study, procs, live=not plain_output())
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        console.print(f"interrupted; continue with the same command (sweep {sweep.name})")
        raise
    recover_dead_trials(study, storage, Path(sweep.reports_dir))  # a worker that crashed mid-trial
    left = trials_left(study, sweep.spec)
    if left:  # every worker ended (killed, crashed) with trials not yet run: not a finished sweep
        raise TwincarError(
            f"sweep {sweep.name}: {left} trial(s) still waiting, not run: the worker(s) ended "
            f"early (see {Path(sweep.reports_dir) / 'workers'}); run the same command again to "
            "continue them"
        )
    return study


def load_sweep(path: str | os.PathLike) -> Sweep:
    """A worker's sweep from sweep.json and the storage URL in its environment."""
    d = json.loads(Path(path).read_text())
    return Sweep.from_json(d, os.environ.get(STORAGE_ENV) or d["storage"])
