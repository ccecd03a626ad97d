"""Typed experiment config: load YAML (with `extends:`), apply `key=value` overrides, validate, save.

A config file holds only the keys it changes; `extends: other.yaml` (relative to the file) pulls in
the rest, and command-line overrides such as `train.epochs=3` beat both. Every field below is
documented by the comment beside it; `experiments/baseline.yaml` repeats those comments.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

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
    cache_max_gb: float = 8.0  # auto: largest cache to build, in GiB
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
    file_cfg = _build(ExperimentConfig, data, str(path), "")  # its own mistakes name the file ...
    over = parse_overrides(overrides)
    where = f"{path} + overrides" if overrides else str(path)  # ... the overrides' name them
    cfg = _build(ExperimentConfig, _merge(data, over), where, "")
    if cfg.name is None:
        cfg.name = path.stem
    expand_paths(cfg)
    if check:  # a run shortened on the command line: the file's epoch-dependent keys follow
        _say_fitted(path, over, fit_to_epochs(cfg, file_cfg, over))
        validate(cfg, where)
    return cfg


# ---------------------------------------------------------------- a shorter run from the command line


def _given(over: dict, key: str) -> bool:
    """Whether the overrides set the dotted `key`."""
    node: Any = over
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _squeezed(rows: list[list[int]], old: int, new: int) -> list[list[int]]:
    """An [[epoch, value], ...] schedule planned over `old` epochs, its epochs scaled to `new`
    (an epoch reached by two entries keeps the later one, so the schedule still ends the same)."""
    out: dict[int, int] = {}
    for epoch, value in rows:
        out[epoch * new // old] = value
    return [[e, v] for e, v in sorted(out.items())]


def fit_to_epochs(cfg: ExperimentConfig, file_cfg: ExperimentConfig, over: dict) -> list[str]:
    """Fit the file's epoch-dependent keys to epochs shortened on the command line (in place).

    Only when the overrides set `train.epochs` or `train.head_epochs` and not the key itself: the
    warm-up is clamped to epochs - 1 (0 for one epoch); `aug.mix_off_epochs` and a schedule's
    epochs are scaled to the run's (a schedule still ends at the same size); each only when it is
    out of range. What was changed, as phrases.
    """
    if not (_given(over, "train.epochs") or _given(over, "train.head_epochs")):
        return []
    t, d, a = cfg.train, cfg.data, cfg.aug
    total, old = t.head_epochs + t.epochs, file_cfg.train.head_epochs + file_cfg.train.epochs
    notes = []
    if not _given(over, "train.warmup_epochs") and t.epochs >= 1 and t.warmup_epochs >= t.epochs:
        notes.append(f"train.warmup_epochs {t.warmup_epochs:g} → {t.epochs - 1}")
        t.warmup_epochs = float(t.epochs - 1)
    if not _given(over, "aug.mix_off_epochs") and old > 0 and a.mix_off_epochs > total:
        notes.append(f"aug.mix_off_epochs {a.mix_off_epochs} → {a.mix_off_epochs * total // old}")
        a.mix_off_epochs = a.mix_off_epochs * total // old
    for key in ("img_size_schedule", "batch_size_schedule"):
        rows = getattr(d, key)
        valid_rows = all(len(r) == 2 for r in rows) and old > 0 and total >= 1
        if _given(over, f"data.{key}") or not valid_rows or not rows or rows[-1][0] < total:
            continue
        setattr(d, key, _squeezed(rows, old, total))
        notes.append(f"data.{key} {rows} → {getattr(d, key)}")
    return notes


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


# ---------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    """A readable name for a type hint."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the type hint `tp` and return it converted (int → float only)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(tp)):
            return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a bool
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise bad


def build_typed(cls: type, data: Any, where: str) -> Any:
    """Dataclass `cls` from a mapping, typed and checked like a config (ConfigError naming `where`)."""
    return _build(cls, data, where, "")


def _build(cls: type, data: Any, file: str, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, naming the file and key of any mistake."""
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?"
                if close
                else f"; valid keys: {', '.join(names)}"
            )
            raise ConfigError(f"{file}: unknown key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, file, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{file}: key '{prefix}{key}'")
    return cls(**kwargs)


# ---------------------------------------------------------------- validation


def check_key(ok: bool, file: str, key: str, msg: str) -> None:
    """Raise a ConfigError naming the file and key unless `ok`."""
    if not ok:
        raise ConfigError(f"{file}: key '{key}' {msg}")


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # one folder name: never `..` or a path


def check_name(name: str | None, where: str) -> None:
    """ConfigError unless `name` is one plain folder name (a run's or a sweep's); `where` names
    the key or flag it came from."""
    if name is not None and not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where} must be a plain folder name (letters, digits, . _ -; no / or ..), "
            f"got {name!r}"
        )


def validate(cfg: ExperimentConfig, file: str = "config") -> None:
    """Check value ranges and cross-field rules; raise ConfigError naming the file and key."""
    d, a, m, t, e = cfg.data, cfg.aug, cfg.model, cfg.train, cfg.eval
    check_name(cfg.name, f"{file}: key 'name'")
    check_key(0 <= d.valid_pct < 1, file, "data.valid_pct", f"must be in [0, 1), got {d.valid_pct}")
    if d.valid_pct == 0:  # nothing to monitor: no early stopping, plateau or best-epoch choice
        for key in ("early_stopping", "plateau_patience"):
            check_key(not getattr(t, key), file, f"train.{key}", "must be 0 with data.valid_pct: 0")
    check_key(d.img_size >= 16, file, "data.img_size", f"must be at least 16, got {d.img_size}")
    check_key(
        d.item_size >= d.img_size, file, "data.item_size", f"must be ≥ data.img_size ({d.img_size})"
    )
    check_key(d.batch_size >= 1, file, "data.batch_size", f"must be at least 1, got {d.batch_size}")
    check_key(
        d.num_workers is None or d.num_workers >= 0, file, "data.num_workers", "must be ≥ 0 or null"
    )
    check_key(d.bbox_margin >= 0, file, "data.bbox_margin", f"must be ≥ 0, got {d.bbox_margin}")
    check_key(d.cache_size is None or d.cache_size >= 16, file, "data.cache_size", "must be ≥ 16")
    check_key(d.cache_max_gb > 0, file, "data.cache_max_gb", f"must be > 0, got {d.cache_max_gb}")
    check_key(0 < d.cache_gpu_share <= 1, file, "data.cache_gpu_share", "must be in (0, 1]")
    check_key(
        not (d.cache_aug == "threads" and d.cache_device == "cuda"),
        file,
        "data.cache_device",
        "cuda keeps the cache on the GPU for data.cache_aug=batched; set that, or cache_device=auto",
    )
    check_key(
        d.demo_classes >= 2, file, "data.demo_classes", f"must be at least 2, got {d.demo_classes}"
    )
    check_key(d.demo_per_class >= 2, file, "data.demo_per_class", "must be at least 2")
    check_key(
        len(d.demo_size) == 2 and min(d.demo_size) >= 64,
        file,
        "data.demo_size",
        "must be [W, H], each ≥ 64",
    )
    check_key(0 < a.min_scale <= 1, file, "aug.min_scale", f"must be in (0, 1], got {a.min_scale}")
    check_key(a.max_zoom >= 1, file, "aug.max_zoom", f"must be ≥ 1, got {a.max_zoom}")
    for key in ("max_rotate", "max_warp", "max_lighting", "saturation", "hue", "blur_sigma"):
        check_key(getattr(a, key) >= 0, file, f"aug.{key}", f"must be ≥ 0, got {getattr(a, key)}")
    for key in ("blur_p", "p_affine", "p_lighting"):
        check_key(0 <= getattr(a, key) <= 1, file, f"aug.{key}", "must be a probability in [0, 1]")
    check_key(m.head_hidden >= 1, file, "model.head_hidden", "must be at least 1")
    check_key(0 <= m.head_dropout < 1, file, "model.head_dropout", "must be in [0, 1)")
    check_key(t.epochs >= 1, file, "train.epochs", f"must be at least 1, got {t.epochs}")
    check_key(0 <= t.head_epochs, file, "train.head_epochs", "must be ≥ 0")
    check_key(
        0 <= t.warmup_epochs < t.epochs,
        file,
        "train.warmup_epochs",
        f"must be in [0, epochs) = [0, {t.epochs}), got {t.warmup_epochs:g}",
    )
    check_key(
        not (t.warmup_epochs and t.schedule == "one_cycle"),
        file,
        "train.warmup_epochs",
        "is for schedule cosine or flat (one_cycle warms up by itself); set it to 0",
    )
    lrs = t.lr if isinstance(t.lr, list) else [t.lr]
    check_key(
        len(lrs) >= 1 and all(math.isfinite(lr) and lr > 0 for lr in lrs),
        file,
        "train.lr",
        f"must be finite and positive, got {t.lr}",
    )
    check_key(0 <= t.label_smoothing < 1, file, "train.label_smoothing", "must be in [0, 1)")
    check_key(t.weight_decay >= 0, file, "train.weight_decay", "must be ≥ 0")
    check_key(t.early_stopping >= 0, file, "train.early_stopping", "must be ≥ 0 (0 = off)")
    check_key(t.plateau_patience >= 0, file, "train.plateau_patience", "must be ≥ 0 (0 = off)")
    check_key(
        t.plateau_factor > 1, file, "train.plateau_factor", "must be > 1 (the LR is divided by it)"
    )
    check_key(t.grad_accum >= 1, file, "train.grad_accum", "must be at least 1")
    for key in ("top_losses", "gradcam", "confusion_zoom", "most_confused", "twins"):
        check_key(getattr(e, key) >= 0, file, f"eval.{key}", "must be ≥ 0")
    check_key(len(set(cfg.log)) == len(cfg.log), file, "log", f"names a tracker twice: {cfg.log}")
    _validate_recipe(cfg, file)


def _check_schedule(rows: list[list[int]], total: int, file: str, key: str, least: int) -> None:
    """An epoch → value schedule: [epoch, value] pairs from epoch 0, epochs increasing and < total."""
    check_key(
        all(len(r) == 2 for r in rows), file, key, f"entries must be [epoch, value] pairs: {rows}"
    )
    if not rows:
        return
    epochs = [e for e, _ in rows]
    check_key(epochs[0] == 0, file, key, f"must start at epoch 0 (it starts at {epochs[0]})")
    check_key(
        all(b > a for a, b in zip(epochs, epochs[1:], strict=False)),
        file,
        key,
        f"epochs must increase from entry to entry, got {epochs}",
    )
    check_key(
        epochs[-1] < total,
        file,
        key,
        f"epoch {epochs[-1]} is past the run's {total} epochs (train.head_epochs + train.epochs)",
    )
    check_key(all(v >= least for _, v in rows), file, key, f"values must be at least {least}")


def _validate_recipe(cfg: ExperimentConfig, file: str) -> None:
    """The high-resolution recipe's keys: schedules, EMA, mixing, SGD momentum."""
    d, a, t = cfg.data, cfg.aug, cfg.train
    total = t.head_epochs + t.epochs
    _check_schedule(d.img_size_schedule, total, file, "data.img_size_schedule", 16)
    _check_schedule(d.batch_size_schedule, total, file, "data.batch_size_schedule", 1)
    if d.img_size_schedule:
        last = d.img_size_schedule[-1][1]
        check_key(
            last == d.img_size,
            file,
            "data.img_size_schedule",
            f"ends at size {last} but data.img_size is {d.img_size}; set data.img_size: {last} "
            "(the size the model is evaluated and exported at)",
        )
    check_key(0 <= t.ema < 1, file, "train.ema", f"is a decay in [0, 1) (0 = off), got {t.ema}")
    check_key(0 <= t.momentum < 1, file, "train.momentum", "must be in [0, 1)")
    check_key(
        not t.nesterov or (t.optimizer == "sgd" and t.momentum > 0),
        file,
        "train.nesterov",
        "needs train.optimizer: sgd with train.momentum > 0",
    )
    for key in ("mixup", "cutmix"):
        check_key(getattr(a, key) >= 0, file, f"aug.{key}", "is an alpha ≥ 0 (0 = off)")
    mixing = a.mixup > 0 or a.cutmix > 0
    check_key(
        not mixing or a.enabled,
        file,
        "aug.mixup" if a.mixup > 0 else "aug.cutmix",
        "mixes augmented batches, but aug.enabled is false; set aug.enabled: true or the alpha to 0",
    )
    check_key(0 <= a.mix_prob <= 1, file, "aug.mix_prob", "must be a probability in [0, 1]")
    check_key(
        0 <= a.mix_off_epochs <= total,
        file,
        "aug.mix_off_epochs",
        f"must be in [0, {total}] (the run's epochs)",
    )
    bs = [d.batch_size, *(b for _, b in d.batch_size_schedule)]
    check_key(
        not mixing or all(b % 2 == 0 for b in bs),
        file,
        "data.batch_size",
        f"must be even with mixup/CutMix (timm's Mixup pairs each batch with its reverse), got {bs}",
    )


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
