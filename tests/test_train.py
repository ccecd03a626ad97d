"""Training runs: run folder contract, metrics.csv vs scikit-learn, early stopping, plateau, best
weights, resume of an interrupted run, lr_find, and one-line errors for bad runs to resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import N_CLASSES, N_TRAIN, InterruptAfter, make_tiny_cfg
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    hamming_loss,
    jaccard_score,
    matthews_corrcoef,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from twincar_fast.analysis.report import headline_metrics
from twincar_fast.config import load_config, save_config
from twincar_fast.data import build_dls
from twincar_fast.errors import ConfigError, TwincarError
from twincar_fast.experiment import lr_find_report, run_experiment
from twincar_fast.model.learner import create_learner
from twincar_fast.run_folder import create_run_folder, open_resume
from twincar_fast.train.fit import fit_run, fit_schedule

# the run folder contract (docs/brief), spelled out here rather than imported
COLUMNS = (
    "epoch, train_loss, train_acc, valid_loss, valid_acc, valid_precision_macro, "
    "valid_precision_weighted, valid_recall_macro, valid_recall_weighted, valid_f1_macro, "
    "valid_f1_weighted, valid_hamming, valid_cohen_kappa, valid_mcc, valid_jaccard_macro, "
    "valid_top3, valid_top5, valid_acc_raw, img_size, lr, time_s"
).split(", ")
REPORT_FILES = ["config.yaml", "env.json", "classes.csv", "metrics.csv", "summary.json"]
MODEL_FILES = ["learner.pkl", "model.safetensors", "config.json", "README.md"]


def _only_dir(parent: Path) -> Path:
    (d,) = [p for p in parent.iterdir() if p.is_dir()]
    return d


@pytest.fixture(scope="module")
def cli_run(tiny_data, tmp_path_factory):
    """`python -m twincar_fast.run tiny.yaml` in a subprocess, stdout a pipe (not a terminal)."""
    out = tmp_path_factory.mktemp("cli_run")
    cfg = make_tiny_cfg(tiny_data, out)
    save_config(cfg, out / "tiny.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "twincar_fast.run", str(out / "tiny.yaml")],
        capture_output=True,
        text=True,
        cwd=out,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _only_dir(out / "reports")
    return proc, cfg, report, out / "models" / report.name


def test_plain_output_has_one_line_per_epoch_and_no_carriage_returns(cli_run):
    proc, cfg, *_ = cli_run
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    lines = proc.stdout.splitlines()
    header = [i for i, ln in enumerate(lines) if ln.startswith("epoch ")]
    assert len(header) == 1 and "train_loss" in lines[header[0]]
    rows = [ln for ln in lines if re.match(rf"\s*\d+/{cfg.train.epochs}\s", ln)]
    assert len(rows) == cfg.train.epochs


def test_run_folders_hold_every_contract_file(cli_run, tiny_data):
    _, cfg, report, models = cli_run
    for name in [*REPORT_FILES, "valid_preds.npz"]:
        assert (report / name).is_file(), name
    for name in MODEL_FILES:
        assert (models / name).is_file(), name
    assert load_config(report / "config.yaml") == cfg
    env = json.loads((report / "env.json").read_text())
    assert {"python", "torch", "fastai", "timm", "device", "git_commit"} <= env.keys()
    assert env["torch"] == torch.__version__
    pd.testing.assert_frame_equal(
        pd.read_csv(report / "classes.csv"), pd.read_csv(tiny_data / "classes.csv")
    )
    summary = json.loads((report / "summary.json").read_text())
    keys = {"best_epoch", "monitor", "best", "final", "wall_time_s", "train_images_per_s", "paths"}
    assert keys <= summary.keys()
    assert Path(summary["paths"]["learner"]) == models / "learner.pkl"
    assert summary["monitor"] == "valid_loss"
    assert summary["best"]["epoch"] == summary["best_epoch"]
    best = list(models.glob("checkpoints/best-epoch*.pth"))
    assert len(best) == 1 and not list(models.glob("checkpoints/last-*"))


def _sklearn_table(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """TwinCar's table straight from scikit-learn (labels = classes present in y)."""
    pred, present, labels = probs.argmax(1), np.unique(y), np.arange(probs.shape[1])
    out = {"valid_acc": accuracy_score(y, pred)}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y, pred, labels=present, average=avg, zero_division=0
        )
        out |= {f"valid_precision_{avg}": p, f"valid_recall_{avg}": r, f"valid_f1_{avg}": f}
    out["valid_hamming"] = hamming_loss(y, pred)
    out["valid_cohen_kappa"] = cohen_kappa_score(y, pred, labels=labels)
    out["valid_mcc"] = matthews_corrcoef(y, pred)
    out["valid_jaccard_macro"] = jaccard_score(
        y, pred, labels=present, average="macro", zero_division=0
    )
    out["valid_top3"] = top_k_accuracy_score(y, probs, k=3, labels=labels)
    out["valid_top5"] = 1.0  # 4 classes: the true class is always among the top 5
    return out


def test_metrics_csv_equals_sklearn_on_saved_predictions(cli_run):
    _, cfg, report, _ = cli_run
    df = pd.read_csv(report / "metrics.csv")
    assert list(df.columns) == COLUMNS
    assert df["epoch"].tolist() == list(range(cfg.train.epochs))
    assert not df.isna().any().any()
    best = df.iloc[json.loads((report / "summary.json").read_text())["best_epoch"]]
    assert best["valid_loss"] == df["valid_loss"].min()
    npz = np.load(report / "valid_preds.npz")
    probs, y = npz["probs"], npz["targets"]
    assert len(npz["items"]) == len(y) == 12 and probs.shape == (12, 4)
    for key, value in _sklearn_table(y, probs).items():
        assert best[key] == pytest.approx(value, abs=1e-9), key
    eps = cfg.train.label_smoothing  # label-smoothing cross entropy, from the saved probabilities
    logp = np.log(probs)
    loss = (1 - eps) * -logp[np.arange(len(y)), y].mean() + eps * -logp.mean()
    assert best["valid_loss"] == pytest.approx(loss, abs=1e-4)


def test_resume_of_a_finished_run_is_refused(cli_run):
    _, cfg, report, _ = cli_run
    with pytest.raises(TwincarError, match="already finished") as e:
        run_experiment(cfg, resume=report)
    assert "\n" not in str(e.value)


def test_early_stopping_plateau_and_best_weights(tiny_cfg):
    # valid_top5 is 1.0 from epoch 0 on (4 classes): it never improves after the first epoch
    cfg = tiny_cfg
    cfg.train = dataclasses.replace(
        cfg.train,
        epochs=6,
        schedule="flat",
        monitor="valid_top5",
        early_stopping=2,
        plateau_patience=1,
        plateau_factor=10.0,
    )
    res = run_experiment(cfg)
    df = pd.read_csv(res.report_dir / "metrics.csv")
    assert len(df) == 2 + 1  # patience + 1 epochs
    assert res.summary["stopped_early"] and res.summary["best_epoch"] == 0
    lr = df["lr"].to_numpy()
    assert lr[1] == pytest.approx(lr[0])  # flat until the plateau after epoch 1
    assert lr[2] == pytest.approx(lr[1] / 10, rel=1e-6)
    # the kept weights are epoch 0's: same state as its checkpoint, same validation loss
    state = torch.load(
        res.model_dir / "checkpoints" / "best-epoch000.pth", map_location="cpu", weights_only=False
    )["model"]
    for k, v in res.learn.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    valid_loss = res.learn.validate()[0]
    assert valid_loss == pytest.approx(df["valid_loss"][0], abs=1e-5)
    assert abs(df["valid_loss"][0] - df["valid_loss"][2]) > 1e-4  # the last epoch differs


@pytest.mark.parametrize("valid_pct, checkpoint", [(0.0, "best"), (0.25, "last")])
def test_the_last_epoch_is_kept_without_validation_or_when_asked(tiny_cfg, valid_pct, checkpoint):
    cfg = tiny_cfg
    cfg.data = dataclasses.replace(cfg.data, valid_pct=valid_pct)
    cfg.train = dataclasses.replace(cfg.train, epochs=3, checkpoint=checkpoint)
    cfg.eval = dataclasses.replace(cfg.eval, test=True)
    res = run_experiment(cfg)
    df = pd.read_csv(res.report_dir / "metrics.csv")
    assert len(df) == 3 and res.summary["best_epoch"] == 2
    n_train = len(res.learn.dls.train_ds)
    if valid_pct == 0:  # every train image trains; nothing to validate on
        assert n_train == N_CLASSES * N_TRAIN and df["valid_loss"].isna().all()
        assert not (res.report_dir / "valid_preds.npz").exists()
        text = (res.report_dir / "summary.json").read_text()
        strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
        assert "best_value" not in strict and "valid_acc" not in strict["best"]
        assert list(headline_metrics(res.report_dir).columns) == [
            "metric",
            "test (evaluated, 24 images)",
        ]
    else:
        assert n_train < N_CLASSES * N_TRAIN and df["valid_loss"].notna().all()
    state = torch.load(
        res.model_dir / "checkpoints" / "best-epoch002.pth", map_location="cpu", weights_only=False
    )["model"]
    for k, v in res.learn.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert json.loads((res.report_dir / "eval_test.json").read_text())["n_images"] == 4 * 6


@pytest.mark.parametrize("n_done", [1, 2], ids=["after-head-stage", "inside-main-fit"])
def test_interrupted_run_resumes_in_the_same_folder(tiny_cfg, n_done):
    cfg = tiny_cfg
    # head-only epoch 0, then a main fit of 2 epochs; stopped after epoch 0 or 1
    cfg.train = dataclasses.replace(cfg.train, head_epochs=1, epochs=2, plateau_patience=1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, cbs=[InterruptAfter(n_done)])
    report = _only_dir(Path(cfg.reports_dir))
    before = pd.read_csv(report / "metrics.csv")
    assert before["epoch"].tolist() == list(range(n_done))
    assert not (report / "summary.json").exists()

    res = run_experiment(cfg, resume=report)
    after = pd.read_csv(report / "metrics.csv")
    assert res.report_dir == report and len(list(Path(cfg.reports_dir).iterdir())) == 1
    assert after["epoch"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(after.iloc[:n_done], before)
    assert res.summary["epochs_run"] == 3
    assert res.summary["best_epoch"] == int(after["valid_loss"].idxmin())  # best over both parts
    assert (res.model_dir / "learner.pkl").is_file()


def test_gradient_accumulation_steps_every_n_batches(tiny_cfg):
    cfg = tiny_cfg
    cfg.train = dataclasses.replace(cfg.train, epochs=1, grad_accum=2, freeze=[])
    learn = create_learner(cfg, build_dls(cfg))
    fit_run(learn, cfg, create_run_folder(cfg))
    steps = {int(s["step"]) for s in learn.opt.state_dict()["state"] if "step" in s}
    assert steps == {len(learn.dls.train) // 2}


def test_run_folders_are_never_reused(tiny_cfg):
    now = datetime(2024, 1, 2, 3, 4, 5)
    a, b = create_run_folder(tiny_cfg, now), create_run_folder(tiny_cfg, now)
    assert a.name == "tiny-20240102-030405" and b.name != a.name
    assert a.report_dir.is_dir() and b.report_dir.is_dir() and b.model_dir.is_dir()


def test_bad_resume_dirs_give_one_line_errors(tiny_cfg, tmp_path):
    with pytest.raises(TwincarError, match="no such run folder"):
        open_resume(tmp_path / "nope", tiny_cfg)
    with pytest.raises(TwincarError, match="not a run folder"):
        open_resume(tmp_path, tiny_cfg)
    run = create_run_folder(tiny_cfg)
    save_config(tiny_cfg, run.report_dir / "config.yaml")
    other = copy.deepcopy(tiny_cfg)
    other.train.epochs = 5
    with pytest.raises(ConfigError, match=r"train\.epochs") as e:
        open_resume(run.report_dir, other)
    assert "\n" not in str(e.value)
    assert open_resume(run.report_dir, tiny_cfg).name == run.name
    bad = copy.deepcopy(tiny_cfg)
    bad.train.monitor = "valid_accuracy"
    with pytest.raises(ConfigError, match="train.monitor"):
        run_experiment(bad)


def test_lr_find_leaves_weights_and_optimizer_alone(tiny_cfg, tmp_path):
    learn = create_learner(tiny_cfg, build_dls(tiny_cfg))
    fit_schedule(learn, 1, 1e-3, "one_cycle")  # an optimizer with state and scheduled hypers
    model = copy.deepcopy(learn.model.state_dict())
    opt = copy.deepcopy(learn.opt.state_dict())
    result = lr_find_report(learn, tmp_path, num_it=30)
    for k, v in learn.model.state_dict().items():
        torch.testing.assert_close(v, model[k], rtol=0, atol=0)
    after = learn.opt.state_dict()
    assert after["hypers"] == opt["hypers"]
    for s_after, s_before in zip(after["state"], opt["state"], strict=True):
        assert s_after.keys() == s_before.keys()
        for key in s_before:
            torch.testing.assert_close(s_after[key], s_before[key], rtol=0, atol=0)
    assert {"valley", "slide", "minimum"} <= result.keys()
    assert all(v > 0 for v in (result["valley"], result["slide"], result["minimum"]))
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert json.loads((tmp_path / "lr_find.json").read_text())["valley"] == result["valley"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.json", "lr_find.png"]


def test_lr_find_minimum_is_labelled_the_same_in_json_and_plot(tiny_cfg, tmp_path):
    import matplotlib.pyplot as plt

    from twincar_fast.experiment import lr_find_figure

    learn = create_learner(tiny_cfg, build_dls(tiny_cfg))
    result = lr_find_report(learn, tmp_path, num_it=30)
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    # "minimum" is the LR of the lowest loss (among the steps fastai's suggestions look at)
    lrs, losses = learn.recorder.lrs[3:-5], [float(v) for v in learn.recorder.losses[3:-5]]
    assert saved["minimum"] == pytest.approx(lrs[int(np.argmin(losses))])
    assert saved["minimum_div10"] == pytest.approx(saved["minimum"] / 10)  # fastai's suggestion
    fig = lr_find_figure(learn, result)
    points = {ln.get_label(): ln.get_xdata()[0] for ln in fig.axes[0].lines if ln.get_label()}
    plt.close(fig)
    (label,) = [k for k in points if k.startswith("minimum")]
    assert points[label] == pytest.approx(saved["minimum"])
    assert f"{saved['minimum']:.1e}" in label  # the legend states the value the JSON holds
    assert points[next(k for k in points if k.startswith("valley"))] == saved["valley"]
