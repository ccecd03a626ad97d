"""The model folder's description: `config.json` in timm's Hub schema plus a `twincar` section.

timm's own keys (`architecture`, `num_classes`, `num_features`, `label_names`, `pretrained_cfg`)
let `timm.create_model("local-dir:<folder>", pretrained=True)` rebuild a `head: timm` model with
no twincar code; the `twincar` section holds what timm's schema lacks (head type and sizes, our
resize method, car-box crops, the data hash, the run's metrics, versions, the ONNX check).
Folders exported before config.json carry the same facts flat in `model.json`; both are read into
one typed `ModelCard`. Only json and the config types here: the ONNX predictor imports this
module without torch or fastai.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from twincar_fast import __version__
from twincar_fast.config import HeadName, build_typed, check_key
from twincar_fast.data.geometry import PAD_MODE
from twincar_fast.errors import TwincarError
from twincar_fast.files import write_json, write_text
from twincar_fast.run_folder import CONFIG_JSON, LEGACY_JSON, README_MD

__all__ = [
    "CONFIG_JSON",
    "LEGACY_JSON",
    "ModelCard",
    "card_path",
    "from_timm_keys",
    "hub_config",
    "model_readme",
    "read_config",
    "read_model_card",
    "record_results",
    "to_timm_keys",
    "training_data_root",
]

FORMAT = "twincar_fast/model-v2"
# informational parts of the twincar section: recorded, never needed to rebuild the model
_INFO = (
    "metrics", "data_hash", "versions", "onnx", "onnx_int8", "source", "training", "sha256"
)  # fmt: skip
# our resize method → timm's crop_mode (`border`: timm's pad-to-square mode)
# pixels are scaled to [0, 1] before normalizing: a mean outside it fits no image; a std above
# 0.5 is already wider than any such data (1: no scaling), and one near 0 turns noise into inf
_STAT_RANGES = {"mean": (0.0, 1.0), "std": (1e-3, 10.0)}
MAX_SIDE = 4096  # img_size / item_size: far above any trained input; bounds memory per image
_CROP_MODES = {"crop": "center", "squish": "squash", "pad": "border", "short": "center"}


@dataclass
class ModelCard:
    """What rebuilds the network and prepares its input, typed (config.json or model.json)."""

    arch: str
    classes: list[str]
    img_size: int
    item_size: int
    mean: list[float]
    std: list[float]
    format: str = "twincar_fast/model-v1"
    twincar_fast: str = ""
    head: HeadName = "mlp"
    head_hidden: int = 512
    head_dropout: float = 0.3
    n_classes: int | None = None
    bbox_crop: bool = False
    bbox_margin: float = 0.0
    # crop/squish/pad: fastai's validation Resize to item_size; short: shorter side to item_size,
    # then the centre img_size square (torchvision's Resize + CenterCrop, TwinCar's preprocessing)
    resize: Literal["crop", "squish", "pad", "short"] = "crop"
    pad_mode: Literal["zeros", "border", "reflection"] = PAD_MODE  # the loaders' fallback
    draft: bool = True
    input: str = ""
    weights_layout: Literal["twincar", "timm"] = "twincar"  # timm: timm's own state dict keys


def _check_card(c: ModelCard, where: str) -> None:
    """Value ranges of a model card (ConfigError naming the file and key)."""
    check_key(len(c.classes) >= 2, where, "classes", "must list at least 2 classes")
    n = c.n_classes
    check_key(n is None or n == len(c.classes), where, "n_classes", "must be len(classes)")
    names = "label_names" if where.endswith(CONFIG_JSON) else "classes"
    twice = sorted({x for x in c.classes if c.classes.count(x) > 1})
    check_key(not twice, where, names, f"must name each class once; repeated: {twice[:3]}")
    size = f"must be in [16, {MAX_SIDE}] (pixels a model can take)"
    check_key(16 <= c.img_size <= MAX_SIDE, where, "img_size", f"{size}, got {c.img_size}")
    check_key(c.item_size >= c.img_size, where, "item_size", "must be ≥ img_size")
    check_key(c.item_size <= MAX_SIDE, where, "item_size", f"{size}, got {c.item_size}")
    for key, (lo, hi) in _STAT_RANGES.items():
        v = getattr(c, key)
        ok = len(v) == 3 and all(math.isfinite(x) and lo <= x <= hi for x in v)
        check_key(ok, where, key, f"must be 3 numbers (R, G, B) in [{lo:g}, {hi:g}], got {v}")
    check_key(c.head_hidden >= 1, where, "head_hidden", "must be at least 1")
    check_key(0 <= c.head_dropout < 1, where, "head_dropout", "must be in [0, 1)")
    ok = math.isfinite(c.bbox_margin) and c.bbox_margin >= 0
    check_key(ok, where, "bbox_margin", f"must be a finite number ≥ 0, got {c.bbox_margin}")
    timm_ok = c.weights_layout == "twincar" or c.head == "timm"
    check_key(timm_ok, where, "weights_layout", "'timm' needs head 'timm'")


def card_path(folder: str | os.PathLike) -> Path:
    """The folder's config.json, else its model.json (older exports); one-line error if neither."""
    folder = Path(folder)
    for name in (CONFIG_JSON, LEGACY_JSON):
        if (folder / name).is_file():
            return folder / name
    raise TwincarError(
        f"{folder}: no {CONFIG_JSON} (or {LEGACY_JSON}) beside the weights; model.safetensors needs "
        "the config.json written with it by `twincar run`: copy both files"
    )


def read_config(path: str | os.PathLike) -> dict:
    """The JSON object in `path` (config.json or model.json); one-line errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TwincarError(f"{path}: not valid JSON ({e}); re-export the model") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise TwincarError(
            f"{path}: nested too deeply to be a model config; re-export the model"
        ) from None
    if not isinstance(data, dict):
        raise TwincarError(f"{path}: must be a JSON object, got {type(data).__name__}")
    return data


def training_data_root(config: dict) -> Path | None:
    """The prepared data set the model was trained on, when it is on this machine."""
    root = config.get("twincar", {}).get("training", {}).get("data", {}).get("root")
    return Path(root) if root and (Path(root) / "annotations.csv").is_file() else None


def _flat(data: dict, where: str) -> dict:
    """config.json's timm keys and twincar section as the flat ModelCard mapping."""
    pre, tc = data.get("pretrained_cfg", {}), data.get("twincar")
    if not isinstance(tc, dict) or not isinstance(pre, dict):
        raise TwincarError(
            f"{where}: no 'twincar' section (a plain timm config?); load it with "
            "timm.create_model('local-dir:...'), or re-export with `twincar export`"
        )
    flat = {k: v for k, v in tc.items() if k not in _INFO}
    flat["arch"] = data.get("architecture")
    flat["classes"] = data.get("label_names", pre.get("label_names"))
    flat["n_classes"] = data.get("num_classes")
    for key in ("mean", "std"):
        flat[key] = pre.get(key)
    return {k: v for k, v in flat.items() if v is not None or k == "classes"}


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """Read and check a config.json or model.json (or the one in a folder); one-line errors."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        path = card_path(path if path.is_dir() else path.parent)
    data = read_config(path)
    if path.name != LEGACY_JSON:
        data = _flat(data, str(path))
    need = ("arch", "classes", "img_size", "item_size", "mean", "std")
    missing = [k for k in need if k not in data]
    if missing:
        raise TwincarError(f"{path}: missing key(s) {', '.join(missing)}; re-export the model")
    card = build_typed(ModelCard, data, str(path))
    _check_card(card, str(path))
    return card


def _crop_pct(card: ModelCard) -> float:
    """timm's crop_pct: the share of the resized image the model sees."""
    return card.img_size / card.item_size if card.resize == "short" else 1.0


def hub_config(card: ModelCard, num_features: int, info: dict[str, Any] | None = None) -> dict:
    """config.json for `card`: timm's Hub schema + the `twincar` section (with `info` in it)."""
    n = len(card.classes)
    pretrained_cfg = {
        "architecture": card.arch,
        "input_size": [3, card.img_size, card.img_size],
        "interpolation": "bilinear",
        "crop_pct": round(_crop_pct(card), 6),
        "crop_mode": _CROP_MODES[card.resize],
        "mean": list(card.mean),
        "std": list(card.std),
        "num_classes": n,
        "label_names": list(card.classes),
    }
    skip = ("arch", "classes", "mean", "std", "n_classes")
    twincar = {f.name: getattr(card, f.name) for f in fields(card) if f.name not in skip}
    twincar["format"] = FORMAT
    twincar["twincar_fast"] = card.twincar_fast or __version__  # imports set none: this one writes
    return {
        "architecture": card.arch,
        "num_classes": n,
        "num_features": int(num_features),
        "label_names": list(card.classes),
        "pretrained_cfg": pretrained_cfg,
        "twincar": {**twincar, **(info or {})},
    }


def to_timm_keys(state: dict, classifier: str) -> dict:
    """Our `Sequential(TimmBody, classifier)` keys (`0.model.*`, `1.*`) as timm's own names."""
    out = {}
    for key, value in state.items():
        if key.startswith("0.model."):
            out[key[len("0.model.") :]] = value
        elif key.startswith("1."):
            out[f"{classifier}.{key[2:]}"] = value
        else:
            raise TwincarError(f"state dict key {key!r} is not in the timm-head layout")
    return out


def from_timm_keys(state: dict, classifier: str) -> dict:
    """timm's key names back to our `Sequential(TimmBody, classifier)` layout."""
    head = f"{classifier}."
    return {
        (f"1.{k[len(head) :]}" if k.startswith(head) else f"0.model.{k}"): v
        for k, v in state.items()
    }


def _number(value: Any) -> bool:
    """Whether `value` is a finite number (not a bool, not NaN: nothing to print for those)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value)


def _metrics_table(metrics: dict) -> str:
    """The run's `valid_*`/`test_*` metrics as a Markdown table, a column per split."""
    splits = [p for p in ("valid", "test") if any(k.startswith(f"{p}_") for k in metrics)]
    names: list[str] = []
    for key, value in metrics.items():
        split, _, name = key.partition("_")
        if split in splits and _number(value) and name != "images" and name not in names:
            names.append(name)
    if not names:
        return "(none recorded)"
    head = [f"valid (epoch {metrics['epoch']})" if s == "valid" else s for s in splits]
    if _number(metrics.get("test_images")):
        head[-1] = f"test ({metrics['test_images']} images)"
    rows = [
        f"| {n} | "
        + " | ".join(
            f"{metrics[f'{s}_{n}']:.4f}" if _number(metrics.get(f"{s}_{n}")) else "–"
            for s in splits
        )
        + " |"
        for n in names
    ]
    return "\n".join([f"| metric | {' | '.join(head)} |", "|---" * (len(splits) + 1) + "|", *rows])


def _kept_line(metrics: dict) -> str:
    """Which epoch's weights these are and why (recorded once the run finished)."""
    if "epoch" not in metrics:
        return ""
    why = metrics.get("kept_because")
    return f"The weights of epoch {metrics['epoch']}" + (f": {why}." if why else ".") + "\n\n"


def _loading(tc: dict) -> tuple[str, str]:
    """(front-matter library line, how to load it): timm's only for timm's own head and keys."""
    if tc.get("weights_layout") == "timm":
        note = (
            '`timm.create_model("local-dir:<this folder>", pretrained=True)` loads it with timm '
            "alone (timm's own classifier head)."
        )
        return "library_name: timm\n", note
    note = (
        f"This {tc.get('head', 'mlp')} head needs twincar_fast to load "
        "(`twincar_fast.Predictor.from_path(folder)`); timm alone cannot."
    )
    return "", note


def model_readme(config: dict, card: ModelCard) -> str:
    """README.md, the folder's model card: use, metrics, training config and the classes."""
    tc = config["twincar"]
    classes = "\n".join(f"{i}. {c}" for i, c in enumerate(config["label_names"]))
    training = json.dumps(tc.get("training", {}), indent=2)
    library, loading = _loading(tc)
    metrics = tc.get("metrics", {})
    return f"""---
{library}tags: [image-classification, fine-grained, stanford-cars, twincar_fast]
---
# {config["architecture"]} for car make/model recognition ({config["num_classes"]} classes)

A fine-grained car classifier exported by twincar_fast {tc.get("twincar_fast") or __version__}.
{loading} `learner.pkl`, if present, is a pickle: load it only when you trust its source.

## Intended use
Recognising the make, model and year of a car in a photo among the classes listed below. It knows
no other classes and is not meant for decisions about people, insurance or law enforcement.

## Input
{card.img_size}×{card.img_size} RGB, resize method `{card.resize}` (item size {card.item_size}),
mean {card.mean}, std {card.std}; car-box crops: {card.bbox_crop} (margin {card.bbox_margin}).

## Metrics
{_kept_line(metrics)}{_metrics_table(metrics)}

## Training config
```json
{training}
```

## Classes
{classes}
"""


def record_results(model_dir: str | os.PathLike, results: dict[str, Any]) -> Path:
    """Add a finished run's results (kept epoch and why, test metrics) to the folder's config.json
    metrics and rewrite its README.md; non-finite values are left out."""
    path = Path(model_dir) / CONFIG_JSON
    config = read_config(path)
    card = read_model_card(path)
    new = {k: v for k, v in results.items() if isinstance(v, str) or _number(v)}
    config["twincar"]["metrics"] = {**config["twincar"].get("metrics", {}), **new}
    write_json(path, config)
    write_text(Path(model_dir) / README_MD, model_readme(config, card))
    return path
