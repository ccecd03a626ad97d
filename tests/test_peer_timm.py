"""benchmarks.peer_timm: our config mapped to timm train.py's flags, and the ImageFolder export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import N_CLASSES, N_TEST, N_TRAIN
from PIL import Image

from benchmarks.peer_timm import export_imagefolder, mapping_notes, timm_flags
from twincar_fast.config import load_config
from twincar_fast.errors import ConfigError

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"


def flag_values(flags: list[str]) -> dict[str, list[str]]:
    """`--flag v1 v2` groups of a command line, by flag."""
    out: dict[str, list[str]] = {}
    for item in flags:
        if item.startswith("-") and not item[1:2].isdigit():
            key = item
            out[key] = []
        else:
            out[key].append(item)
    return out


def test_demo_settings_map_to_train_py_flags(tmp_path):
    cfg = load_config(DEMO, ["train.device=cpu", "train.mixed_precision=none"])
    f = flag_values(timm_flags(cfg, tmp_path / "folder", 12, tmp_path))
    t = cfg.train
    assert f["--model"] == [cfg.model.arch] and f["--num-classes"] == ["12"]
    assert f["--img-size"] == [str(cfg.data.img_size)] and f["--crop-pct"] == ["1.0"]
    assert f["-b"] == [str(cfg.data.batch_size)] and f["--epochs"] == [str(t.epochs)]
    assert f["--opt"] == [t.optimizer] and float(f["--lr"][0]) == t.lr
    assert float(f["--weight-decay"][0]) == t.weight_decay
    assert float(f["--smoothing"][0]) == t.label_smoothing and f["--seed"] == [str(t.seed)]
    warmup = round(t.warmup_epochs) if t.schedule != "one_cycle" else round(0.25 * t.epochs)
    assert f["--sched"] == ["cosine"] and f["--warmup-epochs"] == [str(warmup)]
    assert "--sched-on-updates" in f  # our LR moves every batch (train.lr_step: batch)
    per_epoch = load_config(DEMO, ["train.lr_step=epoch", "train.device=cpu"])
    assert "--sched-on-updates" not in timm_flags(per_epoch, tmp_path, 12, tmp_path)
    assert f["--hflip"] == ["0.5"] and float(f["--color-jitter"][0]) == cfg.aug.max_lighting
    assert f["--scale"] == ["1", "1"] and f["--ratio"] == ["1", "1"]  # demo: no random crop
    assert f["--train-split"] == ["train"] and f["--val-split"] == ["test"]
    assert "--no-prefetcher" in f and "--amp" not in f and "--pretrained" not in f
    bf16 = flag_values(timm_flags(load_config(DEMO, ["train.mixed_precision=bf16",
                       "train.device=cpu"]), tmp_path, 12, tmp_path))  # fmt: skip
    assert bf16["--amp-dtype"] == ["bfloat16"]
    weights = tmp_path / "w.safetensors"
    local = flag_values(timm_flags(load_config(DEMO, [f"model.weights={weights}",
                        "train.device=cpu"]), tmp_path, 12, tmp_path))  # fmt: skip
    assert local["--pretrained"] == [] and local["--pretrained-path"] == [str(weights)]


def test_settings_train_py_cannot_take_are_refused(tmp_path):
    for override in ("train.freeze=[stem]", "train.lr=[0.001,0.01]", "train.optimizer=lamb"):
        cfg = load_config(DEMO, [override])
        with pytest.raises(ConfigError):
            timm_flags(cfg, tmp_path, 12, tmp_path)
    notes = mapping_notes(load_config(DEMO, ["data.valid_pct=0.1", "model.head=mlp"]))
    assert any("valid_pct" in n for n in notes) and any("head" in n for n in notes)


@pytest.mark.parametrize("bbox_crop", [True, False])
def test_export_is_our_validation_geometry(tiny_cfg, tiny_data, tmp_path, bbox_crop):
    cfg = tiny_cfg
    cfg.data = dataclasses.replace(cfg.data, bbox_crop=bbox_crop, resize="squish", img_size=32)
    counts = export_imagefolder(cfg, Path(tiny_data), tmp_path / "folder")
    assert counts == {"train": N_CLASSES * N_TRAIN, "test": N_CLASSES * N_TEST}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        folders = sorted((tmp_path / "folder" / split).iterdir())
        assert [p.name for p in folders] == [str(c) for c in range(N_CLASSES)]
        assert all(len(list(p.glob("*.png"))) == n for p in folders)
    image = Image.open(next((tmp_path / "folder" / "test" / "0").glob("*.png")))
    assert image.size == (32, 32)
    square = (np.asarray(image)[..., 0] > 180).mean()  # class 0's square is (230, 200, 40)
    # the box crop (+16% margin) leaves the car (the square) filling most of the frame
    assert square > 0.4 if bbox_crop else square < 0.15


def test_seeds_are_set_per_run_and_summarized_as_mean_and_std():
    from benchmarks.peer_timm import seed_summary, with_seed

    flags = ["--model", "test_resnet", "--seed", "42", "--output", "/r", "--epochs", "10"]
    run = ["--model", "test_resnet", "--seed", "3", "--output", "/r/seed3/timm", "--epochs", "10"]
    # each seed's train.py writes its summary.csv under its own run folder, where it is read
    assert with_seed(flags, 3, Path("/r/seed3/timm")) == run
    runs = [{"seed": s, "test_acc": a, "wall_s": w} for s, a, w in [(1, 0.9, 50), (2, 0.95, 70)]]
    m = seed_summary(runs)
    assert m["seeds"] == [1, 2] and m["test_acc_mean"] == 0.925 and m["wall_s_mean"] == 60
    assert m["test_acc_std"] == round(0.05 / 2**0.5, 5) and m["wall_s_total"] == 120
    assert seed_summary(runs[:1])["test_acc_std"] == 0.0


@pytest.mark.parametrize("sides", [("ours", "timm"), ("ours",), ("timm",)])
def test_seeds_take_turns_and_only_runs_one_side(monkeypatch, tmp_path, sides):
    import benchmarks.peer_timm as peer

    calls = []

    def ours(config, overrides, out):
        calls.append(("ours", overrides[-1], out))
        return {"test_acc": 0.9, "wall_s": 1.0}

    def timm(repo, flags, out):
        calls.append(("timm", flags[flags.index("--seed") + 1], Path(flags[-1])))
        return {"test_acc": 0.8, "wall_s": 2.0}

    monkeypatch.setattr(peer, "run_ours", ours)
    monkeypatch.setattr(peer, "run_timm", timm)
    flags = ["--seed", "42", "--output", str(tmp_path)]
    runs = peer.run_seeds("c.yaml", ["x=1"], flags, tmp_path, tmp_path, 3, sides, first=6)
    assert sorted(runs) == sorted(sides) and all(len(r) == 3 for r in runs.values())
    assert [r["seed"] for r in runs[sides[0]]] == [6, 7, 8]
    expected = []
    for seed in (6, 7, 8):
        turn = sides if seed % 2 else sides[::-1]  # the side that went second goes first next
        for side in turn:
            seed_arg = f"train.seed={seed}" if side == "ours" else str(seed)
            expected.append((side, seed_arg, tmp_path / f"seed{seed}" / side))
    assert calls == expected


def test_only_one_side_needs_seeds():
    from benchmarks.peer_timm import main

    with pytest.raises(ConfigError, match="--only: give --seeds N"):
        main(["experiments/demo.yaml", "--timm-repo", "x", "--only", "ours"])
