"""Trackers on a real tiny run: TensorBoard event files, MLflow's SQLite store, W&B offline."""

from __future__ import annotations

import dataclasses
import sys

import pandas as pd
import pytest

from twincar_fast.cli import main
from twincar_fast.config import save_config
from twincar_fast.experiment import run_experiment
from twincar_fast.train.callbacks import METRICS_COLUMNS
from twincar_fast.train.trackers import flat_config

LOGGED = [c for c in METRICS_COLUMNS if c != "epoch"]


@pytest.fixture(scope="module")
def tracked_run(tiny_data, tmp_path_factory):
    """One 2-epoch run with all three trackers (W&B offline, MLflow's default local store)."""
    from conftest import make_tiny_cfg

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("tracked"))
    cfg.eval = dataclasses.replace(cfg.eval, test=True)
    cfg.log = ["tensorboard", "mlflow", "wandb"]
    result = run_experiment(cfg)
    yield cfg, result, pd.read_csv(result.report_dir / "metrics.csv")
    mp.undo()


def test_tensorboard_events_hold_every_metric_per_epoch(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result, metrics = tracked_run
    events = EventAccumulator(str(result.report_dir / "tensorboard"))
    events.Reload()
    for col in LOGGED:
        scalars = events.Scalars(f"epoch/{col}")
        assert [s.step for s in scalars] == list(metrics["epoch"])
        assert [s.value for s in scalars] == pytest.approx(list(metrics[col]), rel=1e-6)
    assert events.Scalars("train_loss")  # fastai's own per-batch loss is still there


def test_mlflow_store_has_the_run_with_params_and_metrics_of_metrics_csv(tracked_run):
    from mlflow.tracking import MlflowClient

    cfg, result, metrics = tracked_run
    store = result.report_dir.parent / "mlruns" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = client.get_run((result.report_dir / "mlflow_run_id").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == result.name
    assert run.data.params == flat_config(cfg)
    for col in LOGGED:
        history = sorted(client.get_metric_history(run.info.run_id, col), key=lambda m: m.step)
        assert [m.step for m in history] == list(metrics["epoch"])
        assert [m.value for m in history] == pytest.approx(list(metrics[col]), rel=1e-9)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "eval_test.json", "metrics.csv", "model"} <= files
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in model


def test_wandb_offline_writes_its_run_folder(tracked_run):
    _, result, _ = tracked_run
    (run_dir,) = (result.report_dir / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))


def test_a_tracker_without_its_package_is_a_one_line_error(tiny_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    tiny_cfg.log = ["mlflow"]
    path = save_config(tiny_cfg, tmp_path / "c.yaml")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == 'twincar: error: log: mlflow is not installed; pip install -e ".[mlflow]" (or drop it from log)\n'
    )
    assert not list((tmp_path / "reports").glob("*"))  # nothing started
