"""Several processes on one run: 2 gloo CPU processes through Accelerate's launcher and torchrun.

Every launch is a subprocess with a hard timeout, so a hang (a rank waiting alone in a collective)
fails the test instead of stalling CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import InterruptAfter, make_tiny_cfg
from fastai.torch_core import set_seed
from torch import nn

from twincar_fast.analysis.metrics import classification_metrics
from twincar_fast.cli import main
from twincar_fast.config import ExperimentConfig, load_config, save_config
from twincar_fast.data import build_dls
from twincar_fast.errors import ConfigError, TwincarError
from twincar_fast.experiment import run_experiment
from twincar_fast.model.learner import create_learner
from twincar_fast.train.callbacks import METRICS_COLUMNS, VALID_COLUMNS
from twincar_fast.train.checkpoints import load_checkpoint
from twincar_fast.train.distributed import (
    batchnorm_kinds,
    check_distributed,
    launch,
    rank_streams,
    revert_sync_bn,
)

TIMEOUT = 300  # seconds for one launch: a hang fails here


def _yaml(tiny_data: Path, tmp_path: Path, **train) -> Path:
    """The tiny experiment in fp32 (exact comparisons) with `train` overrides, as a YAML file."""
    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.train = dataclasses.replace(cfg.train, mixed_precision="none", **train)
    return save_config(cfg, tmp_path / "tiny.yaml")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _twincar(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "twincar_fast.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args]


def _one_run(tmp_path: Path) -> tuple[Path, Path]:
    """The only run's reports/<run> and models/<run> folders."""
    (report,) = (tmp_path / "reports").iterdir()
    (model,) = (tmp_path / "models").iterdir()
    assert report.name == model.name
    return report, model


def _single_process(cfg: ExperimentConfig, ckpt: Path) -> dict[str, float]:
    """The validation columns of `ckpt`'s weights, from one process's `get_preds`."""
    learn = create_learner(cfg, build_dls(cfg))
    load_checkpoint(learn, ckpt, with_opt=False)
    with learn.no_bar():
        probs, targets, losses = learn.get_preds(ds_idx=1, with_loss=True)
    table = classification_metrics(targets.numpy(), probs.numpy())
    return {"valid_loss": float(losses.mean()), **{f"valid_{k}": v for k, v in table.items()}}


def _assert_row_matches(row: pd.Series, expected: dict[str, float]) -> None:
    for col in ["valid_loss", *VALID_COLUMNS]:
        assert row[col] == pytest.approx(expected[col], abs=1e-5), col


def test_two_processes_write_one_run_with_gathered_metrics(tiny_data, tmp_path):
    yaml = _yaml(tiny_data, tmp_path)
    cfg = load_config(yaml)
    cfg.eval = dataclasses.replace(cfg.eval, test=True)
    save_config(cfg, yaml)
    r = _twincar("train", str(yaml), "--processes", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report, model = _one_run(tmp_path)
    assert r.stdout.count(f"run {report.name}") == 1  # one console: rank 0's
    metrics = pd.read_csv(report / "metrics.csv")
    assert list(metrics.columns) == METRICS_COLUMNS and list(metrics.epoch) == [0, 1]
    assert not metrics[["train_loss", "valid_loss", *VALID_COLUMNS]].isna().any().any()
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["model.safetensors"]
    assert (model / "learner.pkl").is_file() and (report / "eval_test.json").is_file()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["machine"]["processes"] == 2 and summary["epochs_run"] == 2
    # every validation image once (12), not one rank's shard (6) nor the padded 2 × 6
    assert len(np.load(report / "valid_preds.npz")["targets"]) == 12
    # the best epoch's metrics are those of its checkpoint evaluated in one process
    best = Path(summary["paths"]["best_checkpoint"])
    _assert_row_matches(metrics.iloc[summary["best_epoch"]], _single_process(cfg, best))


def _wait_rows(csv: Path, n: int, proc: subprocess.Popen) -> int:
    """Wait until metrics.csv has `n` rows (or the run ended); the rows there."""
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end and proc.poll() is None:
        if csv.is_file() and csv.stat().st_size and len(pd.read_csv(csv)) >= n:
            return len(pd.read_csv(csv))
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before {n} epoch(s) were written")


def test_killed_distributed_run_resumes_with_two_processes(tiny_data, tmp_path):
    yaml = _yaml(tiny_data, tmp_path, epochs=12)
    cfg = load_config(yaml)
    proc = subprocess.Popen(
        _torchrun("-m", "twincar_fast.run", str(yaml)),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        report = None
        while report is None and proc.poll() is None:
            runs = list((tmp_path / "reports").glob("tiny-*/.lock"))
            report = runs[0].parent if runs and runs[0].stat().st_size else None
            time.sleep(0.05)
        assert report is not None, "the run never started"
        _wait_rows(report / "metrics.csv", 1, proc)
        rank0 = int((report / ".lock").read_text())  # the run's lock holder is rank 0
        os.kill(rank0, signal.SIGKILL)  # rank 1 then fails in its next collective
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    before = pd.read_csv(report / "metrics.csv")
    assert 1 <= len(before) < 12
    (last,) = (tmp_path / "models" / report.name / "checkpoints").glob("last-epoch*.pth")
    k = int(last.stem.removeprefix("last-epoch"))
    assert k == len(before) - 1
    _assert_row_matches(before.iloc[k], _single_process(cfg, last))  # that epoch, gathered

    cfg.train = dataclasses.replace(cfg.train, epochs=11)  # a different config is refused
    other = save_config(cfg, tmp_path / "other.yaml")
    r = _twincar("train", str(other), "--resume", str(report), "--processes", "2", cwd=tmp_path)
    assert r.returncode == 2 and "train.epochs" in r.stderr and len(r.stderr.splitlines()) == 1

    r = _twincar("train", str(yaml), "--resume", str(report), "--processes", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = pd.read_csv(report / "metrics.csv")
    assert list(after.epoch) == list(range(12))
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)  # kept, not retrained
    assert json.loads((report / "summary.json").read_text())["epochs_run"] == 12
    assert len(list((tmp_path / "reports").iterdir())) == 1


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launched process of `rank` under the `launcher` process, once it runs."""
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


def _epochs(report: Path) -> pd.DataFrame:
    """metrics.csv without its wall times."""
    return pd.read_csv(report / "metrics.csv").drop(columns=["time_s"])


def test_a_rank_killed_mid_run_resumes_to_the_uninterrupted_runs_epochs(tiny_data, tmp_path):
    """Issue 29.9: every epoch after a resume differed (ranks above 0 got new random streams),
    and the killed job ended without the resume hint."""
    yaml = _yaml(tiny_data, tmp_path, epochs=5)
    whole = tmp_path / "whole"
    r = _twincar("train", str(yaml), "reports_dir=whole/reports", "models_dir=whole/models",
                 "--processes", "2", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (uninterrupted,) = (whole / "reports").iterdir()

    cmd = [sys.executable, "-m", "twincar_fast.cli", "train", str(yaml), "--processes", "2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        report = None
        while report is None and proc.poll() is None:
            runs = list((tmp_path / "reports").glob("tiny-*/metrics.csv"))
            report = runs[0].parent if runs else None
            time.sleep(0.05)
        assert report is not None, "the run never started"
        _wait_rows(report / "metrics.csv", 2, proc)  # killed mid-fit, after 2 epochs or more
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    hint = f"--resume {report} --processes 2`"
    assert last.startswith("twincar: error: process rank ") and last.endswith(hint), err[-3000:]
    assert "ChildFailedError" not in err  # no launcher dump
    before = _epochs(report)
    assert 2 <= len(before) < 5

    r = _twincar("train", str(report / "config.yaml"), "--resume", str(report),
                 "--processes", "2", cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pd.testing.assert_frame_equal(_epochs(report), _epochs(uninterrupted), rtol=1e-6)


def test_refusals_end_in_one_line_before_or_after_the_launch(tiny_data, tmp_path):
    """Issue 29.19: each rank printed the refusal, then the launcher a 46-line ChildFailedError."""
    yaml = _yaml(tiny_data, tmp_path)
    schedule = "data.img_size_schedule=[[0,32]]"  # refused for several processes: before launching
    r = _twincar("train", str(yaml), schedule, "--processes", "2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith("twincar: error: data.img_size_schedule rebuilds the loaders")
    # a key's value is refused with the config itself, before the launch
    r = _twincar("train", str(yaml), "train.monitor=nope", "--processes", "2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith(f"twincar: error: {yaml} + overrides: key 'train.monitor' is 'nope'")
    # a config error only the launched processes find (the model's groups): rank 0's line, no
    # launcher dump
    r = _twincar("train", str(yaml), "train.freeze=[nope]", "--processes", "2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith("twincar: error: train.freeze: no parameter group 'nope'")
    assert not (tmp_path / "reports").exists()


def test_early_stopping_ends_both_ranks_at_the_same_epoch(tiny_data, tmp_path):
    # with 4 classes top-5 accuracy is 1 from the first epoch: it never improves after it
    yaml = _yaml(tiny_data, tmp_path, epochs=8, monitor="valid_top5", early_stopping=2)
    r = subprocess.run(
        _torchrun("-m", "twincar_fast.run", str(yaml)),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stops = sorted(line for line in r.stdout.splitlines() if "early stopping" in line)
    assert stops == [
        f"No improvement of valid_top5 for 2 epochs: early stopping after epoch 2 of this stage "
        f"(rank {rank} of 2)"
        for rank in (0, 1)
    ]
    report, _ = _one_run(tmp_path)
    assert list(pd.read_csv(report / "metrics.csv").epoch) == [0, 1, 2]
    assert json.loads((report / "summary.json").read_text())["stopped_early"] is True


def test_lr_find_under_two_processes_refuses_at_once(tiny_data, tmp_path):
    yaml = _yaml(tiny_data, tmp_path)
    r = subprocess.run(
        _torchrun("-m", "twincar_fast.cli", "lr-find", str(yaml)),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode != 0
    assert r.stderr.count("twincar: error: lr-find runs in one process") == 2  # each rank, 1 line
    assert not (tmp_path / "reports").exists()


def test_bad_process_counts_are_one_line_errors(tiny_data, tmp_path, capsys, monkeypatch):
    yaml = _yaml(tiny_data, tmp_path)
    assert main(["train", str(yaml), "--processes", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("twincar: error: --processes must be at least 1") and err.count("\n") == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a one-GPU machine
    with pytest.raises(TwincarError, match="--processes 2: this machine has 1 GPU"):
        launch(2, [str(yaml)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # processes on CPUs
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it
    with pytest.raises(ConfigError, match="train.sync_bn: torch's SyncBatchNorm works only on"):
        check_distributed(load_config(yaml, ["train.sync_bn=true"]))


def test_sync_bn_is_reverted_to_each_layers_own_batchnorm(tiny_data, tmp_path):
    cfg = load_config(_yaml(tiny_data, tmp_path))
    # the learner's model (BatchNorm2d) and a BatchNorm1d after its logits
    model = nn.Sequential(create_learner(cfg, build_dls(cfg)).model, nn.BatchNorm1d(4))
    kinds = batchnorm_kinds(model)
    assert set(kinds.values()) == {nn.BatchNorm1d, nn.BatchNorm2d}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.running_mean.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what `train.sync_bn` trains with
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    back = revert_sync_bn(synced, kinds)
    assert batchnorm_kinds(back) == kinds
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    after = back.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_one_process_run_resumes_with_two_and_a_staged_fit(tiny_data, tmp_path):
    yaml = _yaml(tiny_data, tmp_path, head_epochs=1, epochs=2)
    cfg = load_config(yaml)
    with pytest.raises(KeyboardInterrupt):  # one process, stopped after the head-only epoch
        run_experiment(cfg, cbs=[InterruptAfter(1)])
    report, _ = _one_run(tmp_path)
    before = pd.read_csv(report / "metrics.csv")
    r = _twincar("train", str(yaml), "--resume", str(report), "--processes", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = pd.read_csv(report / "metrics.csv")
    assert list(after.epoch) == [0, 1, 2]  # the main fit (layers unfrozen) under DDP
    pd.testing.assert_frame_equal(after.iloc[:1], before)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["machine"]["processes"] == 2 and summary["epochs_run"] == 3


def test_two_processes_without_a_validation_split(tiny_data, tmp_path):
    cfg = load_config(_yaml(tiny_data, tmp_path, epochs=1))
    cfg.data = dataclasses.replace(cfg.data, valid_pct=0.0)  # fastai's padding divided by 0 here
    yaml = save_config(cfg, tmp_path / "tiny.yaml")
    r = _twincar("train", str(yaml), "--processes", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report, model = _one_run(tmp_path)
    metrics = pd.read_csv(report / "metrics.csv")
    assert list(metrics.epoch) == [0] and metrics.valid_acc.isna().all()
    assert metrics.train_loss.notna().all() and (model / "model.safetensors").is_file()


def test_each_rank_above_0_draws_its_own_augmentation_stream(tiny_data, tmp_path, monkeypatch):
    cfg = load_config(_yaml(tiny_data, tmp_path))

    def draws(rank: int) -> list[int]:
        monkeypatch.setenv("RANK", str(rank))
        set_seed(cfg.train.seed, reproducible=True)  # what every rank does first
        learn = create_learner(cfg, build_dls(cfg))
        rank_streams(learn)
        return [learn.dls.train.rng.getrandbits(32) for _ in range(4)] + [
            int(torch.randint(0, 2**31, ()))
        ]

    rank0, rank1, rank2 = draws(0), draws(1), draws(2)
    assert draws(0) == rank0 and draws(1) == rank1  # reproducible per rank
    assert len({tuple(rank0), tuple(rank1), tuple(rank2)}) == 3
    monkeypatch.delenv("RANK")
    set_seed(cfg.train.seed, reproducible=True)
    plain = create_learner(cfg, build_dls(cfg))
    assert [plain.dls.train.rng.getrandbits(32) for _ in range(4)] == rank0[:4]  # rank 0 as one
