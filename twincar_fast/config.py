"""Typed experiment config: load YAML (with `extends:`), apply `key=value` overrides, validate, save.

A config file holds only the keys it changes; `extends: other.yaml` (relative to the file) pulls in
the rest, and command-line overrides such as `train.epochs=3` beat both. Every field below is
documented by the comment beside it; `experiments/baseline.yaml` repeats those comments. The
rules the values follow (ranges, rules between keys) are in config_rules.py, checked here once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import yaml

from twincar_fast.config_rules import (
    build_typed,
    check_key,
    check_name,
    fit_to_epochs,
    validate,
)
from twincar_fast.errors import ConfigError
from twincar_fast.files import write_text

__all__ = [
    "AugConfig",
    "build_typed",
    "check_key",
    "check_name",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainConfig",
    "config_to_dict",
    "expand_paths",
    "fit_to_epochs",
    "flat_dict",
    "load_config",
    "parse_overrides",
    "save_config",
    "validate",
]


@dataclass
class DataConfig:
    """Where the prepared data set lives and how it is split, sized and batched."""

    root: str = "data/stanford_cars"  # prepared set (annotations.csv, classes.csv); see `prepare`
    source: str | None = None  # raw download that `prepare` converts into `root` if it's missing
    demo: bool = False  # build the synthetic demo set into `root` when it is missing
    demo_classes: int = 12  # demo set: number of classes
    demo_per_class: int = 40  # demo set: images per class in each of the train and test splits
    demo_size: list[int] = field(default_factory=lambda: [192, 128])  # demo set: image W, H
    demo_seed: int = 0  # demo set: drawing seed (same seed, same images)
    valid_pct: float = 0.1  # share of the train split held out for validation, per class; 0 = train
    # on every train image, no validation: the last epoch is kept (train.checkpoint: last)
    split_seed: int = 42  # seed of the stratified train/valid split
    allow_empty_classes: bool = False  # a class of classes.csv with no training image is refused
    # before training (the model would ship a class it never saw); true trains anyway
    item_size: int = 320  # aug.stage batch: items are presized to this before batch augmentation
    img_size: int = (
        224  # size of the training and evaluation crops (with a schedule: its last size)
    )
    img_size_schedule: list[list[int]] = field(default_factory=list)  # progressive resizing:
    # [[epoch, size], ...] from epoch 0, e.g. [[0, 224], [10, 320], [20, 448]]; the training
    # loaders are rebuilt at those epochs; evaluation and export use img_size, the last size
    batch_size: int = 32  # images per batch (TwinCar: 32)
    batch_size_schedule: list[list[int]] = field(default_factory=list)  # [[epoch, batch], ...]
    # beside img_size_schedule (bigger images, smaller batches); [] = batch_size throughout
    num_workers: int | None = None  # DataLoader workers (threads from the cache); null: 1 per core
    bbox_crop: bool = False  # crop each image to its bounding box before resizing
    bbox_margin: float = 0.16  # margin around the box, as a share of its width/height
    balanced: bool = False  # class-balanced sampling of training batches (weighted sampler)
    resize: Literal["crop", "squish", "pad"] = "crop"  # presizing to item_size: square crop
    # (random place in training, centre in validation), squish the whole image, or pad it
    draft: bool = True  # decode big JPEGs at a reduced scale (PIL draft) still ≥ item_size
    cache: Literal["auto", "on", "off"] = "auto"  # train from decoded uint8 pixels in one
    # memory-mapped file (data/cache.py), batches gathered in threads; auto: on unless it would
    # exceed cache_max_gb (or aug.stage is batch); off: decode every image every epoch
    cache_size: int | None = None  # cached images' shorter side; null: img_size × max(1.15, zoom)
    cache_max_gb: float = 8.0  # auto: largest cache to build, in GiB; a quarter of it bounds
    # the validation items kept in memory after the first epoch (more: read from the files)
    cache_dir: str | None = None  # where the cache file lives; null = <root>/.cache
    cache_aug: Literal["auto", "threads", "batched"] = "auto"  # training augmentation from the
    # cache: per image in CPU threads (OpenCV), or batched on the training device (grid_sample);
    # auto: batched on a CUDA device, threads elsewhere
    cache_device: Literal["auto", "cpu", "cuda"] = "auto"  # batched: where the pixels live;
    # cuda: in GPU memory; cpu: pinned host memory, copied per batch; auto: cuda if the cache
    # fits in cache_gpu_share of the free GPU memory
    cache_gpu_share: float = 0.5  # auto: largest share of free GPU memory the cache may take


@dataclass
class AugConfig:
    """Training augmentation (fastai's aug_transforms) plus TwinCar's colour and blur extras."""

    enabled: bool = True  # false = no augmentation at all (resize + normalize only)
    stage: Literal["item", "batch"] = "item"  # item: per image in the CPU workers (OpenCV, one
    # warp + one colour map, ColorJitter's colour definitions); batch: fastai's batch transforms on
    # the training device (measured slower, GPU included: see README, Performance)
    flip: bool = True  # random horizontal flip
    min_scale: float = 0.35  # random resized crop: smallest share of the image kept (1 = off)
    max_rotate: float = 10.0  # largest rotation in degrees (0 = off)
    max_warp: float = 0.2  # largest perspective warp (0 = off)
    max_zoom: float = 1.1  # largest extra zoom (1 = off)
    max_lighting: float = 0.2  # brightness and contrast change (0 = off)
    saturation: float = 0.2  # saturation jitter, like ColorJitter's (0 = off)
    hue: float = 0.05  # hue jitter, a share of the colour circle (0 = off)
    blur_p: float = 0.2  # probability of a Gaussian blur per image (0 = off)
    blur_sigma: float = 1.5  # largest blur sigma in pixels of the training crop
    p_affine: float = 0.75  # probability of each affine transform
    p_lighting: float = 0.75  # probability of each lighting transform
    mixup: float = 0.0  # mixup alpha (timm's Mixup on the device batch; 0 = off; e.g. 0.2)
    cutmix: float = 0.0  # CutMix alpha (0 = off; with mixup too, each mixed batch picks one)
    mix_prob: float = 1.0  # share of training batches that are mixed
    mix_off_epochs: int = 0  # the last N epochs train without mixing (timm's --mixup-off-epoch)


HeadName = Literal["mlp", "fastai", "timm"]


@dataclass
class ModelConfig:
    """The timm backbone and the classifier head."""

    arch: str = "resnet50"  # any timm model name (`timm.list_models()`)
    pretrained: bool = True  # ImageNet weights from timm's hub (needs a network once)
    weights: str | None = None  # local .safetensors/.pth state dict (timm or torchvision) instead
    head: HeadName = "mlp"  # the classifier on the body, one of:
    # mlp: TwinCar's pool→Linear→ReLU→Dropout→Linear; fastai: fastai's BatchNorm/dropout head;
    # timm: the model's own classifier (timm's pooling + fc)
    head_hidden: int = 512  # hidden units of the mlp head
    head_dropout: float = 0.3  # dropout of the head


CONSOLE_COLUMNS = ("train_loss", "valid_loss", "valid_acc", "valid_f1_macro", "valid_top5")


@dataclass
class TrainConfig:
    """The fit: freezing, learning rates, loss, optimizer, schedule and callbacks."""

    epochs: int = 25  # most epochs (early stopping may end sooner)
    lr: Union[float, list[float]] = field(default_factory=lambda: [1e-4, 1e-3])  # noqa: UP007
    # ^ one LR; [low, high] spread over the trainable groups (fastai's slice); or one per group
    freeze: list[str] = field(default_factory=lambda: ["stem", "layer1", "layer2"])  # frozen groups
    train_bn: bool = True  # BatchNorm layers of frozen groups still train (fastai's default)
    head_epochs: int = 0  # staged fit: epochs with only the head training before the main fit
    schedule: Literal["one_cycle", "cosine", "flat"] = "one_cycle"  # LR schedule
    warmup_epochs: float = 0.0  # cosine/flat: linear warm-up from lr/100 over these epochs (timm's)
    lr_step: Literal["batch", "epoch"] = "batch"  # cosine/flat: the LR moves every batch, or once
    # an epoch, at the value the schedule has at the epoch's start (timm's train.py default)
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop", "ranger", "lamb"] = "adamw"
    # ^ adamw: decoupled weight decay (torch's AdamW); adam: L2 in the gradient (torch's Adam);
    # sgd: torch's SGD (L2 weight decay, as the published ResNet recipes), with momentum below
    momentum: float = 0.9  # sgd: momentum (one_cycle cycles it 0.95 → 0.85 → 0.95 instead)
    nesterov: bool = False  # sgd: Nesterov momentum
    weight_decay: float = 0.01  # weight decay of the optimizer
    label_smoothing: float = 0.1  # ε of label-smoothing cross entropy (0 = plain CE)
    monitor: str = "valid_loss"  # metric for early stopping, plateau and the best checkpoint
    checkpoint: Literal["best", "last"] = "best"  # kept: best epoch by `monitor`, or the last
    early_stopping: int = 7  # patience in epochs (0 = off)
    plateau_patience: int = 3  # epochs without improvement before the LR drops (0 = off)
    plateau_factor: float = 10.0  # the LR is divided by this on a plateau
    mixed_precision: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16/fp16 on GPU,
    # bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), else none
    channels_last: bool = True  # channels-last memory format (faster convs on GPU and CPU)
    grad_accum: int = 1  # accumulate gradients over this many batches
    sync_bn: bool = False  # several processes: SyncBatchNorm (BatchNorm statistics over every
    # process's shard; off: each process's own, as one process with data.batch_size would have)
    lr_scale: Literal["none", "linear"] = "none"  # several processes: linear multiplies train.lr
    # by their number (the global batch is data.batch_size × processes; Goyal et al. 2017)
    ema: float = 0.0  # EMA of the weights (timm's ModelEmaV3) with this decay, e.g. 0.9998;
    # 0 = off; on: validation, the best checkpoint, the export and the test use the EMA weights
    ema_warmup: bool = True  # EMA decay warms up (1 - (1 + step)^-2/3) so short runs average too
    compile: bool = False  # torch.compile the model (GPU only)
    seed: int = 42  # seed of weights init, sampling and augmentation
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    console_columns: list[str] = field(default_factory=lambda: list(CONSOLE_COLUMNS))
    # ^ the metrics.csv columns of the console's epoch table (metrics.csv keeps them all)


@dataclass
class EvalConfig:
    """Evaluation and interpretation at the end of a run."""

    test: bool = True  # evaluate the best model on the official test split
    interpret: bool = True  # draw plots, top losses and Grad-CAM++ maps
    top_losses: int = 16  # images in the top-losses grid
    gradcam: int = 12  # Grad-CAM++ maps from the top losses and correct examples
    confusion_zoom: int = 20  # classes in the zoom on the most-confused block
    most_confused: int = 20  # most-confused pairs listed
    twins: int = 5  # twin pairs (look-alike classes the model mixes up) explained with Finer-CAM
    # vs Grad-CAM++ in the report (twins.csv, figures/twins/); 0 = off
    tta: Literal["none", "flip", "flip+crops"] = "none"  # test-time augmentation of the test
    # evaluation (test_*_tta beside test_*): mean probabilities over the image and its mirror;
    # flip+crops: over the 5 crops (corners + centre) of a 1/0.875 larger image and their mirrors


@dataclass
class ExperimentConfig:
    """One whole experiment: data, augmentation, model, training, evaluation and outputs."""

    name: str | None = None  # run name prefix; null = the config file's stem
    reports_dir: str = "reports"  # run reports go to reports_dir/<run>/
    models_dir: str = "models"  # run models go to models_dir/<run>/
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    # ^ experiment trackers fed every metrics.csv row (extras: pip install -e ".[mlflow]" ...)


# ---------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as Python and JSON do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> dict:
    """Read one YAML mapping, with a one-line error for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (check the path)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a UTF-8 text file (byte {e.start}); save the config as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, not {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    """Deep-merge `over` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_extends(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read `path` and everything it `extends`, merged base-first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: key 'extends' must be a file path, got {parent!r}")
    return _merge(_resolve_extends(path.parent / parent, (*seen, path)), data)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """Turn `section.key=value` strings into a nested dict, values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {item!r} must look like section.key=value (e.g. train.epochs=3)"
            )
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[leaf] = value
    return out


def load_config(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), check: bool = True
) -> ExperimentConfig:
    """Load an experiment YAML (following `extends:`), apply `key=value` overrides and validate.

    With `check=False` only keys and types are checked, not value ranges (a sweep checks a
    search space's types up front; a trial outside the ranges fails on its own).
    """
    path = Path(path)
    data = _resolve_extends(path)
    file_cfg = build_typed(ExperimentConfig, data, str(path))  # its own mistakes name the file ...
    over = parse_overrides(overrides)
    where = f"{path} + overrides" if overrides else str(path)  # ... the overrides' name them
    cfg = build_typed(ExperimentConfig, _merge(data, over), where)
    if cfg.name is None:
        cfg.name = path.stem
    expand_paths(cfg)
    if check:  # a run shortened on the command line: the file's epoch-dependent keys follow
        _say_fitted(path, over, fit_to_epochs(cfg, file_cfg, over))
        validate(cfg, where)
    return cfg


def _say_fitted(path: Path, over: dict, notes: list[str]) -> None:
    """One line saying which of the file's keys were fitted to the shorter run (rank 0 only)."""
    if not notes or os.environ.get("RANK", "0") != "0":
        return
    t = over.get("train", {})
    given = ", ".join(f"train.{k}={t[k]}" for k in ("epochs", "head_epochs") if k in t)
    print(
        f"{path}: fitted to {given} from the command line: {'; '.join(notes)} "
        "(set them on the command line to choose other values)"
    )


def expand_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Expand `~` in every path of the config (in place), as a shell would."""
    cfg.reports_dir = os.path.expanduser(cfg.reports_dir)
    cfg.models_dir = os.path.expanduser(cfg.models_dir)
    cfg.data.root = os.path.expanduser(cfg.data.root)
    for obj, key in ((cfg.data, "source"), (cfg.data, "cache_dir"), (cfg.model, "weights")):
        if getattr(obj, key) is not None:
            setattr(obj, key, os.path.expanduser(getattr(obj, key)))
    return cfg


# ---------------------------------------------------------------- saving


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """The config as plain nested dicts and lists (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def flat_dict(d: dict, prefix: str = "") -> dict:
    """Nested dicts → {'section.key': value}, the keys as overrides name them."""
    out = {}
    for k, v in d.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> Path:
    """Write the fully resolved config to YAML atomically; `load_config` reads it back equal."""
    text = "# resolved twincar_fast config: every key, after `extends` and overrides\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return write_text(path, text)
