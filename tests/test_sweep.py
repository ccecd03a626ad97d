"""Sweeps on a real Optuna study (SQLite, and a private PostgreSQL), trials as real tiny runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import make_tiny_cfg
from optuna.trial import TrialState
from postgres import start_cluster

from twincar_fast.cli import build_parser, main
from twincar_fast.config import save_config
from twincar_fast.lab.cli import spec_from_args
from twincar_fast.lab.compare import compare_runs, compare_table, find_runs

GRID = ["--grid", "train.lr=1e-2,3e-3", "data.batch_size=4,8"]


@pytest.fixture
def sweep_yaml(tiny_data, tmp_path) -> Path:
    """A one-epoch tiny experiment with its test evaluation, as a YAML file."""
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.train = dataclasses.replace(cfg.train, epochs=1)
    cfg.eval = dataclasses.replace(cfg.eval, test=True)
    return save_config(cfg, tmp_path / "tiny.yaml")


def _cmd(yaml: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "twincar_fast.cli", "sweep", str(yaml), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _study(tmp_path: Path, name: str = "tiny-sweep", storage: str | None = None) -> optuna.Study:
    url = storage or f"sqlite:///{tmp_path / 'reports' / name / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url)


def _trials(study: optuna.Study, state: TrialState) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(state,))


def _points(trials) -> list[tuple]:
    return sorted(tuple(sorted(t.params.items())) for t in trials)


def _worker_log(tmp_path: Path) -> str:
    """The end of the sweep's worker log, to say why a wait failed."""
    log = tmp_path / "reports" / "tiny-sweep" / "workers" / "worker-0.log"
    return log.read_text()[-3000:] if log.is_file() else "(no worker log)"


def _wait_for(cond, timeout: float, what: str, proc=None, tmp_path=None):
    """Poll `cond` until it is truthy, and return that; fail at once if the sweep `proc` ends
    first, with the worker's log."""
    end = time.monotonic() + timeout
    while not (value := cond()):
        ended = proc is not None and proc.poll() is not None
        if ended or time.monotonic() > end:
            why = f"the sweep ended (exit {proc.returncode})" if ended else "timed out"
            log = _worker_log(tmp_path) if tmp_path else ""
            raise AssertionError(f"{why} waiting for {what}\n{log}")
        time.sleep(0.05)
    return value


def _training_worker(tmp_path: Path, number: int) -> int | None:
    """The worker pid of trial `number` once it trains (running, its run folder recorded).

    Read straight from the study's SQLite file: a tiny trial trains for about a second, too short
    for a poll through `optuna.load_study` (a new engine each time) on a loaded machine.
    """
    db = tmp_path / "reports" / "tiny-sweep" / "study.db"
    if not db.is_file():
        return None
    query = (
        "SELECT a.key, a.value_json FROM trials t JOIN trial_user_attributes a "
        "ON a.trial_id = t.trial_id WHERE t.number = ? AND t.state = 'RUNNING'"
    )
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            attrs = {k: json.loads(v) for k, v in con.execute(query, (number,))}
        finally:
            con.close()
    except sqlite3.Error:  # the tables are still being created
        return None
    return attrs.get("pid") if "run_dir" in attrs else None


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_grid_sweep_killed_in_trial_3_continues_to_4_trials_and_compares(sweep_yaml, tmp_path):
    proc = subprocess.Popen(
        _cmd(sweep_yaml, *GRID), env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL
    )
    try:
        worker = _wait_for(lambda: _training_worker(tmp_path, 2), 300, "trial 3", proc, tmp_path)
        os.kill(worker, signal.SIGSTOP)  # frozen mid-trial until the kill below
    finally:
        proc.send_signal(signal.SIGKILL)  # the sweep process itself; its worker dies with it
        proc.wait()
    study = _study(tmp_path)
    killed = next(t for t in study.get_trials() if t.number == 2)
    _wait_for(lambda: _gone(killed.user_attrs["pid"]), 30, "the worker to die with the sweep")
    first_two = {
        t.number: (t.datetime_complete, t.user_attrs["run_dir"])
        for t in study.get_trials()
        if t.number < 2
    }
    assert len(first_two) == 2

    r = subprocess.run(
        _cmd(sweep_yaml, *GRID), env=_env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "trial 2 was interrupted" in r.stdout

    study = _study(tmp_path)
    done = _trials(study, TrialState.COMPLETE)
    assert len(done) == 4
    assert _points(done) == sorted(
        ((("data.batch_size", b), ("train.lr", lr))) for lr in ("1e-2", "3e-3") for b in ("4", "8")
    )
    for t in done:  # the first two were kept as they were, not run again
        if t.number in first_two:
            assert (t.datetime_complete, t.user_attrs["run_dir"]) == first_two[t.number]
    (failed,) = _trials(study, TrialState.FAIL)
    assert failed.number == 2 and "interrupted" in failed.user_attrs["error"]
    retry = next(t for t in done if t.user_attrs.get("retry_of") == 2)
    assert retry.user_attrs["run_dir"] == killed.user_attrs["run_dir"]  # continued in its folder

    sweep_dir = tmp_path / "reports" / "tiny-sweep"
    runs = find_runs([sweep_dir])
    assert len(runs) == 4
    df, differ = compare_table(runs)
    assert differ == ["data.batch_size", "train.lr"]
    assert "test_acc_tta" not in df  # no run evaluated with TTA
    for run, row in zip(runs, df.itertuples(index=False), strict=True):
        s = json.loads((run / "summary.json").read_text())
        test = json.loads((run / "eval_test.json").read_text())
        assert row.best_valid_loss == s["best"]["valid_loss"]
        assert row.final_valid_acc == s["final"]["valid_acc"]
        assert row.test_acc == test["test_acc"]
        assert (row.epochs, row.wall_time_s) == (s["epochs_run"], s["wall_time_s"])
    out = compare_runs([sweep_dir])
    assert out == sweep_dir / "compare"
    pd.testing.assert_frame_equal(pd.read_csv(out / "compare.csv"), df, check_dtype=False)
    page = (out / "compare.html").read_text()
    for part in ("validation curves", "tiny-sweep: importance", "tiny-sweep: parallel"):
        assert part in page
    assert page.count("data:image/png;base64,") == 3


def test_invalid_trial_fails_with_its_message_others_finish_and_seeds_give_mean_std(
    sweep_yaml, tmp_path
):
    args = ["--grid", "train.epochs=1,0", "--seeds", "2", "--name", "seeds"]
    r = subprocess.run(
        _cmd(sweep_yaml, *args), env=_env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 1, r.stderr[-2000:]  # the sweep ran; two trials failed
    study = _study(tmp_path, "seeds")
    done, failed = _trials(study, TrialState.COMPLETE), _trials(study, TrialState.FAIL)
    assert [t.params["train.epochs"] for t in done] == ["1", "1"]
    assert sorted(t.user_attrs["seed_index"] for t in done) == [0, 1]
    assert len(failed) == 2
    for t in failed:
        assert "train.epochs" in t.user_attrs["error"] and "at least 1" in t.user_attrs["error"]
        assert t.user_attrs["error"] in r.stdout  # the table shows the one-line reason

    out = compare_runs([tmp_path / "reports" / "seeds"], tmp_path / "cmp")
    df = pd.read_csv(out / "compare.csv")
    seeds = sorted(df["train.seed"])
    assert seeds == [42, 43]
    page = (out / "compare.html").read_text()
    assert "mean ± std over seeds" in page
    accs = df["best_valid_acc"]
    assert f"{accs.mean():.4f} ± {accs.std():.4f}" in page


def test_two_workers_on_one_sqlite_study_run_every_point_once(sweep_yaml, tmp_path):
    args = ["--grid", "train.lr=1e-2,5e-3,3e-3", "--workers", "2", "--name", "two"]
    r = subprocess.run(
        _cmd(sweep_yaml, *args), env=_env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    study = _study(tmp_path, "two")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.params["train.lr"] for t in trials) == ["1e-2", "3e-3", "5e-3"]
    assert len(find_runs([tmp_path / "reports" / "two"])) == 3
    logs = sorted((tmp_path / "reports" / "two" / "workers").glob("worker-*.log"))
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]


@pytest.fixture(scope="module")
def postgres_url():
    url, why, stop = start_cluster()
    if url is None:
        pytest.skip(f"PostgreSQL test skipped: {why}")
    yield url
    stop()


def test_two_workers_share_one_study_through_postgresql(sweep_yaml, tmp_path, postgres_url):
    args = [
        "--grid",
        "train.lr=1e-2,3e-3",
        "--workers",
        "2",
        "--name",
        "pg",
        "--storage",
        postgres_url,
    ]
    r = subprocess.run(
        _cmd(sweep_yaml, *args), env=_env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    study = _study(tmp_path, "pg", postgres_url)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.params["train.lr"] for t in trials) == ["1e-2", "3e-3"]
    assert len({t.user_attrs["pid"] for t in trials}) >= 1
    assert not (tmp_path / "reports" / "pg" / "study.db").exists()  # the study lives on the server
    assert "postgresql+psycopg2://twincar@127.0.0.1" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "train.lrr=1e-2,3e-3"], "did you mean 'train.lr'?"),
        (
            ["--grid", "train.epochs=1,two"],
            "train.epochs=two: key 'train.epochs': expected int, got 'two'",
        ),
        (["--grid", "train.lr="], "an empty space"),
        (["--grid", "train.lr=1e-2", "--name", "../x"], "--name must be a plain folder name"),
        (["--grid", "name=a,b"], "--grid name: each trial sets its own name, reports_dir"),
        (["--random", "2", "--space", "reports_dir=a,b"], "--space reports_dir: each trial sets"),
        (["--random", "3"], "an empty search space"),
        (["--random", "3", "--space", "train.lr=1e-2:1e-3"], "an empty range"),
        (
            ["--optuna", "3", "--space", "train.epochs=1:2.5"],
            "train.epochs=2.5: key 'train.epochs': expected int",
        ),
        (
            [
                "--grid",
                "train.lr=1e-2",
                "--storage",
                "postgresql+psycopg2://u:secret@127.0.0.1:9/x",
            ],
            "can't reach the database",
        ),
    ],
)
def test_bad_sweep_input_is_one_line_before_any_trial(sweep_yaml, tmp_path, capsys, args, message):
    assert main(["sweep", str(sweep_yaml), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twincar: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "secret" not in err
    assert not list((tmp_path / "reports").glob("*/trial-*"))  # no trial started
    assert not (tmp_path / "x").exists()  # nothing outside reports/


def test_overrides_may_follow_the_flags(sweep_yaml):
    """Issue 31.5: `key=value` after `--grid ...` or another flag was a grid key or unrecognized."""
    line = ["--grid", "train.lr=3e-3,1e-2", "train.epochs=2", "--seeds", "2", "data.batch_size=4"]
    spec = spec_from_args(build_parser().parse_args(["sweep", str(sweep_yaml), *line]))
    assert [d.key for d in spec.dims] == ["train.lr"] and spec.seeds == 2
    assert spec.fixed == ["data.batch_size=4", "train.epochs=2"]
    # a one-value --grid alone stays a one-point grid
    spec = spec_from_args(build_parser().parse_args(["sweep", str(sweep_yaml), *GRID[:2]]))
    assert [d.key for d in spec.dims] == ["train.lr"]


def test_an_empty_or_damaged_study_file_is_refused_not_restarted(sweep_yaml, tmp_path, capsys):
    """Issue 29.8: a 0-byte study.db silently started a new study (every point ran again)."""
    db = tmp_path / "reports" / "tiny-sweep" / "study.db"
    db.parent.mkdir(parents=True)
    for content, what in ((b"", "is empty (0 bytes)"), (b"x" * 100, "is not an SQLite database")):
        db.write_bytes(content)
        assert main(["sweep", str(sweep_yaml), "--grid", "train.lr=1e-2,3e-3"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{db}: the sweep's study file {what}" in err, err
        assert db.read_bytes() == content  # left as it was
        assert not list(db.parent.glob("trial-*"))


def test_a_sweep_whose_only_worker_is_killed_says_what_is_left_and_exits_non_zero(
    sweep_yaml, tmp_path
):
    """Issue 29.7: it exited 0 saying "1 finished, 0 failed" with trials never run."""
    grid = ["--grid", "train.lr=1e-2,3e-3"]
    proc = subprocess.Popen(
        _cmd(sweep_yaml, *grid),
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worker = _wait_for(lambda: _training_worker(tmp_path, 0), 300, "trial 0", proc, tmp_path)
        os.kill(worker, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "2 trial(s) still waiting" in err and "run the same command again" in err, err
    r = subprocess.run(
        _cmd(sweep_yaml, *grid), env=_env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(_trials(_study(tmp_path), TrialState.COMPLETE)) == 2


def test_prune_stops_a_trial_worse_than_the_median_after_its_epoch(tiny_cfg):
    from twincar_fast.experiment import run_experiment
    from twincar_fast.lab.callbacks import OptunaPrune

    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(0.0, 0)  # a trial that reached a loss of 0 after its first epoch
    study.tell(first, 0.0)
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        run_experiment(tiny_cfg, cbs=[OptunaPrune(trial, "valid_loss")])
    (run,) = (Path(tiny_cfg.reports_dir)).iterdir()
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) == 1  # stopped after epoch 0 of 2
    assert study.trials[1].intermediate_values == {0: metrics["valid_loss"][0]}


@pytest.mark.parametrize("mode", ["optuna", "random"])
def test_sampled_points_run_each_seed_once_and_stop_at_n(tmp_path, mode):
    from twincar_fast.lab.space import SearchSpec, parse_dims
    from twincar_fast.lab.study import claim_trial, open_storage, open_study

    dims = parse_dims(
        "--space", ["train.lr=1e-4:1e-2:log", "model.arch=test_resnet,resnet18"], True
    )
    spec = SearchSpec(mode, dims, n=3, seeds=2)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = open_study(storage, "s", spec, "minimize", 42, tmp_path)
    claimed = []
    while (c := claim_trial(study, storage, spec, tmp_path)) is not None:
        trial, overrides = c
        claimed.append(
            (trial.user_attrs["point"], trial.user_attrs["seed_index"], tuple(overrides))
        )
        study.tell(trial, float(len(claimed)))  # the queue is under test here, not the objective
    assert len(claimed) == 6
    assert sorted((p, s) for p, s, _ in claimed) == sorted(
        (p, s) for p in {c[0] for c in claimed} for s in (0, 1)
    )
    by_point = {}
    for p, _, overrides in claimed:
        by_point.setdefault(p, set()).add(overrides)
    assert len(by_point) == 3 and all(len(v) == 1 for v in by_point.values())  # seeds share a point
    for lr, arch in (next(iter(v)) for v in by_point.values()):
        assert 1e-4 <= float(lr.split("=")[1]) <= 1e-2
        assert arch in ("model.arch=test_resnet", "model.arch=resnet18")


def test_workers_get_one_gpu_each_and_a_share_of_the_cpu_threads(monkeypatch):
    from twincar_fast.lab.sweep import STORAGE_ENV, _worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs = [_worker_env(i, 3, "sqlite:///x.db") for i in range(3)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5", "3"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {str(max(1, os.cpu_count() // 3))}
    assert all(e[STORAGE_ENV] == "sqlite:///x.db" for e in envs)
