"""The run folder, the product: one type with a property per file; create, lock, find, resume state.

`reports/<run>/` is what a person reads, `models/<run>/` what ships; a sweep has one folder. Every
file name in them is written here only. Standard library and base modules only, so that `twincar
train --resume` refuses a finished or busy run in a second, before torch and fastai load."""

from __future__ import annotations

import csv
import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from twincar_fast.config import (
    ExperimentConfig,
    config_to_dict,
    flat_dict,
    load_config,
)
from twincar_fast.errors import ConfigError, TwincarError
from twincar_fast.files import check_folder, file_lock, new_run_name, write_text

__all__ = [
    "RUN_FILE_NAMES", "RUN_NOTE_ENV", "SHARED_NAMES", "SPLITS", "ResumeState", "RunFolder",
    "create_run_folder", "lock_run", "open_resume", "read_json",
    "resolve_run",
]  # fmt: skip

# reports/<run>/: the config (lr-find's folder has one too), versions and git commit, the classes
CONFIG_YAML, ENV_JSON, CLASSES_CSV = "config.yaml", "env.json", "classes.csv"
METRICS_CSV = "metrics.csv"  # one row per epoch (`train.callbacks.METRICS_COLUMNS`)
VALID_PREDS_NPZ = "valid_preds.npz"  # the kept model's validation probabilities
SUMMARY_JSON = "summary.json"  # written when training ends: from then on the run is trained
INDEX_HTML, FIGURES_DIR = "index.html", "figures"  # the report and its figures
TWINS_CSV, TWINS_JSON = "twins.csv", "twins.json"  # (twins.csv is copied beside the model too)
TWIN_PNG = "twins_{:02d}.png"  # figures/twins/: one figure a pair, by rank (`.format(rank)`)
LOCK = ".lock"  # held while a process trains in the run
ACCURACY_PNG, LOSS_PNG, TOPK_PNG = "accuracy.png", "loss.png", "topk.png"  # in figures/
PRECISION_RECALL_PNG, GRADCAM_IMAGES_PNG = "precision_recall.png", "gradcam_images.png"
LR_FIND_PNG, LR_FIND_JSON = "lr_find.png", "lr_find.json"  # reports/<name>-lrfind-<stamp>/
# per split (`.format(split)`): the metrics (written last: the "done" mark), per class, per image
EVAL_JSON, PER_CLASS_CSV, PREDICTIONS_CSV = "eval_{}.json", "per_class_{}.csv", "predictions_{}.csv"
MOST_CONFUSED_CSV, GRADCAM_PARTS_CSV = "most_confused_{}.csv", "gradcam_parts_{}.csv"  # interpret
SPLIT_PNG = "{}_{}.png"  # figures/<figure>_<split>.png, e.g. confusion_test.png (`.format`)
# models/<run>/: the fastai learner (a pickle); the weights-only export with timm's config.json
LEARNER_PKL, SAFETENSORS, CONFIG_JSON = "learner.pkl", "model.safetensors", "config.json"
LEGACY_JSON, README_MD = "model.json", "README.md"  # (folders exported before config.json), card
ONNX, INT8_ONNX = "model.onnx", "model.int8.onnx"
CKPT_DIR = "checkpoints"  # fastai checkpoints with optimizer state, named by epoch (`.format`)
BEST_CKPT, LAST_CKPT, CKPT_GLOB = "best-epoch{:03d}.pth", "last-epoch{:03d}.pth", "*-epoch*.pth"
# a sweep's folder (compare.* also beside compared runs)
SWEEP_JSON, STUDY_DB, STUDY_LOCK = "sweep.json", "study.db", ".study.lock"
COMPARE_CSV, COMPARE_HTML = "compare.csv", "compare.html"

SPLITS = ("test", "valid")  # the evaluated splits: the official test split, the run's held-out one
_PER_SPLIT = (EVAL_JSON, PER_CLASS_CSV, PREDICTIONS_CSV, MOST_CONFUSED_CSV, GRADCAM_PARTS_CSV)
# names that data sets and caches use for files of their own (data/ keeps its own spelling)
SHARED_NAMES = frozenset({CLASSES_CSV, README_MD, LOCK})
RUN_FILE_NAMES = frozenset({
    CONFIG_YAML, ENV_JSON, CLASSES_CSV, METRICS_CSV, VALID_PREDS_NPZ, SUMMARY_JSON, INDEX_HTML,
    TWINS_CSV, TWINS_JSON, LOCK, ACCURACY_PNG, LOSS_PNG, TOPK_PNG, PRECISION_RECALL_PNG,
    GRADCAM_IMAGES_PNG, LR_FIND_PNG, LR_FIND_JSON, LEARNER_PKL, SAFETENSORS, CONFIG_JSON,
    LEGACY_JSON, README_MD, ONNX, INT8_ONNX, SWEEP_JSON, STUDY_DB, STUDY_LOCK, COMPARE_CSV,
    COMPARE_HTML, *(t.format(s) for t in _PER_SPLIT for s in SPLITS),
})  # fmt: skip

RUN_NOTE_ENV = "TWINCAR_RUN_NOTE"  # set by `twincar train --processes`: a file to name the run in
_RESUME_MAY_CHANGE = {"train.device", "data.num_workers"}  # where a run trains, not what it learns
_TRIES = 100  # claims of a new run name before giving up (a race lost 100 times is a bug)


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _in(folder: Path | None, name: str) -> Path:
    """`folder / name`; a one-line error when the run has no such folder (a lone model or report)."""
    if folder is None:
        raise TwincarError(f"{name}: this run has no folder for it (a lone model or report)")
    return folder / name


def _file(folder: str, name: str) -> property:
    """A RunFolder property: `name` in its `folder` ("report_dir" or "model_dir")."""
    return property(lambda self: _in(getattr(self, folder), name), doc=f"{folder}/{name}")


@dataclass(frozen=True)
class RunFolder:
    """A run's two folders, reports/<run>/ and models/<run>/ (either may be None when found from a
    lone model or report), and the model file a user named, if any."""

    name: str  # the run name (folder name), or the model file's folder name outside a run
    report_dir: Path | None
    model_dir: Path | None
    model_file: Path | None = None  # the learner.pkl / model.safetensors given by path

    @classmethod
    def of(cls, cfg: ExperimentConfig, name: str) -> RunFolder:
        """The folders of run `name` under the config's reports_dir and models_dir."""
        return cls(name, Path(cfg.reports_dir) / name, Path(cfg.models_dir) / name)

    config_yaml = _file("report_dir", CONFIG_YAML)
    env_json = _file("report_dir", ENV_JSON)
    classes_csv = _file("report_dir", CLASSES_CSV)
    metrics_csv = _file("report_dir", METRICS_CSV)
    valid_preds_npz = _file("report_dir", VALID_PREDS_NPZ)
    summary_json = _file("report_dir", SUMMARY_JSON)
    index_html = _file("report_dir", INDEX_HTML)
    figures_dir = _file("report_dir", FIGURES_DIR)
    twins_csv = _file("report_dir", TWINS_CSV)
    twins_json = _file("report_dir", TWINS_JSON)
    lock_file = _file("report_dir", LOCK)
    learner_pkl = _file("model_dir", LEARNER_PKL)
    safetensors = _file("model_dir", SAFETENSORS)
    config_json = _file("model_dir", CONFIG_JSON)
    readme_md = _file("model_dir", README_MD)
    onnx = _file("model_dir", ONNX)
    int8_onnx = _file("model_dir", INT8_ONNX)
    ckpt_dir = _file("model_dir", CKPT_DIR)

    def eval_json(self, split: str) -> Path:
        """reports/<run>/eval_<split>.json."""
        return _in(self.report_dir, EVAL_JSON.format(split))

    def predictions_csv(self, split: str) -> Path:
        """reports/<run>/predictions_<split>.csv."""
        return _in(self.report_dir, PREDICTIONS_CSV.format(split))

    def best_checkpoint(self, epoch: int) -> Path:
        """The checkpoint of a kept (best) epoch."""
        return self.ckpt_dir / BEST_CKPT.format(epoch)

    def last_checkpoint(self, epoch: int) -> Path:
        """The checkpoint saved at the end of `epoch`, with the optimizer (for resume)."""
        return self.ckpt_dir / LAST_CKPT.format(epoch)

    @property
    def learner(self) -> Path | None:
        """The exported learner to load: the file given, else models/<run>/learner.pkl if there."""
        if self.model_file is not None or self.model_dir is None:
            return self.model_file
        pkl = self.model_dir / LEARNER_PKL
        return pkl if pkl.is_file() else None

    @property
    def finished(self) -> bool:
        """Whether training ended (summary.json written); evaluation or the report may be missing."""
        return self.summary_json.is_file()

    def missing(self, cfg: ExperimentConfig) -> list[str]:
        """The end-of-run steps a trained run still lacks: 'test evaluation', 'report'."""
        test = cfg.eval.test and not self.eval_json("test").is_file()
        report = cfg.eval.interpret and not self.index_html.is_file()
        return ["test evaluation"] * bool(test) + ["report"] * bool(report)

    def missing_files(self, cfg: ExperimentConfig) -> list[Path]:
        """The files a finished run of `cfg` should hold and doesn't."""
        want = [self.config_yaml, self.env_json, self.metrics_csv, self.summary_json]
        want += [self.config_json, self.safetensors, self.learner_pkl]
        want += [self.eval_json("test")] * cfg.eval.test + [self.index_html] * cfg.eval.interpret
        return [p for p in want if not p.is_file()]

    def resume_state(self) -> ResumeState:
        """Where the run stands, from its files: metrics.csv's rows up to the newest last-epoch
        checkpoint that matches them, that checkpoint, and summary.json (trained: all rows)."""
        rows, summary = _read_metrics(self.metrics_csv), read_json(self.summary_json)
        if summary:  # trained: its epochs are done and only the kept checkpoint is left
            return ResumeState(len(rows), rows, None, summary)
        ckpts = sorted(self.ckpt_dir.glob(LAST_CKPT.replace("{:03d}", "*")))
        done = 0
        for path in ckpts:
            k = int(path.stem.rpartition("epoch")[2])
            if k < len(rows) and [r["epoch"] for r in rows[: k + 1]] == list(range(k + 1)):
                done = max(done, k + 1)
        if done == 0 and (rows or ckpts):  # never restart a run whose epochs can't be matched up
            raise TwincarError(
                f"{self.report_dir}: {len(rows)} epoch(s) in {METRICS_CSV} but no matching "
                f"last-epoch checkpoint in {self.ckpt_dir}; resuming would restart it: start a new run"
            )
        checkpoint = self.last_checkpoint(done - 1) if done else None
        return ResumeState(done, rows[:done], checkpoint, summary)


def create_run_folder(cfg: ExperimentConfig, now: datetime | None = None) -> RunFolder:
    """Claim new `reports/<run>/` and `models/<run>/` folders (`<run>` = name-timestamp[-n])."""
    reports, models = Path(cfg.reports_dir), Path(cfg.models_dir)
    for key, folder in (("reports_dir", reports), ("models_dir", models)):
        check_folder(folder, key)
    for _ in range(_TRIES):
        name = new_run_name(cfg.name or "run", [reports, models], now)
        try:  # mkdir is the lock: two runs started in the same second get different folders
            (reports / name).mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as e:
            raise TwincarError(
                f"{reports}: can't create a run folder here ({e.strerror})"
            ) from None
        try:
            (models / name).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            (reports / name).rmdir()  # nothing half-way: no orphan report folder
            raise TwincarError(f"{models}: can't create a run folder here ({e.strerror})") from None
        if os.environ.get(RUN_NOTE_ENV):  # tell the launcher where its run lives (a resume hint)
            write_text(os.environ[RUN_NOTE_ENV], str(reports / name))
        return RunFolder.of(cfg, name)
    raise TwincarError(f"{reports}: no free run name after {_TRIES} tries; check the folder")


def lock_run(folder: RunFolder) -> AbstractContextManager[None]:
    """An exclusive lock on a run folder while a process trains in it (refused when held)."""
    return file_lock(
        folder.lock_file,
        busy=lambda holder: (
            f"{folder.report_dir}: this run is in use by process {holder}; "
            "wait for it to end (or stop it) before resuming"
        ),
    )


def _twin(folder: Path, marker: str, preferred: str) -> Path | None:
    """The folder of the same run name beside `folder`'s parent that holds `marker`, if any."""
    root = folder.parent.parent
    candidates = [root / preferred / folder.name]
    if root.is_dir():
        candidates += sorted(d / folder.name for d in root.iterdir() if d.is_dir())
    return next((c for c in candidates if (c / marker).is_file()), None)


def _has_model(folder: Path) -> bool:
    """Whether `folder` holds an exported model (learner.pkl or model.safetensors)."""
    return (folder / LEARNER_PKL).is_file() or (folder / SAFETENSORS).is_file()


def _from_summary(report_dir: Path) -> Path | None:
    """The model folder recorded in the run's summary.json, if it still exists."""
    paths = read_json(report_dir / SUMMARY_JSON).get("paths", {})
    paths = paths if isinstance(paths, dict) else {}
    for key in ("model_dir", "models", "learner"):
        p = Path(str(paths.get(key, "")))
        p = p.parent if p.suffix == ".pkl" else p
        if str(p) not in ("", ".") and _has_model(p):
            return p
    return None


def resolve_run(model: str | os.PathLike) -> RunFolder:
    """Find the model and both run folders from learner.pkl, models/<run> or reports/<run>."""
    path = Path(model)
    if path.is_file():
        return RunFolder(
            path.parent.name, _twin(path.parent, CONFIG_YAML, "reports"), path.parent, path
        )
    if not path.is_dir():
        raise TwincarError(
            f"{path}: no such model file or run folder (give learner.pkl, models/<run> or reports/<run>)"
        )
    if _has_model(path):
        return RunFolder(path.name, _twin(path, CONFIG_YAML, "reports"), path)
    if (path / CONFIG_YAML).is_file():
        model_dir = (
            _from_summary(path)
            or _twin(path, LEARNER_PKL, "models")
            or _twin(path, SAFETENSORS, "models")
        )
        return RunFolder(path.name, path, model_dir)
    raise TwincarError(
        f"{path}: not a run folder (no {LEARNER_PKL} or {CONFIG_YAML}); "
        "give models/<run>, reports/<run> or a learner.pkl"
    )


def _check_same_config(saved: ExperimentConfig, cfg: ExperimentConfig, run_dir: Path) -> None:
    """ConfigError unless `cfg` is the run's saved config (device and workers may differ)."""
    a, b = flat_dict(config_to_dict(saved)), flat_dict(config_to_dict(cfg))
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    diff = [k for k in diff if k not in _RESUME_MAY_CHANGE]
    if diff:
        k, saved_yaml = diff[0], run_dir / CONFIG_YAML
        raise ConfigError(
            f"{saved_yaml}: --resume needs the run's own config, but {k} is "
            f"{a.get(k)!r} there and {b.get(k)!r} here; resume with "
            f"`twincar train {saved_yaml} --resume {run_dir}`"
        )


def open_resume(run_dir: str | os.PathLike, cfg: ExperimentConfig) -> RunFolder:
    """The folders of an interrupted run to continue (or finish); one-line TwincarError if it can't."""
    run_dir = Path(run_dir).expanduser()
    if (run_dir / CKPT_DIR).is_dir() and not (run_dir / CONFIG_YAML).exists():
        run_dir = Path(cfg.reports_dir) / run_dir.name  # models/<run> given: use its reports twin
    if not run_dir.is_dir():
        raise TwincarError(
            f"{run_dir}: no such run folder; give the reports/<run> folder to resume"
        )
    if not (run_dir / CONFIG_YAML).is_file():
        raise TwincarError(f"{run_dir}: not a run folder (no {CONFIG_YAML}); give reports/<run>")
    _check_same_config(load_config(run_dir / CONFIG_YAML), cfg, run_dir)
    folder = RunFolder(run_dir.name, run_dir, Path(cfg.models_dir) / run_dir.name)
    if folder.finished and not folder.missing(cfg):
        raise TwincarError(
            f"{run_dir}: run already finished ({SUMMARY_JSON}, evaluation and report are there); "
            "start a new run instead"
        )
    if not folder.model_dir.is_dir():
        raise TwincarError(
            f"{folder.model_dir}: the run's model folder is missing (models_dir "
            f"{cfg.models_dir!r}); it can't be resumed without its checkpoints"
        )
    return folder


@dataclass(frozen=True)
class ResumeState:
    """Where an interrupted run stands: epochs done, their metrics.csv rows, the checkpoint to
    continue from (None: start at epoch 0) and summary.json once training ended."""

    done: int
    rows: list[dict]
    checkpoint: Path | None
    summary: dict

    @property
    def kept_checkpoint(self) -> Path | None:
        """The kept epoch's checkpoint that summary.json names (a trained run), else None."""
        path = self.summary.get("paths", {}).get("best_checkpoint")
        return Path(path) if path else None


def _read_metrics(path: Path) -> list[dict]:
    """metrics.csv's rows, cells as pandas reads them: int when integral, else float ('' is NaN);
    [] when missing or 0 bytes; a one-line error when it can't be read."""
    if not path.is_file() or not path.stat().st_size:
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, strict=True))
        if any(None in row or None in row.values() for row in rows):
            raise ValueError("a row has more or fewer cells than the header")
        number = lambda v: int(v) if v.lstrip("-").isdigit() else float(v or "nan")  # noqa: E731
        return [{k: number(v) for k, v in row.items()} for row in rows]
    except (csv.Error, UnicodeDecodeError, ValueError) as e:
        reason = " ".join(str(e).split())[:120]
        raise TwincarError(f"{path}: can't read it to resume ({reason}); start a new run") from None
