"""Issue 17, the high-resolution recipe: weight EMA, mixup/CutMix, progressive resizing, TTA,
SGD with Nesterov momentum and warm-up, the shipped recipe configs and their bad inputs."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import InterruptAfter
from fastai.callback.core import Callback
from fastai.losses import LabelSmoothingCrossEntropyFlat
from safetensors.torch import load_file

from twincar_fast.analysis.evaluate import evaluate_learner
from twincar_fast.analysis.metrics import classification_metrics
from twincar_fast.analysis.tta import tta_views
from twincar_fast.config import load_config
from twincar_fast.data import build_dls, eval_dl
from twincar_fast.errors import ConfigError
from twincar_fast.experiment import run_experiment
from twincar_fast.lab.compare import compare_table
from twincar_fast.model.learner import create_learner
from twincar_fast.run_folder import create_run_folder
from twincar_fast.train.fit import fit_run
from twincar_fast.train.recipe import MixBatches

REPO = Path(__file__).resolve().parents[1]
BEST = "checkpoints/best-epoch{:03d}.pth"


def _only_dir(parent: Path) -> Path:
    (d,) = [p for p in parent.iterdir() if p.is_dir()]
    return d


def _assert_same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), **tol)


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


class KeepWeights(Callback):
    """Copies, at each epoch's end, of the raw weights and of the EMA's."""

    order = 90

    def __init__(self):
        self.raw, self.ema = [], []

    def after_epoch(self):
        self.raw.append(copy.deepcopy(self.learn.model.state_dict()))
        self.ema.append(copy.deepcopy(self.learn.ema_weights.module.state_dict()))


def _accuracy(model, dl) -> float:
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for xb, yb in dl:
            correct += (model(xb).argmax(-1) == yb).sum().item()
            n += len(yb)
    return correct / n


# ---------------------------------------------------------------- EMA


def test_ema_weights_are_validated_kept_exported_and_tested(tiny_cfg):
    cfg = tiny_cfg
    cfg.train = dataclasses.replace(cfg.train, epochs=3, ema=0.9, freeze=[])
    cfg.eval = dataclasses.replace(cfg.eval, test=True)
    keep = KeepWeights()
    res = run_experiment(cfg, cbs=[keep])
    best = res.summary["best_epoch"]
    shipped = res.learn.model.state_dict()
    _assert_same(shipped, keep.ema[best], rtol=0, atol=0)  # evaluated with the EMA weights
    assert _differs(shipped, keep.raw[best])  # ... not the raw ones
    exported = load_file(res.model_dir / "model.safetensors")
    _assert_same(exported, {k: v.cpu() for k, v in keep.ema[best].items()}, rtol=0, atol=0)
    ckpt = torch.load(res.model_dir / BEST.format(best), map_location="cpu", weights_only=False)
    _assert_same(ckpt["model"], keep.ema[best], rtol=0, atol=0)

    # metrics.csv: valid_* are the EMA weights' accuracy, valid_acc_raw the raw weights'
    df = pd.read_csv(res.report_dir / "metrics.csv")
    model = copy.deepcopy(res.learn.model)
    valid = res.learn.dls.valid
    for epoch in range(3):
        model.load_state_dict(keep.ema[epoch])
        assert df["valid_acc"][epoch] == pytest.approx(_accuracy(model, valid))
        model.load_state_dict(keep.raw[epoch])
        assert df["valid_acc_raw"][epoch] == pytest.approx(_accuracy(model, valid))
    # the test evaluation used the shipped (EMA) weights
    test = json.loads((res.report_dir / "eval_test.json").read_text())
    again = evaluate_learner(res.learn, cfg.data.root, "test")
    assert test["test_loss"] == pytest.approx(again["test_loss"])
    assert not hasattr(res.learn, "ema_weights")  # no EMA copy pickled into learner.pkl


def test_resume_continues_the_ema(tiny_cfg, tmp_path):
    def cfg_in(folder: str):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.reports_dir, cfg.models_dir = str(tmp_path / folder / "r"), str(tmp_path / folder / "m")
        cfg.train = dataclasses.replace(cfg.train, epochs=3, ema=0.8, checkpoint="last", freeze=[])
        return cfg

    whole = run_experiment(cfg_in("whole"))
    cfg = cfg_in("resumed")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, cbs=[InterruptAfter(2)])
    resumed = run_experiment(cfg, resume=_only_dir(Path(cfg.reports_dir)))
    assert whole.summary["best_epoch"] == resumed.summary["best_epoch"] == 2
    _assert_same(resumed.learn.model.state_dict(), whole.learn.model.state_dict())
    a, b = (
        pd.read_csv(r.report_dir / "metrics.csv").drop(columns="time_s") for r in (whole, resumed)
    )
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------- mixup / CutMix


class SeeLoss(Callback):
    """Per training batch: the epoch, whether the mixing loss ran, and the loss targets."""

    order = 95

    def __init__(self):
        self.seen = []

    def after_loss(self):
        if self.training:
            mix = self.learn.mix_batches
            mixed = self.learn.loss_func == mix.loss
            self.seen.append(
                (self.epoch, mixed, mix.targets.clone() if mixed else None, self.yb[0])
            )


@pytest.mark.parametrize("alphas", [(0.4, 0.0), (0.0, 1.0)], ids=["mixup", "cutmix"])
def test_mixing_changes_the_targets_then_stops(tiny_cfg, alphas):
    cfg = tiny_cfg
    cfg.train = dataclasses.replace(cfg.train, epochs=3, label_smoothing=0.1)
    cfg.aug = dataclasses.replace(cfg.aug, mixup=alphas[0], cutmix=alphas[1], mix_off_epochs=1)
    see = SeeLoss()
    learn = create_learner(cfg, build_dls(cfg))
    fit_run(learn, cfg, create_run_folder(cfg), cbs=[see])
    by_epoch = {e: [s for s in see.seen if s[0] == e] for e in range(3)}
    assert all(mixed for _, mixed, _, _ in by_epoch[0] + by_epoch[1])
    assert not any(mixed for _, mixed, _, _ in by_epoch[2])  # the last epoch: no mixing
    on, off = 1 - 0.1 + 0.1 / 4, 0.1 / 4  # label-smoothed one-hot, 4 classes
    for _, _, targets, y in by_epoch[0] + by_epoch[1]:
        assert targets.sum(1).allclose(torch.ones(len(y)))
        plain = torch.full_like(targets, off).scatter_(1, y[:, None], on)
        assert not torch.allclose(targets, plain)  # mixed: a second label has weight
    assert learn.loss_func.__class__.__name__ == "LabelSmoothingCrossEntropyFlat"  # restored


def test_unmixed_soft_targets_give_the_label_smoothing_loss(tiny_cfg):
    cfg = tiny_cfg
    cfg.aug = dataclasses.replace(cfg.aug, mixup=0.4, mix_prob=0.0)
    mix = MixBatches(cfg, 4, lambda: 0)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mixed_x, mix.targets = mix.mixup(x.clone(), y)
    assert torch.equal(mixed_x, x)  # mix_prob 0: the batch is left as it is
    pred = torch.randn(6, 4)
    expected = LabelSmoothingCrossEntropyFlat(eps=0.1)(pred, y)
    assert mix.loss(pred, y).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- progressive resizing


class SeeBatches(Callback):
    """The shape of every training batch, by epoch."""

    def __init__(self):
        self.shapes = {}

    def before_batch(self):
        if self.training:
            self.shapes.setdefault(self.epoch, set()).add(tuple(self.xb[0].shape))


def _resize_cfg(cfg, out: Path):
    cfg = copy.deepcopy(cfg)
    cfg.reports_dir, cfg.models_dir = str(out / "r"), str(out / "m")
    cfg.data = dataclasses.replace(
        cfg.data,
        img_size=48,
        item_size=48,
        img_size_schedule=[[0, 32], [2, 40], [3, 48]],
        batch_size_schedule=[[0, 8], [2, 4]],
    )
    cfg.train = dataclasses.replace(cfg.train, epochs=4)
    return cfg


def test_progressive_resizing_changes_sizes_at_the_scheduled_epochs(tiny_cfg, tmp_path):
    cfg = _resize_cfg(tiny_cfg, tmp_path)
    see = SeeBatches()
    res = run_experiment(cfg, cbs=[see])
    sizes = {e: {s[2:] for s in shapes} for e, shapes in see.shapes.items()}
    assert sizes == {0: {(32, 32)}, 1: {(32, 32)}, 2: {(40, 40)}, 3: {(48, 48)}}
    batch = {e: {s[0] for s in shapes} for e, shapes in see.shapes.items()}
    assert batch == {0: {8}, 1: {8}, 2: {4}, 3: {4}}
    df = pd.read_csv(res.report_dir / "metrics.csv")
    assert df["img_size"].tolist() == [32, 32, 40, 48]
    assert res.learn.dls.valid.one_batch()[0].shape[-1] == 48  # evaluated at data.img_size


@pytest.mark.parametrize("n_done", [2, 3], ids=["before-a-switch", "after-a-switch"])
def test_resume_lands_on_the_scheduled_size(tiny_cfg, tmp_path, n_done):
    whole = run_experiment(_resize_cfg(tiny_cfg, tmp_path / "whole"))
    cfg = _resize_cfg(tiny_cfg, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, cbs=[InterruptAfter(n_done)])
    see = SeeBatches()
    resumed = run_experiment(cfg, resume=_only_dir(Path(cfg.reports_dir)), cbs=[see])
    first = min(see.shapes)
    assert first == n_done and {s[2:] for s in see.shapes[first]} == {(40 + 8 * (n_done - 2),) * 2}
    a, b = (
        pd.read_csv(r.report_dir / "metrics.csv").drop(columns="time_s") for r in (whole, resumed)
    )
    pd.testing.assert_frame_equal(a, b)  # the same batches as the uninterrupted run


# ---------------------------------------------------------------- TTA


class Flip(Callback):
    """Mirror every batch (written here independently of the package's TTA)."""

    def before_batch(self):
        self.learn.xb = (self.xb[0].flip(-1),)


def test_tta_is_the_mean_of_flipped_and_plain_probabilities(tiny_cfg):
    cfg = tiny_cfg
    cfg.train = dataclasses.replace(cfg.train, epochs=1)
    cfg.eval = dataclasses.replace(cfg.eval, test=True, tta="flip")
    res = run_experiment(cfg)
    result = json.loads((res.report_dir / "eval_test.json").read_text())
    dl = eval_dl(res.learn.dls, cfg.data.root, "test")
    with res.learn.no_bar():
        plain, y = res.learn.get_preds(dl=dl)
        flipped, _ = res.learn.get_preds(dl=dl, cbs=[Flip()])
    mean = ((plain + flipped) / 2).numpy()
    expected = classification_metrics(y.numpy(), mean)
    for k, v in expected.items():
        assert result[f"test_{k}_tta"] == pytest.approx(v, abs=1e-6), k
    assert result["test_acc"] == pytest.approx(
        classification_metrics(y.numpy(), plain.numpy())["acc"]
    )
    assert result["test_loss_tta"] != pytest.approx(result["test_loss"], abs=1e-6)
    assert result["tta"] == "flip"
    # the run comparison shows both; runs without TTA get no such column
    df, _ = compare_table([res.report_dir])
    assert (
        df["test_acc_tta"][0] == result["test_acc_tta"] and df["test_acc"][0] == result["test_acc"]
    )


def test_flip_and_crop_views():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    views = tta_views(x, "flip+crops")
    assert views.shape == (20, 3, 8, 8)  # 5 crops × (plain, mirror) × 2 images
    big = torch.nn.functional.interpolate(x, size=(9, 9), mode="bilinear", align_corners=False)
    torch.testing.assert_close(views[0:2], big[..., :8, :8])  # top-left crop, both images
    torch.testing.assert_close(views[2:4], big[..., :8, :8].flip(-1))  # ... mirrored
    torch.testing.assert_close(views[-4:-2], big[..., :8, :8])  # centre of 9 is offset 0 too
    flip = tta_views(x, "flip")
    assert torch.equal(flip[:2], x) and torch.equal(flip[2:], x.flip(-1))


# ---------------------------------------------------------------- optimizer and schedule


def test_sgd_nesterov_with_warmup_gives_the_asked_lr_curve(tiny_cfg):
    cfg = tiny_cfg
    lr, epochs, warmup = 0.05, 3, 1
    cfg.train = dataclasses.replace(
        cfg.train,
        epochs=epochs,
        lr=lr,
        freeze=[],
        optimizer="sgd",
        nesterov=True,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=warmup,
    )
    learn = create_learner(cfg, build_dls(cfg))
    fit_run(learn, cfg, create_run_folder(cfg))
    groups = learn.opt.opt.param_groups
    assert isinstance(learn.opt.opt, torch.optim.SGD)
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in groups)
    assert any("momentum_buffer" in s for s in learn.opt.opt.state.values())  # SGD stepped

    lrs = np.array(learn.recorder.lrs)
    n = len(lrs)
    pct = warmup / epochs
    pos = np.arange(n) / n
    warm = lr / 100 + (lr - lr / 100) * pos / pct
    cos_pos = (pos - pct) / (1 - pct)
    cos = lr / 1e5 + (lr - lr / 1e5) * (1 + np.cos(np.pi * cos_pos)) / 2
    np.testing.assert_allclose(lrs, np.where(pos < pct, warm, cos), rtol=1e-5)  # float32 steps
    assert lrs[0] == pytest.approx(lr / 100) and lrs.max() <= lr * (1 + 1e-9)
    assert math.isclose(lrs[int(n * pct)], lr, rel_tol=1e-6)


# ---------------------------------------------------------------- configs and bad inputs


def test_recipe_configs_load_with_what_they_promise():
    high = load_config(REPO / "experiments" / "highres.yaml")
    assert high.data.img_size == 448 and high.data.img_size_schedule[-1] == [70, 448]
    assert high.train.optimizer == "sgd" and high.train.freeze == [] and high.train.ema > 0
    assert high.train.mixed_precision == "bf16" and high.train.channels_last
    assert high.aug.mix_off_epochs > 0 and high.eval.tta == "flip"
    assert high.train.lr == pytest.approx(0.1 * high.data.batch_size / 256)  # the scaling rule
    demo = load_config(REPO / "experiments" / "demo_recipe.yaml")
    assert demo.data.demo and demo.train.ema and demo.aug.mixup and demo.data.img_size_schedule
    assert demo.train.freeze == [] and demo.train.warmup_epochs and demo.eval.tta != "none"
    base = load_config(REPO / "experiments" / "baseline.yaml")
    assert base.train.ema == 0 and base.aug.mixup == 0 and not base.data.img_size_schedule


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.img_size_schedule=[[0, 32], [3, 48], [2, 64]]"], r"img_size_schedule.*increase"),
        (["data.img_size_schedule=[[1, 224]]"], r"img_size_schedule.*start at epoch 0"),
        (["data.img_size_schedule=[[0, 128], [30, 224]]"], r"img_size_schedule.*past the run"),
        (["data.img_size_schedule=[[0, 128], [5, 192]]"], r"img_size_schedule.*ends at size 192"),
        (["data.batch_size_schedule=[[0, 16], [12, 8]]"], r"batch_size_schedule.*past"),
        (["train.ema=1.0"], r"key 'train.ema' is a decay in \[0, 1\)"),
        (["aug.mixup=0.2", "aug.enabled=false"], r"key 'aug.mixup' .*aug.enabled is false"),
        (["aug.cutmix=1.0", "data.batch_size=15"], r"key 'data.batch_size' must be even"),
        (["aug.mix_off_epochs=50"], r"key 'aug.mix_off_epochs'"),
        (["train.nesterov=true"], r"key 'train.nesterov' needs train.optimizer: sgd"),
    ],
)
def test_bad_recipe_keys_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(
            REPO / "experiments" / "demo.yaml",
            ["data.img_size=224", "data.item_size=224", *overrides],
        )
    assert "\n" not in str(e.value)


def test_torch_sgd_steps_as_fastai_sgd_without_weight_decay(tiny_cfg):
    """Plain momentum: the wrapped torch SGD and fastai's own SGD take the very same steps."""
    from functools import partial

    from fastai.optimizer import SGD
    from fastai.torch_core import set_seed

    cfg = tiny_cfg
    cfg.train = dataclasses.replace(
        cfg.train, optimizer="sgd", weight_decay=0.0, freeze=[], mixed_precision="none"
    )
    set_seed(0, reproducible=True)
    weights = [create_learner(cfg, build_dls(cfg)).model.state_dict()]  # before any step
    for fastai_sgd in (False, True):
        set_seed(0, reproducible=True)
        learn = create_learner(cfg, build_dls(cfg))
        if fastai_sgd:
            learn.opt_func, learn.opt = partial(SGD, mom=0.9, wd=0.0), None
            learn.create_opt()
        with learn.no_bar(), learn.no_logging():
            learn.fit(2, 0.05)
        weights.append(learn.model.state_dict())
    assert _differs(weights[0], weights[1])  # training moved the weights ...
    _assert_same(weights[1], weights[2], rtol=0, atol=0)  # ... the same way with both optimizers
