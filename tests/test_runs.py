"""Run folders under faults: bounded claims, broken folders, locks, resume that never restarts,
exact reproduction after an interruption, divergence, and checks made before the first epoch."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import InterruptAfter, write_tiny_prepared

from twincar_fast import experiment
from twincar_fast.cli import main
from twincar_fast.config import save_config
from twincar_fast.errors import TwincarError
from twincar_fast.experiment import run_experiment
from twincar_fast.run_folder import create_run_folder


def _interrupted(cfg, n: int = 1) -> Path:
    """reports/<run> of a run stopped once `n` epochs were committed."""
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, cbs=[InterruptAfter(n)])
    (report,) = Path(cfg.reports_dir).iterdir()
    return report


@pytest.fixture
def alarm():
    """Fail (instead of hanging) if the test body takes more than 30 s."""

    def _boom(*_):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, _boom)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- claiming folders (items 4, 15)


def test_dangling_symlink_reports_dir_is_one_line_not_a_hang(tiny_cfg, tmp_path, alarm):
    """Issue 12.4: a reports_dir that is a broken symlink used to loop forever."""
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    tiny_cfg.reports_dir = str(tmp_path / "link")
    with pytest.raises(TwincarError, match=r"link: a broken symlink") as e:
        create_run_folder(tiny_cfg)
    assert "\n" not in str(e.value)


def test_unusable_run_folders_are_one_line_and_leave_nothing(tiny_cfg, tmp_path):
    """Issue 12.15: a reports_dir that is a file, a models_dir that can't be made."""
    (tmp_path / "afile").write_text("x")
    bad = dataclasses.replace(tiny_cfg, reports_dir=str(tmp_path / "afile"))
    with pytest.raises(TwincarError, match=r"afile: is a file, not a folder"):
        create_run_folder(bad)
    bad = dataclasses.replace(tiny_cfg, models_dir=str(tmp_path / "afile" / "models"))
    with pytest.raises(TwincarError, match=r"afile/models: can't create a run folder"):
        create_run_folder(bad)
    assert not list(Path(tiny_cfg.reports_dir).iterdir())  # no orphan report folder


def test_cli_turns_file_system_errors_into_one_line(tmp_path, capsys):
    """Issue 12.15: an OSError at the boundary names the path, no traceback, exit 2."""
    (tmp_path / "afile").write_text("x")
    assert main(["demo-data", "--out", str(tmp_path / "afile" / "raw"), "--classes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "afile" in err and "Traceback" not in err


# ---------------------------------------------------------------- resume (items 3, 6, 12, 17)


def test_resume_refuses_instead_of_restarting(tiny_cfg):
    """Issue 12.3: resume with the checkpoints gone must refuse, never train from epoch 0."""
    report = _interrupted(tiny_cfg)
    models = Path(tiny_cfg.models_dir) / report.name
    shutil.move(models / "checkpoints", report.parent.parent / "moved")
    with pytest.raises(TwincarError, match=r"no matching last-epoch checkpoint"):
        run_experiment(tiny_cfg, resume=report)
    shutil.move(report.parent.parent / "moved", models)
    shutil.move(models, report.parent.parent / "moved_models")
    with pytest.raises(TwincarError, match=r"model folder is missing"):
        run_experiment(tiny_cfg, resume=report)
    assert pd.read_csv(report / "metrics.csv")["epoch"].tolist() == [0]  # untouched


def test_damaged_resume_files_are_one_line(tiny_cfg):
    """Issue 12.17: a truncated last-epoch checkpoint, a 0-byte metrics.csv."""
    report = _interrupted(tiny_cfg)
    (ckpt,) = (Path(tiny_cfg.models_dir) / report.name / "checkpoints").glob("last-epoch*.pth")
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(TwincarError, match=r"last-epoch000.pth: damaged checkpoint") as e:
        run_experiment(tiny_cfg, resume=report)
    assert "\n" not in str(e.value)
    ckpt.write_bytes(good)
    (report / "metrics.csv").write_bytes(b"")
    with pytest.raises(TwincarError, match=r"0 epoch\(s\) in metrics.csv but no matching"):
        run_experiment(tiny_cfg, resume=report)


def test_a_run_in_use_is_refused(tiny_cfg):
    """Issue 12.6: a second process may not train into a run folder that is being trained."""
    from twincar_fast.run_folder import lock_run

    report = _interrupted(tiny_cfg)
    folders = experiment.open_resume(report, tiny_cfg)
    with lock_run(folders):
        with pytest.raises(TwincarError, match=rf"in use by process {os.getpid()}"):
            run_experiment(tiny_cfg, resume=report)
    assert run_experiment(tiny_cfg, resume=report).summary["epochs_run"] == 2  # free again


def test_resume_finishes_a_run_stopped_during_evaluation(tiny_cfg, monkeypatch, capsys):
    """Issue 12.12: Ctrl-C in the test evaluation; --resume evaluates, no retraining, no refusal."""
    tiny_cfg.eval = dataclasses.replace(tiny_cfg.eval, test=True)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(experiment, "evaluate_learner", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(tiny_cfg)
    assert "--resume" in capsys.readouterr().out
    (report,) = Path(tiny_cfg.reports_dir).iterdir()
    metrics = (report / "metrics.csv").read_bytes()
    assert (report / "summary.json").is_file() and not (report / "eval_test.json").exists()
    res = run_experiment(tiny_cfg, resume=report)
    assert json.loads((report / "eval_test.json").read_text())["n_images"] == 24
    assert (report / "metrics.csv").read_bytes() == metrics and res.summary["epochs_run"] == 2
    with pytest.raises(TwincarError, match="already finished"):
        run_experiment(tiny_cfg, resume=report)


def test_cli_refuses_a_finished_run_before_loading_the_stack(tiny_cfg, tmp_path):
    """Issue 11.12: the run folder is checked before torch/fastai load and the data is built."""
    run = tmp_path / "reports" / "tiny-1"
    run.mkdir(parents=True)
    save_config(tiny_cfg, run / "config.yaml")
    (run / "summary.json").write_text("{}")
    code = (
        "import sys; from twincar_fast.cli import main; "
        f"rc = main(['train', {str(run / 'config.yaml')!r}, '--resume', {str(run)!r}]); "
        "print(rc, 'twincar_fast.experiment' in sys.modules, 'fastai' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert "already finished" in proc.stderr


# ---------------------------------------------------------------- reproducibility (item 7)


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_one(tiny_data, tmp_path):
    """Issue 12.7: same seed, interrupted after epoch 1, resumed: metrics.csv is identical."""
    from conftest import make_tiny_cfg

    def cfg_in(name):
        cfg = make_tiny_cfg(tiny_data, tmp_path / name)
        cfg.train = dataclasses.replace(cfg.train, epochs=3)
        return cfg

    whole = run_experiment(cfg_in("whole"))
    cfg = cfg_in("split")
    report = _interrupted(cfg, n=1)
    resumed = run_experiment(cfg, resume=report)
    a = pd.read_csv(whole.report_dir / "metrics.csv").drop(columns="time_s")
    b = pd.read_csv(resumed.report_dir / "metrics.csv").drop(columns="time_s")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert resumed.summary["best_epoch"] == whole.summary["best_epoch"]


# ---------------------------------------------------------------- before and during training


def test_divergence_stops_with_one_line(tiny_cfg):
    """Issue 12.8: a NaN/inf loss stops the run at once with epoch, batch, LR and a hint."""
    tiny_cfg.train = dataclasses.replace(tiny_cfg.train, lr=1e30)
    with pytest.raises(TwincarError, match=r"diverged.*epoch 0, batch \d+ \(lr .*lower train.lr"):
        run_experiment(tiny_cfg)
    (report,) = Path(tiny_cfg.reports_dir).iterdir()
    assert pd.read_csv(report / "metrics.csv").empty if (report / "metrics.csv").exists() else True
    assert not (report / "summary.json").exists()


def test_batch_larger_than_the_training_set_is_refused(tiny_cfg):
    """Issue 12.9: no full batch (drop_last) used to train nothing and export an untrained model."""
    tiny_cfg.data = dataclasses.replace(tiny_cfg.data, batch_size=64)
    with pytest.raises(TwincarError, match=r"data.batch_size 64 is larger than the 36 training"):
        run_experiment(tiny_cfg)
    assert not Path(tiny_cfg.reports_dir).exists() or not list(Path(tiny_cfg.reports_dir).iterdir())


def test_test_split_problems_are_found_before_training(tiny_cfg, tmp_path):
    """Issue 12.12: no test split, or an empty test image, fails before the first epoch."""
    data = write_tiny_prepared(tmp_path / "data")
    ann = pd.read_csv(data / "annotations.csv")
    ann[ann.split == "train"].to_csv(data / "annotations.csv", index=False)
    tiny_cfg.data = dataclasses.replace(tiny_cfg.data, root=str(data))
    tiny_cfg.eval = dataclasses.replace(tiny_cfg.eval, test=True)
    with pytest.raises(TwincarError, match=r"no test images, but eval.test is on"):
        run_experiment(tiny_cfg)
    ann.to_csv(data / "annotations.csv", index=False)
    (data / ann[ann.split == "test"].image.iloc[3]).write_bytes(b"")
    with pytest.raises(TwincarError, match=r"1 test image\(s\) are empty files"):
        run_experiment(tiny_cfg)
    assert not Path(tiny_cfg.reports_dir).exists() or not list(Path(tiny_cfg.reports_dir).iterdir())


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One finished 1-epoch tiny run, read-only (copy it to change it)."""
    from conftest import make_tiny_cfg

    cfg = make_tiny_cfg(tiny_data, tmp_path_factory.mktemp("compare_runs"))
    cfg.train = dataclasses.replace(cfg.train, epochs=1)
    return run_experiment(cfg).report_dir


def test_compare_lists_damaged_runs_and_compares_the_rest(finished_run, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for name in ("a-good", "b-garbage-summary", "c-empty-metrics"):
        shutil.copytree(finished_run, sweep / name)
    (sweep / "b-garbage-summary" / "summary.json").write_text("{not json")
    (sweep / "c-empty-metrics" / "metrics.csv").write_text("")
    assert main(["compare", str(sweep), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out
    assert re.search(
        r"damaged run left out: \S*b-garbage-summary \(summary.json is unreadable", out
    )
    assert re.search(r"damaged run left out: \S*c-empty-metrics \(metrics.csv is unreadable", out)
    table = pd.read_csv(tmp_path / "cmp" / "compare.csv")
    assert list(table["run"]) == ["a-good"]
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "b-garbage-summary" in page and "c-empty-metrics" in page
    for name in ("a-good", "b-garbage-summary"):  # all damaged: one line, exit 2
        shutil.rmtree(sweep / name)
    assert main(["compare", str(sweep), "--out", str(tmp_path / "cmp2")]) != 0
    assert "no run to compare" in capsys.readouterr().err


def test_compare_figures_read_plainly(tmp_path):
    import optuna

    from twincar_fast.lab.compare import optuna_figures, parallel_figure

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    dist = optuna.distributions.CategoricalDistribution(["3e-3", "1e-2"])
    for lr, value in (("3e-3", 2.41), ("1e-2", 2.49)):
        study.add_trial(
            optuna.trial.create_trial(params={"train.lr": lr}, distributions={"train.lr": dist}, value=value)
        )  # fmt: skip
    images, notes = optuna_figures(tmp_path)
    assert list(images) == ["s: parallel"]  # one parameter: no importance bar at 1.00
    assert "searches one parameter (train.lr)" in notes[0]
    fig = parallel_figure(study)
    lines = next(c for c in fig.axes[0].collections if hasattr(c, "get_segments"))
    colors = lines.to_rgba(lines.get_array())
    assert len(colors) == 2 and (colors[:, :3].min(1) < 0.9).all(), colors  # none near-white
    lo, hi = fig.axes[0].get_ylim()
    assert lo < 2.41 and hi > 2.49  # neither trial drawn on the frame's edge
