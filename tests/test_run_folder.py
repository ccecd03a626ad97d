"""The run folder: a property per file, finding a run from either folder or its model, what a run
lacks, and the one reader of where an interrupted run stands."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import InterruptAfter, make_tiny_cfg

from twincar_fast.errors import TwincarError
from twincar_fast.experiment import run_experiment
from twincar_fast.run_folder import (
    RUN_FILE_NAMES,
    RunFolder,
    create_run_folder,
    resolve_run,
)


@pytest.fixture(scope="module")
def resumed_run(tiny_data, tmp_path_factory):
    """(config, folder, resume state after 1 of 2 epochs, state once finished) of one tiny run."""
    cfg = make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("run_folder"))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, cbs=[InterruptAfter(1)])
    (report,) = Path(cfg.reports_dir).iterdir()
    folder = RunFolder.of(cfg, report.name)
    interrupted = folder.resume_state()
    run_experiment(cfg, resume=report)
    return cfg, folder, interrupted, folder.resume_state()


def test_a_property_per_file(tmp_path):
    run = RunFolder("r1", tmp_path / "reports" / "r1", tmp_path / "models" / "r1")
    r, m = run.report_dir, run.model_dir
    assert run.summary_json == r / "summary.json" and run.metrics_csv == r / "metrics.csv"
    assert run.config_yaml == r / "config.yaml" and run.index_html == r / "index.html"
    assert run.eval_json("test") == r / "eval_test.json"
    assert run.predictions_csv("valid") == r / "predictions_valid.csv"
    assert run.figures_dir == r / "figures" and run.twins_csv == r / "twins.csv"
    assert run.learner_pkl == m / "learner.pkl" and run.safetensors == m / "model.safetensors"
    assert run.config_json == m / "config.json" and run.readme_md == m / "README.md"
    assert run.onnx == m / "model.onnx" and run.int8_onnx == m / "model.int8.onnx"
    assert run.ckpt_dir == m / "checkpoints"
    assert run.best_checkpoint(3) == m / "checkpoints" / "best-epoch003.pth"
    assert run.last_checkpoint(12) == m / "checkpoints" / "last-epoch012.pth"
    names = [run.summary_json, run.eval_json("test"), run.learner_pkl, run.int8_onnx]
    assert {p.name for p in names} <= RUN_FILE_NAMES


def test_a_lone_model_has_no_report_files(tmp_path):
    lone = RunFolder("m", None, tmp_path)
    assert lone.safetensors == tmp_path / "model.safetensors"
    with pytest.raises(TwincarError, match=r"summary.json: this run has no folder for it"):
        _ = lone.summary_json


def test_missing_files_of_a_new_run(tiny_cfg):
    run = create_run_folder(tiny_cfg)
    assert run.report_dir.is_dir() and run.model_dir.is_dir()
    want = [run.config_yaml, run.env_json, run.metrics_csv, run.summary_json]
    assert run.missing_files(tiny_cfg) == [*want, run.config_json, run.safetensors, run.learner_pkl]
    cfg = dataclasses.replace(tiny_cfg, eval=dataclasses.replace(tiny_cfg.eval, test=True))
    assert run.eval_json("test") in run.missing_files(cfg)
    assert run.missing(cfg) == ["test evaluation"]


def test_resume_state_of_an_interrupted_run(resumed_run):
    _, folder, state, _ = resumed_run
    assert state.done == 1 and state.summary == {} and state.kept_checkpoint is None
    assert state.checkpoint == folder.ckpt_dir / "last-epoch000.pth"
    assert [r["epoch"] for r in state.rows] == [0]


def test_resume_state_of_a_finished_run_reads_metrics_as_pandas_does(resumed_run):
    cfg, folder, _, state = resumed_run
    assert folder.finished and state.done == 2 and state.checkpoint is None
    assert state.kept_checkpoint is not None and state.kept_checkpoint.is_file()
    assert state.summary["epochs_run"] == 2
    frame = pd.read_csv(folder.metrics_csv).to_dict("records")
    assert pd.DataFrame(state.rows).equals(pd.DataFrame(frame))
    assert folder.missing_files(cfg) == [] and folder.missing(cfg) == []


def test_resolve_run_from_either_folder_or_the_model(resumed_run):
    _, folder, _, _ = resumed_run
    from_report = resolve_run(folder.report_dir)
    assert (from_report.report_dir, from_report.model_dir) == (folder.report_dir, folder.model_dir)
    assert from_report.learner == folder.learner_pkl
    from_model = resolve_run(folder.model_dir)
    assert (from_model.name, from_model.report_dir) == (folder.name, folder.report_dir)
    from_file = resolve_run(folder.safetensors)
    assert from_file.model_file == folder.safetensors and from_file.report_dir == folder.report_dir
    with pytest.raises(TwincarError, match=r"not a run folder"):
        resolve_run(folder.report_dir.parent)


def test_a_damaged_metrics_csv_is_one_line(resumed_run, tmp_path):
    _, folder, _, _ = resumed_run
    copy = RunFolder("c", tmp_path / "r", tmp_path / "m")
    shutil.copytree(folder.report_dir, copy.report_dir)
    text = copy.metrics_csv.read_text().splitlines()
    copy.metrics_csv.write_text("\n".join([text[0], text[1] + ",1,2"]) + "\n")
    with pytest.raises(TwincarError, match=r"metrics.csv: can't read it to resume") as e:
        RunFolder("c", copy.report_dir, copy.model_dir).resume_state()
    assert "\n" not in str(e.value)
