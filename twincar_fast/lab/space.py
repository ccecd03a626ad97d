"""A sweep's search space from the command line: `--grid KEY=V1,V2`, `--space KEY=LOW:HIGH[:log]`.

Every key and value is checked against the experiment config before a trial starts (unknown keys
with the closest valid one, values of the wrong type, empty or reversed ranges). A dimension keeps
its values as override strings (`train.lr=1e-3`), so a trial's config is built exactly as
`twincar run CONFIG key=value` builds it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from twincar_fast.config import ExperimentConfig, load_config
from twincar_fast.errors import ConfigError

__all__ = [
    "Dim",
    "SearchSpec",
    "check_space",
    "grid_points",
    "parse_dims",
    "random_points",
    "split_overrides",
    "split_values",
    "suggest",
]

Mode = Literal["grid", "random", "optuna"]
TRIAL_KEYS = ("name", "reports_dir", "models_dir")  # what `sweep._trial_config` sets per trial


@dataclass(frozen=True)
class Dim:
    """One searched key: a list of choices (override strings) or a numeric range."""

    key: str
    choices: tuple[str, ...] = ()  # grid values / categorical choices, as typed
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    integer: bool = False  # the key is an int: the range is sampled in whole numbers

    @property
    def is_range(self) -> bool:
        """Whether this is a LOW:HIGH range (else a list of choices)."""
        return self.low is not None


@dataclass
class SearchSpec:
    """What a sweep searches: its mode, dimensions, trial budget and seeds per point."""

    mode: Mode
    dims: list[Dim]
    n: int | None = None  # points for random/optuna (a grid has its own count)
    seeds: int = 1  # runs of each point, train.seed + 0, 1, ...
    fixed: list[str] = field(default_factory=list)  # key=value overrides of every trial

    def to_dict(self) -> dict:
        """JSON-ready form (stored with the study so a re-run can check it is the same sweep)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples → lists, as stored

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpec:
        """The inverse of `to_dict`."""
        dims = [Dim(**{**x, "choices": tuple(x["choices"])}) for x in d["dims"]]
        return cls(d["mode"], dims, d["n"], d["seeds"], list(d["fixed"]))


def split_values(text: str) -> list[str]:
    """Split `V1,V2,...` on the commas outside brackets (`[1e-4,1e-3],1e-3` is two values)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def split_overrides(items: list[str], ranges: bool) -> tuple[list[str], list[str]]:
    """(searched items, fixed overrides): a `KEY=VALUE` with one value (no commas, no range)
    among `--grid`/`--space`'s items is an override, as `key=value` is anywhere on the line; they
    stay a one-point search only when no item has two values."""

    def single(item: str) -> bool:
        raw = item.partition("=")[2]
        is_range = ranges and ":" in raw and not raw.lstrip().startswith("[")
        return bool(raw.strip()) and not is_range and len(split_values(raw)) == 1

    searched = [i for i in items if not single(i)]
    if not searched:
        return list(items), []
    return searched, [i for i in items if single(i)]


def _parse_range(flag: str, key: str, raw: str) -> Dim:
    """KEY=LOW:HIGH[:log] → a range Dim (bounds checked, types later)."""
    parts = raw.split(":")
    log = len(parts) == 3 and parts[2] == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise ConfigError(f"{flag} {key}={raw}: a range is LOW:HIGH or LOW:HIGH:log")
    try:  # whole numbers stay ints, so an int key's bounds type-check as ints
        low, high = (int(x) if x.strip().lstrip("-").isdigit() else float(x) for x in parts[:2])
    except ValueError:
        raise ConfigError(f"{flag} {key}={raw}: LOW and HIGH must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"{flag} {key}={raw}: an empty range; LOW must be below HIGH")
    if log and low <= 0:
        raise ConfigError(f"{flag} {key}={raw}: a log range needs LOW > 0")
    return Dim(key, low=low, high=high, log=log)


def parse_dims(flag: str, items: list[str], ranges: bool) -> list[Dim]:
    """`KEY=V1,V2` (choices) or, when `ranges`, `KEY=LOW:HIGH[:log]` items → dimensions."""
    dims: list[Dim] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            example = "train.lr=1e-4:1e-2:log" if ranges else "train.lr=1e-3,3e-3"
            raise ConfigError(f"{flag} {item!r}: an empty space; give KEY=values, e.g. {example}")
        if any(d.key == key for d in dims):
            raise ConfigError(f"{flag}: {key} is given twice; list all its values once")
        if ranges and ":" in raw and not raw.lstrip().startswith("["):
            dims.append(_parse_range(flag, key, raw))
            continue
        values = split_values(raw)
        if any(not v for v in values):
            raise ConfigError(f"{flag} {item!r}: an empty value between commas")
        dims.append(Dim(key, choices=tuple(dict.fromkeys(values))))
    return dims


def _field_type(key: str) -> Any:
    """The type hint of a dotted config key (the key is known to exist)."""
    cls: Any = ExperimentConfig
    for part in key.split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def _numeric(tp: Any) -> tuple[bool, bool]:
    """(is numeric, is an int) for a config type hint."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return (float in args or int in args) and bool not in args, float not in args and int in args


def _check_dim(config: os.PathLike, fixed: list[str], dim: Dim, flag: str) -> Dim:
    """The dimension with each value parsed as the key's type; ConfigError naming the flag."""
    if dim.key in ("train.seed",):
        raise ConfigError(f"{flag} {dim.key}: seeds are swept with --seeds K, not as a key")
    if dim.key in TRIAL_KEYS:  # each trial sets these itself: every point would be the same run
        raise ConfigError(
            f"{flag} {dim.key}: each trial sets its own {', '.join(TRIAL_KEYS)} "
            "(reports/<sweep>/trial-NNN), so the points would be identical runs; sweep other "
            "keys, and name the sweep with --name"
        )
    values = [dim.low, dim.high] if dim.is_range else list(dim.choices)
    for v in values:
        raw = repr(v) if isinstance(v, float) else str(v)
        try:
            load_config(config, [*fixed, f"{dim.key}={raw}"], check=False)
        except ConfigError as e:
            reason = str(e).split(": ", 1)[-1]
            raise ConfigError(f"{flag} {dim.key}={raw}: {reason}") from None
    if not dim.is_range:
        return dim
    numeric, integer = _numeric(_field_type(dim.key))
    if not numeric:
        raise ConfigError(
            f"{flag} {dim.key}: not a number, so it takes a list of values, not a range"
        )
    return dataclasses.replace(dim, integer=integer)


def check_space(config: os.PathLike, spec: SearchSpec) -> ExperimentConfig:
    """The base config (with the fixed overrides, validated) after checking every dimension."""
    base = load_config(config, spec.fixed)
    flag = {"grid": "--grid", "random": "--space", "optuna": "--space"}[spec.mode]
    if not spec.dims:
        raise ConfigError(f"{flag}: an empty search space; give at least one {flag} KEY=...")
    if spec.mode == "grid" and any(d.is_range for d in spec.dims):
        raise ConfigError("--grid takes lists of values (KEY=V1,V2); ranges go with --space")
    spec.dims = [_check_dim(config, spec.fixed, d, flag) for d in spec.dims]
    return base


def _value(dim: Dim, x: Any) -> str:
    """A sampled value as the override string a trial gets."""
    if not dim.is_range:
        return str(x)
    return str(int(round(x))) if dim.integer else repr(float(x))


def grid_points(dims: list[Dim]) -> list[dict[str, Any]]:
    """Every combination of the dimensions' choices, first dimension slowest."""
    return [
        dict(zip([d.key for d in dims], p, strict=True))
        for p in itertools.product(*(d.choices for d in dims))
    ]


def random_points(dims: list[Dim], n: int, seed: int) -> list[dict[str, Any]]:
    """`n` points drawn uniformly (log-uniformly for `:log`), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(n):
        point = {}
        for d in dims:
            if not d.is_range:
                point[d.key] = d.choices[int(rng.integers(len(d.choices)))]
            elif d.integer:
                point[d.key] = int(rng.integers(int(d.low), int(d.high) + 1))
            elif d.log:
                point[d.key] = float(np.exp(rng.uniform(np.log(d.low), np.log(d.high))))
            else:
                point[d.key] = float(rng.uniform(d.low, d.high))
        points.append(point)
    return points


def suggest(trial: Any, dims: list[Dim]) -> list[str]:
    """The trial's `key=value` overrides, through Optuna's suggest API (fixed params if enqueued)."""
    out = []
    for d in dims:
        if not d.is_range:
            x = trial.suggest_categorical(d.key, list(d.choices))
        elif d.integer:
            x = trial.suggest_int(d.key, int(d.low), int(d.high), log=d.log)
        else:
            x = trial.suggest_float(d.key, d.low, d.high, log=d.log)
        out.append(f"{d.key}={_value(d, x)}")
    return out
