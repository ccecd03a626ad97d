"""The rules of an experiment config, in one place: the keys' types (checked as the YAML is read),
their value ranges and the rules between keys (checked once by `load_config`, before torch or
fastai load), and the fitting of epoch-dependent keys to a run shortened on the command line.

Rules that need more than the config stay where that is known: the model (train.freeze, a
train.lr per group), files and the network (model.weights, model.pretrained, model.arch in timm),
the machine (train.device, SyncBatchNorm, data.cache_device, installed trackers), the launch (a
size schedule with several processes) and the data (data.batch_size against the images).
config.py holds the typed dataclasses and imports this module, so a config is typed `Any` here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal, Union

from twincar_fast.errors import ConfigError

__all__ = [
    "METRICS_COLUMNS",
    "METRIC_NAMES",
    "MONITORS",
    "VALID_COLUMNS",
    "VALUE_RULES",
    "build_typed",
    "check_key",
    "check_name",
    "fit_to_epochs",
    "validate",
]

# The metrics.csv columns (the run folder's contract) that train.monitor and
# train.console_columns name. Metric names without the `valid_`/`test_` prefix, in column order:
METRIC_NAMES = [
    "acc", "precision_macro", "precision_weighted", "recall_macro", "recall_weighted", "f1_macro",
    "f1_weighted", "hamming", "cohen_kappa", "mcc", "jaccard_macro", "top3", "top5",
]  # fmt: skip
VALID_COLUMNS = [f"valid_{m}" for m in METRIC_NAMES]
# metrics.csv, in this order
# valid_acc_raw: the raw weights' accuracy when the valid_* columns are the EMA's (train.ema);
# img_size: the training images' side that epoch (data.img_size_schedule)
METRICS_COLUMNS = [
    "epoch", "train_loss", "train_acc", "valid_loss", *VALID_COLUMNS, "valid_acc_raw", "img_size",
    "lr", "time_s",
]  # fmt: skip
MONITORS = ["valid_loss", *VALID_COLUMNS]  # what train.monitor may name
_SHOWN = [c for c in METRICS_COLUMNS if c not in ("epoch", "lr", "time_s")]  # console_columns


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


# ---------------------------------------------------------------- value rules

Rule = tuple[Callable[[Any], bool], str]  # (test the value passes, what it must be)


def _in(interval: str, note: str = "") -> Rule:
    """The rule of an interval written as in maths: `[0, 1)`, `(0, 1]`, `[16, inf)`."""
    match = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval)
    assert match, interval
    opens, low, high, closes = match[1], float(match[2]), float(match[3]), match[4]

    def ok(v: float) -> bool:
        above = v >= low if opens == "[" else v > low
        return above and (v <= high if closes == "]" else v < high)

    bound = f"at least {low:g}" if opens == "[" else f"> {low:g}"
    bound = f"in {interval}" if math.isfinite(high) else bound
    return ok, f"must be {bound}{' ' + note if note else ''}"


def _finite_lrs(lr: float | list[float]) -> bool:
    """One LR or a non-empty list of them, each finite and positive."""
    lrs = lr if isinstance(lr, list) else [lr]
    return bool(lrs) and all(math.isfinite(v) and v > 0 for v in lrs)


_OFF = "(0 = off)"
# One rule per key, on its value alone (null passes: the type says where null is allowed); the
# message is "<file>: key '<key>' <what it must be>, got <value>".
VALUE_RULES: dict[str, Rule] = {
    "data.valid_pct": _in("[0, 1)"),
    "data.img_size": _in("[16, inf)"),
    "data.batch_size": _in("[1, inf)"),
    "data.num_workers": _in("[0, inf)", "or null"),
    "data.bbox_margin": _in("[0, inf)"),
    "data.cache_size": _in("[16, inf)", "or null"),
    "data.cache_max_gb": _in("(0, inf)"),
    "data.cache_gpu_share": _in("(0, 1]"),
    "data.demo_classes": _in("[2, inf)"),
    "data.demo_per_class": _in("[2, inf)"),
    "data.demo_size": (lambda v: len(v) == 2 and min(v) >= 64, "must be [W, H], each ≥ 64"),
    "aug.min_scale": _in("(0, 1]"),
    "aug.max_zoom": _in("[1, inf)", "(1 = off)"),
    "aug.max_rotate": _in("[0, inf)"),
    "aug.max_warp": _in("[0, inf)"),
    # fastai draws log(1 - value) for the colour strengths: 1 and above have no meaning
    "aug.max_lighting": _in("[0, 1)"),
    "aug.saturation": _in("[0, 1)"),
    "aug.hue": _in("[0, 1)"),
    "aug.blur_p": _in("[0, 1]", "(a probability)"),
    "aug.blur_sigma": _in("[0, inf)"),
    "aug.p_affine": _in("[0, 1]", "(a probability)"),
    "aug.p_lighting": _in("[0, 1]", "(a probability)"),
    "aug.mixup": _in("[0, inf)", "(an alpha; 0 = off)"),
    "aug.cutmix": _in("[0, inf)", "(an alpha; 0 = off)"),
    "aug.mix_prob": _in("[0, 1]", "(a probability)"),
    "model.head_hidden": _in("[1, inf)"),
    "model.head_dropout": _in("[0, 1)"),
    "train.epochs": _in("[1, inf)"),
    "train.head_epochs": _in("[0, inf)"),
    "train.lr": (_finite_lrs, "must be finite and positive"),
    "train.momentum": _in("[0, 1)"),
    "train.weight_decay": _in("[0, inf)"),
    "train.label_smoothing": _in("[0, 1)"),
    "train.early_stopping": _in("[0, inf)", _OFF),
    "train.plateau_patience": _in("[0, inf)", _OFF),
    "train.plateau_factor": _in("(1, inf)", "(the LR is divided by it)"),
    "train.grad_accum": _in("[1, inf)"),
    "train.ema": (lambda v: 0 <= v < 1, f"is a decay in [0, 1) {_OFF}"),
    "eval.top_losses": _in("[0, inf)"),
    "eval.gradcam": _in("[0, inf)"),
    "eval.confusion_zoom": _in("[0, inf)"),
    "eval.most_confused": _in("[0, inf)"),
    "eval.twins": _in("[0, inf)", _OFF),
    "log": (lambda v: len(set(v)) == len(v), "names a tracker twice"),
}


# ---------------------------------------------------------------- rules between keys


def _columns(cfg: Any) -> Iterator[tuple[str, bool, str]]:
    """The keys that name metrics.csv columns: (key, ok, what is wrong)."""
    monitor, shown = cfg.train.monitor, cfg.train.console_columns
    wrong = (
        f"is {monitor!r}, not a validation column of metrics.csv; use one of {', '.join(MONITORS)}"
    )
    yield "train.monitor", monitor in MONITORS, wrong
    bad = [c for c in shown if c not in _SHOWN]
    wrong = (
        f"names {', '.join(map(repr, bad))}: not in metrics.csv; use some of {', '.join(_SHOWN)}"
    )
    yield "train.console_columns", not bad, wrong


def _between_keys(cfg: Any) -> Iterator[tuple[str, bool, str]]:
    """(key, ok, what is wrong) for the rules that relate keys, in the order they are checked."""
    d, a, t = cfg.data, cfg.aug, cfg.train
    for key in ("early_stopping", "plateau_patience"):  # nothing to monitor without validation
        ok = d.valid_pct > 0 or not getattr(t, key)
        yield f"train.{key}", ok, "must be 0 with data.valid_pct: 0"
    yield "data.item_size", d.item_size >= d.img_size, f"must be ≥ data.img_size ({d.img_size})"
    ok = not (d.cache_aug == "threads" and d.cache_device == "cuda")
    wrong = (
        "cuda keeps the cache on the GPU for data.cache_aug=batched; set that, or cache_device=auto"
    )
    yield "data.cache_device", ok, wrong
    # the cache holds the item stage's inputs, which fastai's batch stage doesn't read
    ok = not (d.cache == "on" and a.enabled and a.stage == "batch")
    wrong = "is on, which needs aug.stage: item (or aug.enabled: false); or set it to auto"
    yield "data.cache", ok, wrong
    wrong = f"must be in [0, epochs) = [0, {t.epochs}), got {t.warmup_epochs:g}"
    yield "train.warmup_epochs", 0 <= t.warmup_epochs < t.epochs, wrong
    ok = not (t.warmup_epochs and t.schedule == "one_cycle")
    wrong = "is for schedule cosine or flat (one_cycle warms up by itself); set it to 0"
    yield "train.warmup_epochs", ok, wrong
    ok = not (t.lr_step == "epoch" and t.schedule == "one_cycle")
    yield "train.lr_step", ok, "epoch is for schedule cosine or flat (one_cycle moves every batch)"
    nesterov_ok = not t.nesterov or (t.optimizer == "sgd" and t.momentum > 0)
    yield "train.nesterov", nesterov_ok, "needs train.optimizer: sgd with train.momentum > 0"
    yield from _recipe_rules(cfg)


def _recipe_rules(cfg: Any) -> Iterator[tuple[str, bool, str]]:
    """The high-resolution recipe's rules between keys: schedules, mixing."""
    d, a, t = cfg.data, cfg.aug, cfg.train
    total = t.head_epochs + t.epochs
    yield from _schedule_rules(d.img_size_schedule, total, "data.img_size_schedule", 16)
    yield from _schedule_rules(d.batch_size_schedule, total, "data.batch_size_schedule", 1)
    last = d.img_size_schedule[-1][1] if d.img_size_schedule else d.img_size
    yield (
        "data.img_size_schedule",
        last == d.img_size,
        f"ends at size {last} but data.img_size is {d.img_size}; set data.img_size: {last} "
        "(the size the model is evaluated and exported at)",
    )
    mixing = a.mixup > 0 or a.cutmix > 0
    yield (
        "aug.mixup" if a.mixup > 0 else "aug.cutmix",
        not mixing or a.enabled,
        "mixes augmented batches, but aug.enabled is false; set aug.enabled: true or the alpha to 0",
    )
    yield (
        "aug.mix_off_epochs",
        0 <= a.mix_off_epochs <= total,
        f"must be in [0, {total}] (the run's epochs), got {a.mix_off_epochs}",
    )
    bs = [d.batch_size, *(b for _, b in d.batch_size_schedule)]
    yield (
        "data.batch_size",
        not mixing or all(b % 2 == 0 for b in bs),
        f"must be even with mixup/CutMix (timm's Mixup pairs each batch with its reverse), got {bs}",
    )


def _schedule_rules(
    rows: list[list[int]], total: int, key: str, least: int
) -> Iterator[tuple[str, bool, str]]:
    """An epoch → value schedule: [epoch, value] pairs from epoch 0, epochs increasing and < total."""
    yield key, all(len(r) == 2 for r in rows), f"entries must be [epoch, value] pairs: {rows}"
    if not rows:
        return
    epochs = [e for e, _ in rows]
    yield key, epochs[0] == 0, f"must start at epoch 0 (it starts at {epochs[0]})"
    increasing = all(b > a for a, b in zip(epochs, epochs[1:], strict=False))
    yield key, increasing, f"epochs must increase from entry to entry, got {epochs}"
    past = f"epoch {epochs[-1]} is past the run's {total} epochs (train.head_epochs + train.epochs)"
    yield key, epochs[-1] < total, past
    yield key, all(v >= least for _, v in rows), f"values must be at least {least}"


def validate(cfg: Any, file: str = "config") -> None:
    """Check every value and every rule between keys of `cfg` (an ExperimentConfig); raise a
    one-line ConfigError naming the file and key of the first one broken."""
    check_name(cfg.name, f"{file}: key 'name'")
    for key, (ok, must) in VALUE_RULES.items():
        value = functools.reduce(getattr, key.split("."), cfg)
        check_key(value is None or ok(value), file, key, f"{must}, got {value!r}")
    for key, ok, wrong in itertools.chain(_columns(cfg), _between_keys(cfg)):
        check_key(ok, file, key, wrong)


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


def fit_to_epochs(cfg: Any, file_cfg: Any, over: dict) -> list[str]:
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
