"""The Optuna study behind a sweep: storage, the queue of points, claiming trials, dead trials.

Grid and random sweeps enqueue every point (× seeds) when the study is created, so workers only
pop waiting trials and no point runs twice; a TPE sweep asks Optuna's sampler for each new point
and enqueues its other seeds. Claims happen under one lock per study (a file lock beside an
SQLite file, a PostgreSQL advisory lock on a server) because Optuna's pop of a waiting trial is
only atomic where the database locks rows. A trial left running by a process that is gone (killed
with its sweep) is marked failed and enqueued again, to resume from its own run folder.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from twincar_fast.errors import TwincarError
from twincar_fast.files import file_lock
from twincar_fast.lab.space import SearchSpec, grid_points, random_points, suggest
from twincar_fast.run_folder import STUDY_LOCK

__all__ = [
    "claim_trial",
    "hidden_url",
    "open_storage",
    "open_study",
    "recover_dead_trials",
    "study_lock",
    "trials_left",
]

SPEC_ATTR = "twincar_spec"
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep's own table says what happens


def hidden_url(url: str) -> str:
    """The storage URL with any password masked, for messages and files."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: say it as given
        return url


def open_storage(url: str, folder: Path | None = None) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`, or a one-line error when it can't be reached.

    Optuna creates its tables on first use and two processes doing so at once collide, so an
    SQLite file is opened under the sweep's file lock (in `folder`).
    """
    sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 120}} if sqlite else {"pool_pre_ping": True}
    )
    with file_lock(folder / STUDY_LOCK) if sqlite and folder else nullcontext():
        if sqlite:
            _check_sqlite_file(url)
        return _rdb_storage(url, kwargs)


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_sqlite_file(url: str) -> None:
    """TwincarError when the study's SQLite file exists but is empty or not a database: SQLite
    would quietly start a new study in it and run every finished point again."""
    from sqlalchemy.engine import make_url

    db = make_url(url).database
    if not db or db == ":memory:" or not os.path.exists(db):
        return
    try:
        with open(db, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise TwincarError(f"{db}: can't read the sweep's study ({e.strerror})") from None
    if head != _SQLITE_MAGIC:
        what = "is empty (0 bytes)" if not head else "is not an SQLite database"
        raise TwincarError(
            f"{db}: the sweep's study file {what}, so its finished trials can't be read; "
            "restore it from a backup, or move it away to start the sweep over"
        )


def _rdb_storage(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage, its connection errors as one line."""
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ModuleNotFoundError as e:
        extra = "postgres" if "psycopg" in str(e) else "the database driver"
        raise TwincarError(
            f"--storage {hidden_url(url)}: its driver is not installed ({e.name}); "
            f'pip install -e ".[{extra}]"'
        ) from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors: one line, no traceback
        reason = " ".join(str(getattr(e, "orig", None) or e).split())[:160]
        raise TwincarError(
            f"--storage {hidden_url(url)}: can't reach the database ({reason}); check the URL, "
            "that the server runs and that the user may connect"
        ) from None


@contextmanager
def study_lock(storage: optuna.storages.RDBStorage, name: str, folder: Path) -> Iterator[None]:
    """Hold the study's claim lock: PostgreSQL advisory lock, else a file lock in `folder`."""
    engine = storage.engine
    if engine.dialect.name != "postgresql":
        with file_lock(folder / STUDY_LOCK):
            yield
        return
    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})


def _sampler(spec: SearchSpec, seed: int) -> optuna.samplers.BaseSampler:
    """TPE for an optuna sweep; grid and random points come from the queue."""
    return (
        optuna.samplers.TPESampler(seed=seed)
        if spec.mode == "optuna"
        else optuna.samplers.RandomSampler(seed=seed)
    )


def open_study(
    storage: optuna.storages.RDBStorage,
    name: str,
    spec: SearchSpec,
    direction: str,
    seed: int,
    folder: Path,
    prune: bool = False,
) -> optuna.Study:
    """Create the sweep's study (enqueueing its points) or reopen it, checking it is the same."""
    pruner = optuna.pruners.MedianPruner() if prune else optuna.pruners.NopPruner()
    with study_lock(storage, name, folder):
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction=direction,
            sampler=_sampler(spec, seed),
            pruner=pruner,
            load_if_exists=True,
        )
        saved = study.user_attrs.get(SPEC_ATTR)
        if saved is None:
            _enqueue_points(study, spec, seed)
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
        elif saved != spec.to_dict():
            raise TwincarError(
                f"sweep {name!r} exists with another search ({_describe(saved)}); re-run its own "
                "command to continue it, or give this one a new --name"
            )
    return study


def _describe(spec: dict) -> str:
    """A short description of a stored spec for an error message."""
    keys = ", ".join(d["key"] for d in spec["dims"])
    return (
        f"{spec['mode']} over {keys}, {spec['seeds']} seed(s), overrides {spec['fixed'] or 'none'}"
    )


def _enqueue_points(study: optuna.Study, spec: SearchSpec, seed: int) -> None:
    """Every grid or random point, once per seed, in order (a TPE sweep samples as it goes)."""
    if spec.mode == "optuna":
        return
    points = (
        grid_points(spec.dims) if spec.mode == "grid" else random_points(spec.dims, spec.n, seed)
    )
    for i, params in enumerate(points):
        for s in range(spec.seeds):
            study.enqueue_trial(params, user_attrs={"point": i, "seed_index": s})


def _points(study: optuna.Study) -> int:
    """How many distinct points the study has started (any state)."""
    return len({t.user_attrs.get("point") for t in study.get_trials(deepcopy=False)} - {None})


def trials_left(study: optuna.Study, spec: SearchSpec) -> int:
    """Trials the sweep has still to run: the waiting ones, and a TPE sweep's unsampled points."""
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if spec.mode != "optuna":
        return waiting
    return waiting + max(0, spec.n - _points(study)) * spec.seeds


def claim_trial(
    study: optuna.Study, storage: optuna.storages.RDBStorage, spec: SearchSpec, folder: Path
) -> tuple[Trial, list[str]] | None:
    """The next trial to run and its overrides, or None when the sweep has nothing left."""
    with study_lock(storage, study.study_name, folder):
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not waiting and (spec.mode != "optuna" or _points(study) >= spec.n):
            return None
        trial = study.ask()  # pops the oldest waiting trial, else samples a new point (TPE)
        overrides = suggest(trial, spec.dims)
        if "point" not in trial.user_attrs:  # a new TPE point: its other seeds wait in the queue
            trial.set_user_attr("point", trial.number)
            trial.set_user_attr("seed_index", 0)
            for s in range(1, spec.seeds):
                study.enqueue_trial(
                    trial.params, user_attrs={"point": trial.number, "seed_index": s}
                )
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
    return trial, overrides


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(
    study: optuna.Study, storage: optuna.storages.RDBStorage, folder: Path
) -> list[FrozenTrial]:
    """Mark this machine's running trials whose process is gone as failed and enqueue them again."""
    host, dead = socket.gethostname(), []
    with study_lock(storage, study.study_name, folder):
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") != host or pid is None or _alive(pid):
                continue
            storage.set_trial_user_attr(t._trial_id, "error", "interrupted: its process ended")
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
            keep = {
                k: t.user_attrs[k]
                for k in ("point", "seed_index", "run_name", "run_dir")
                if k in t.user_attrs
            }
            study.enqueue_trial(t.params, user_attrs={**keep, "retry_of": t.number})
            dead.append(t)
    return dead
