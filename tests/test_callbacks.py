"""Callbacks: the per-epoch metric table, monitor directions, tracker replay, plateau under a schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastai.callback.schedule import SchedCos
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, top_k_accuracy_score

from twincar_fast.analysis.metrics import METRIC_NAMES
from twincar_fast.data import build_dls
from twincar_fast.model.learner import create_learner
from twincar_fast.train.callbacks import (
    MONITORS,
    EpochMetrics,
    Plateau,
    TrackerState,
    epoch_skipped,
    monitor_comp,
    replay_tracker,
    stopped_early,
)
from twincar_fast.train.fit import attach_metrics, fit_schedule


@pytest.fixture
def learn(tiny_cfg):
    """A tiny learner with the per-epoch metrics attached (not trained)."""
    torch.manual_seed(0)
    learn = create_learner(tiny_cfg, build_dls(tiny_cfg))
    attach_metrics(learn)
    return learn


def test_monitor_direction():
    assert monitor_comp("valid_loss") is np.less
    assert monitor_comp("valid_hamming") is np.less  # fastai would guess np.greater from the name
    for name in ("valid_acc", "valid_f1_macro", "valid_mcc", "valid_top5"):
        assert monitor_comp(name) is np.greater
    assert set(MONITORS) == {"valid_loss", *(f"valid_{m}" for m in METRIC_NAMES)}


def test_replay_tracker_follows_fastai_rules():
    # lower is better: best 2.0 at epoch 1, then three epochs without improvement
    s = replay_tracker([3.0, 2.0, 2.5, 2.6, 2.7], np.less)
    assert (s.best, s.best_epoch, s.wait, s.scale) == (2.0, 1, 3, 1.0)
    # with a plateau of patience 2: one LR drop after epochs 2-3, the count restarts at epoch 4
    s = replay_tracker([3.0, 2.0, 2.5, 2.6, 2.7], np.less, patience=2, factor=10.0)
    assert (s.wait, s.scale) == (1, 0.1)
    s = replay_tracker([0.5, 0.7, 0.6], np.greater)
    assert (s.best, s.best_epoch, s.wait) == (0.7, 1, 1)
    assert replay_tracker([], np.less).best is None


def test_epoch_metrics_equal_sklearn_on_the_same_predictions(learn):
    values = learn.validate()
    names = learn.recorder.metric_names[3:-1]  # after epoch, train/valid loss; before time
    assert names == ["train_acc", *(f"valid_{m}" for m in METRIC_NAMES)]
    shown = dict(zip(names, values[1:], strict=True))
    probs, targets = learn.get_preds()
    y, p = targets.numpy(), probs.numpy()
    pred = p.argmax(1)
    assert shown["valid_acc"] == pytest.approx(accuracy_score(y, pred))
    assert shown["valid_f1_macro"] == pytest.approx(
        f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)
    )
    assert shown["valid_mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert shown["valid_top3"] == pytest.approx(top_k_accuracy_score(y, p, k=3, labels=range(4)))
    assert np.isnan(shown["train_acc"])  # no training in validate()
    cb = learn.epoch_metrics
    np.testing.assert_allclose(cb.probs, p, atol=1e-6)
    assert values[0] == pytest.approx(learn.loss_func(probs.log(), targets).item(), abs=1e-4)


def test_train_accuracy_counts_training_batches(learn):
    fit_schedule(learn, 1, 1e-3, "flat")
    cb: EpochMetrics = learn.epoch_metrics
    n_seen = len(learn.dls.train) * learn.dls.train.bs
    assert cb.train_images == n_seen
    correct = cb.values["train_acc"] * n_seen
    assert correct == pytest.approx(round(correct)) and 0 <= correct <= n_seen
    assert cb.values["train_loss"] > 0
    assert not epoch_skipped(learn)


def test_plateau_scales_the_scheduled_lr(learn):
    # valid_top5 is always 1.0 with 4 classes; resumed with best 1.0 it never improves again
    plateau = Plateau("valid_top5", patience=1, factor=10.0, state=TrackerState(best=1.0))
    fit_schedule(learn, 2, 1e-2, "cosine", cbs=[plateau])
    lrs = np.array(learn.recorder.lrs)
    n = len(learn.dls.train)
    sched = SchedCos(1e-2, 1e-2 / 1e5)
    expected = np.array([sched(i / (2 * n)) for i in range(2 * n)])
    np.testing.assert_allclose(lrs[:n], expected[:n], rtol=1e-6)  # epoch 0: the schedule
    np.testing.assert_allclose(lrs[n:], expected[n:] / 10, rtol=1e-6)  # epoch 1: scaled by 1/10
    assert plateau.scale == pytest.approx(0.01)  # and again after epoch 1


def test_warmup_then_cosine_lr_curve(learn):
    lr, epochs, warm = 1e-2, 4, 1
    fit_schedule(learn, epochs, lr, "cosine", warmup_epochs=warm)
    lrs = np.array(learn.recorder.lrs)
    n = epochs * len(learn.dls.train)
    pos = np.arange(n) / n
    pct = warm / epochs
    t = (pos - pct) / (1 - pct)
    cosine = lr / 1e5 + (lr - lr / 1e5) * (1 + np.cos(np.pi * t)) / 2
    expected = np.where(pos < pct, lr / 100 + (lr - lr / 100) * pos / pct, cosine)
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    peak = int(np.argmax(lrs))
    assert lrs[0] == pytest.approx(lr / 100) and peak == round(pct * n)
    assert np.all(np.diff(lrs[: peak + 1]) > 0) and np.all(np.diff(lrs[peak:]) < 0)


def test_lr_stepped_per_epoch_holds_each_epochs_start_value(learn):
    lr, epochs, warm = 1e-2, 4, 2
    fit_schedule(learn, epochs, lr, "cosine", warmup_epochs=warm, lr_step="epoch")
    lrs = np.array(learn.recorder.lrs).reshape(epochs, -1)  # one row per epoch
    assert np.all(lrs == lrs[:, :1])  # constant within each epoch
    # timm's train.py without --sched-on-updates: lr/100, then halfway up, then the cosine
    start = np.array([lr / 100, lr / 100 + (lr - lr / 100) / 2, lr, 0.0])
    start[3] = lr / 1e5 + (lr - lr / 1e5) * (1 + np.cos(np.pi / 2)) / 2
    np.testing.assert_allclose(lrs[:, 0], start, rtol=1e-6)


def test_stopped_early_counts_main_epochs_since_the_best():
    train = type("T", (), {"monitor": "valid_loss", "head_epochs": 1, "early_stopping": 2})
    rows = [{"epoch": i, "valid_loss": v} for i, v in enumerate([9.0, 1.0, 2.0, 3.0])]
    assert stopped_early(rows, np.less, train)
    assert not stopped_early(rows[:3], np.less, train)
    assert not stopped_early(rows, np.greater, train)  # higher is better: still improving
