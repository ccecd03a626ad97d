"""Config: extends, overrides, validation errors that name file and key, save → reload equality."""

from __future__ import annotations

from pathlib import Path

import pytest

from twincar_fast.config import ExperimentConfig, load_config, parse_overrides, save_config
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
        ConfigError, match=r"child.yaml: unknown key 'train.epoch'; did you mean 'train.epochs'\?"
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
        ("data.valid_pct=1.5", r"key 'data.valid_pct' must be between 0 and 1"),
        ("train.lr=-1", r"key 'train.lr' must be positive"),
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
