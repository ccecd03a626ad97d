"""Config: extends, overrides, validation errors that name file and key, save → reload equality."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twincar_fast.config import (
    ExperimentConfig,
    load_config,
    parse_overrides,
    save_config,
    validate,
)
from twincar_fast.config_rules import METRIC_NAMES, METRICS_COLUMNS, MONITORS, VALUE_RULES
from twincar_fast.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def pair(tmp_path) -> Path:
    """base.yaml and a child that extends it from a sub-folder."""
    write(tmp_path / "base.yaml", "train:\n  epochs: 5\n  lr: 0.003\ndata:\n  batch_size: 16\n")
    return write(tmp_path / "sub" / "child.yaml", "extends: ../base.yaml\ndata:\n  batch_size: 8\n")


def test_extends_merges_base_first_and_child_wins(pair):
    cfg = load_config(pair)
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.003
    assert cfg.data.batch_size == 8
    assert cfg.data.img_size == ExperimentConfig().data.img_size  # untouched default
    assert cfg.name == "child"  # the file's stem


def test_overrides_are_parsed_to_field_types(pair):
    cfg = load_config(
        pair,
        [
            "train.epochs=3",
            "train.lr=[1e-5, 1e-3]",
            "model.weights=null",
            "data.balanced=true",
            "train.freeze=[stem, layer1]",
            "model.arch=resnet18",
            "aug.max_rotate=0",
        ],
    )
    assert cfg.train.epochs == 3
    assert cfg.train.lr == [1e-5, 1e-3]
    assert cfg.model.weights is None and cfg.data.balanced is True
    assert cfg.train.freeze == ["stem", "layer1"]
    assert cfg.model.arch == "resnet18"
    assert cfg.aug.max_rotate == 0.0 and isinstance(cfg.aug.max_rotate, float)


def test_unknown_key_suggests_the_closest(pair):
    with pytest.raises(
        ConfigError,
        match=r"child.yaml \+ overrides: unknown key 'train.epoch'; did you mean 'train.epochs'\?",
    ):
        load_config(pair, ["train.epoch=3"])
    write(pair, "extends: ../base.yaml\nmodle:\n  arch: resnet18\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'; did you mean 'model'\?"):
        load_config(pair)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=abc", r"key 'train.epochs': expected int, got 'abc'"),
        ("train.epochs=2.5", r"key 'train.epochs': expected int"),
        ("data.balanced=3", r"key 'data.balanced': expected bool"),
        ("model.head=transformer", r"key 'model.head': expected 'mlp' \| 'fastai'"),
        ("train.freeze=stem", r"key 'train.freeze': expected a list of str"),
        ("data.valid_pct=1.5", r"key 'data.valid_pct' must be in \[0, 1\)"),
        ("data.valid_pct=0", r"key 'train.early_stopping' must be 0 with data.valid_pct: 0"),
        ("train.warmup_epochs=2", r"key 'train.warmup_epochs' is for schedule cosine or flat"),
        ("train.lr_step=epoch", r"key 'train.lr_step' epoch is for schedule cosine or flat"),
        ("train.lr_step=week", r"key 'train.lr_step': expected 'batch' \| 'epoch'"),
        ("train.lr=-1", r"key 'train.lr' must be finite and positive"),
        ("data.item_size=100", r"key 'data.item_size' must be ≥ data.img_size"),
    ],
)
def test_bad_values_name_file_and_key(pair, override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(pair, [override])
    assert str(pair) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_bad_yaml_and_extends_loop(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "train: [1, 2\n"))
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["train.epochs"])


def test_save_then_reload_is_equal(pair, tmp_path):
    cfg = load_config(
        pair, ["train.lr=[1e-4, 1e-2]", "model.weights=w.safetensors", "data.num_workers=0"]
    )
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(saved) == cfg


@pytest.mark.parametrize("name", ["baseline", "demo"])
def test_shipped_experiments_load(name):
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    assert cfg.name == name


def test_baseline_is_the_twincar_recipe():
    cfg = load_config(REPO / "experiments" / "baseline.yaml")
    assert cfg.model.arch == "resnet50" and cfg.model.head == "mlp"
    assert cfg.train.freeze == ["stem", "layer1", "layer2"]
    assert cfg.train.epochs == 25 and cfg.train.early_stopping == 7
    assert cfg.train.label_smoothing == 0.1 and cfg.data.valid_pct == 0.1
    assert cfg.data.batch_size == 32 and cfg.data.root == "data/stanford_cars"


def test_demo_differs_from_baseline_only_where_it_says(tmp_path):
    demo = load_config(REPO / "experiments" / "demo.yaml")
    assert demo.data.demo is True and demo.data.root != "data/stanford_cars"
    assert demo.model.pretrained is False  # no downloads on first run


@pytest.mark.parametrize("name", ["../../escaped", "grp/exp", "..", "/abs", ""])
def test_name_must_be_one_folder_name(pair, name):
    """Issue 12.3: a name that escapes reports_dir or nests folders is refused."""
    with pytest.raises(ConfigError, match=r"key 'name' must be a plain folder name"):
        load_config(pair, [f"name={name!r}" if name else "name=''"])


@pytest.mark.parametrize("lr", [".inf", "1e400", ".nan", "[1e-3, .inf]"])
def test_lr_must_be_finite(pair, lr):
    """Issue 12.8: an infinite or NaN LR is a config error, not minutes of NaN training."""
    with pytest.raises(ConfigError, match=r"key 'train.lr' must be finite and positive"):
        load_config(pair, [f"train.lr={lr}"])


def test_user_paths_are_expanded(pair, monkeypatch, tmp_path):
    """Issue 12.13: `~` in a path means the home folder, as in a shell."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        pair, ["data.root=~/cars", "data.source=~/raw", "reports_dir=~/r", "model.weights=~/w.pth"]
    )
    assert cfg.data.root == str(tmp_path / "cars") and cfg.data.source == str(tmp_path / "raw")
    assert cfg.reports_dir == str(tmp_path / "r") and cfg.model.weights == str(tmp_path / "w.pth")


def test_non_utf8_config_is_one_line(tmp_path):
    """Issue 12.17: a Latin-1 file is a ConfigError naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "latin.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml: not a UTF-8 text file"):
        load_config(path)


def test_override_mistakes_are_blamed_on_the_overrides(pair):
    """Issue 12.18: a bad override is not reported as a mistake in the YAML file."""
    with pytest.raises(ConfigError, match=r"child.yaml \+ overrides: key 'train.epochs'"):
        load_config(pair, ["train.epochs=abc"])


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_run_shortened_on_the_command_line_fits_the_files_epoch_keys(epochs, capsys):
    """Issue 31.4: demo.yaml train.epochs=2 (or 1) failed on its warm-up of 2 epochs."""
    cfg = load_config(REPO / "experiments" / "demo.yaml", [f"train.epochs={epochs}"])
    assert cfg.train.epochs == epochs and cfg.train.warmup_epochs == epochs - 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "demo.yaml" in out
    assert f"train.warmup_epochs 2 → {epochs - 1}" in out
    recipe = load_config(REPO / "experiments" / "demo_recipe.yaml", [f"train.epochs={epochs}"])
    sizes = {1: [[0, 96]], 2: [[0, 80], [1, 96]]}[epochs]  # still ends at data.img_size
    assert recipe.data.img_size_schedule == sizes and recipe.data.img_size == 96
    highres = load_config(REPO / "experiments" / "highres.yaml", [f"train.epochs={epochs}"])
    assert highres.aug.mix_off_epochs == 0 and highres.train.warmup_epochs == epochs - 1
    # a value given on the command line itself is never changed: it is refused
    with pytest.raises(ConfigError, match=r"overrides: key 'train.warmup_epochs' must be in"):
        load_config(REPO / "experiments" / "demo.yaml", ["train.epochs=2", "train.warmup_epochs=2"])
    capsys.readouterr()
    cfg = load_config(REPO / "experiments" / "demo.yaml", ["train.epochs=3"])
    assert cfg.train.warmup_epochs == 2 and not capsys.readouterr().out  # in range: kept


def test_a_shortened_demo_style_run_trains(tiny_data, tmp_path):
    """Issue 31.4 end to end: a warm-up of 2 epochs from the file, one epoch on the command line."""
    from conftest import make_tiny_cfg

    from twincar_fast.cli import main

    cfg = make_tiny_cfg(tiny_data, tmp_path)
    cfg.train.schedule, cfg.train.warmup_epochs, cfg.train.epochs = "cosine", 2.0, 3
    yaml = save_config(cfg, tmp_path / "tiny.yaml")
    assert main(["run", str(yaml), "train.epochs=1"]) == 0
    (run,) = (tmp_path / "reports").iterdir()
    assert load_config(run / "config.yaml").train.warmup_epochs == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [  # issue 30.4: rules that lived in train/fit.py, data/loaders.py and data/cache.py
        (["train.monitor=valid_accuracy"], r"key 'train.monitor' is 'valid_accuracy', not a valid"),
        (["train.console_columns=[valid_acc, nope]"], r"key 'train.console_columns' names 'nope'"),
        (["aug.saturation=1.0"], r"key 'aug.saturation' must be in \[0, 1\), got 1.0"),
        (["aug.hue=2"], r"key 'aug.hue' must be in \[0, 1\), got 2.0"),
        (["aug.max_lighting=1"], r"key 'aug.max_lighting' must be in \[0, 1\)"),
        (["data.cache=on", "aug.stage=batch"], r"key 'data.cache' is on, which needs aug.stage"),
        (["data.cache_gpu_share=0"], r"key 'data.cache_gpu_share' must be in \(0, 1\], got 0.0"),
        (["train.plateau_factor=1"], r"key 'train.plateau_factor' must be > 1 \(the LR is"),
        (["data.num_workers=-1"], r"key 'data.num_workers' must be at least 0 or null, got -1"),
        (["data.demo_size=[64]"], r"key 'data.demo_size' must be \[W, H\], each ≥ 64, got \[64\]"),
    ],
)
def test_every_rule_is_checked_with_the_config(pair, overrides, message):
    """Issue 30.4: each rule on the config alone fails `load_config` in one line naming the key."""
    with pytest.raises(ConfigError, match=message) as info:
        load_config(pair, overrides)
    assert str(info.value).startswith(f"{pair} + overrides: key '")
    assert "\n" not in str(info.value)
    load_config(pair, ["data.cache=on", "aug.stage=batch", "aug.enabled=false"])  # no batch aug


def test_value_rules_name_real_keys_and_the_defaults_pass():
    """Every key of the rule table is a field; the defaults and the shipped baseline pass."""
    cfg = ExperimentConfig()
    for key in VALUE_RULES:
        section, _, name = key.rpartition(".")
        assert hasattr(getattr(cfg, section) if section else cfg, name), key
    validate(cfg)
    assert set(MONITORS) == {"valid_loss", *(f"valid_{m}" for m in METRIC_NAMES)}
    assert set(cfg.train.console_columns) <= set(METRICS_COLUMNS)


def test_a_bad_config_fails_before_torch_loads(tmp_path):
    """Issue 30.4: the rules are checked by `load_config` before torch or fastai is imported."""
    bad = write(tmp_path / "bad.yaml", "train:\n  monitor: nope\n")
    code = (
        "import sys\n"
        "from twincar_fast.config import load_config\n"
        "from twincar_fast.errors import ConfigError\n"
        "try:\n"
        f"    load_config({str(bad)!r})\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print(sorted(m for m in ('torch', 'fastai', 'timm') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    error, loaded = out.stdout.splitlines()
    assert error.startswith(f"{bad}: key 'train.monitor' is 'nope'") and loaded == "[]"
