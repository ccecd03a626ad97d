"""Twins: the look-alike class pairs a trained run mixes up, and what tells each pair apart.

`find_twins` ranks the class pairs (`twin_pairs`: confusion of every evaluated split, symmetrised
and normalised by class size, times `(1 + centroid cosine) / 2` of the pooled features), then for
each of the top `k` explains the split's images of both classes with Finer-CAM against the twin
and with Grad-CAM++ (`twin_maps`), scores both maps by the masking check and, on the demo set, by
their mass in the differing part's box. It writes to the run's report folder:

- `twins.csv`: one row per pair, best first: `rank, class_a, class_b`, the ids, `score`,
  `confusion` and both rates, `centroid_cosine`, the counts and the images mixed up each way
  (`;`-joined), `drop_finer, drop_gradcam` (masking check), `part_ratio_finer,
  part_ratio_gradcam` and `designed_twin` (demo set only), `figure`.
- `twins.json`: the split, the summary over the pairs (and the designed twins of the demo set),
  or the one sentence that says why there are no pairs (fewer than 2 classes, no confusion).
- `figures/twins/twins_<rank>.png`: the figure of each pair.

`twincar twins RUN` (`twins_run`) redoes this for a saved run; `eval.twins: K` runs it in the report.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.learner import Learner

from twincar_fast.analysis.evaluate import (
    evaluate_learner,
    open_saved_run,
    split_dl,
)
from twincar_fast.analysis.report import write_index
from twincar_fast.analysis.samples import part_boxes
from twincar_fast.analysis.twin_maps import MASK_SHARE, pair_maps, pair_scores, plot_pair
from twincar_fast.analysis.twin_pairs import (
    PAIR_COLUMNS,
    centroid_similarity,
    mixed_images,
    pooled_features,
    split_confusion,
    twin_pairs,
)
from twincar_fast.config import ExperimentConfig
from twincar_fast.console import console, step
from twincar_fast.data import check_vocab
from twincar_fast.data.demo import designed_twins
from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path, write_csv, write_json
from twincar_fast.run_folder import (
    FIGURES_DIR,
    PREDICTIONS_CSV,
    TWIN_PNG,
    TWINS_CSV,
    TWINS_JSON,
    resolve_run,
)

__all__ = ["copy_twins", "find_twins", "no_twins_reason", "twin_of", "twins_run"]

FIG_DIR = Path(FIGURES_DIR) / "twins"
DEFAULT_PAIRS = 5  # `twincar twins` on a run made with eval.twins: 0


def no_twins_reason(classes: list[str], cm: np.ndarray, splits: list[str]) -> str | None:
    """The sentence the report shows instead of a pairs table, or None when pairs exist."""
    if len(classes) < 2:
        return (
            f"Twins: this run has {len(classes)} class, so there is no pair of classes to mix up."
        )
    if not splits:
        return "Twins: no evaluated split (predictions_valid.csv or predictions_test.csv) yet."
    mixed = int(cm.sum() - np.trace(cm))
    if mixed == 0:
        return (
            f"Twins: the model mixed up no two classes on the {' and '.join(splits)} split "
            f"({int(cm.sum())} images, all right), so there are no twin pairs to show."
        )
    return None


def _split_preds(report_dir: Path) -> dict[str, pd.DataFrame]:
    """The predictions table of every evaluated split (valid, test) of the run."""
    out = {}
    for s in ("valid", "test"):
        if (report_dir / PREDICTIONS_CSV.format(s)).is_file():
            out[s] = pd.read_csv(report_dir / PREDICTIONS_CSV.format(s))
    return out


def _mixed_columns(pairs: pd.DataFrame, preds: pd.DataFrame) -> pd.DataFrame:
    """The images mixed up each way (`;`-joined, highest loss first) of every pair."""
    ab = [mixed_images(preds, r.class_a_id, r.class_b_id) for r in pairs.itertuples()]
    ba = [mixed_images(preds, r.class_b_id, r.class_a_id) for r in pairs.itertuples()]
    return pairs.assign(
        images_a_as_b=[";".join(v) for v in ab], images_b_as_a=[";".join(v) for v in ba]
    )


def _designed(pairs: pd.DataFrame) -> pd.Series:
    """Whether each pair is one the demo set drew as twins (same part, other marker)."""
    known = {frozenset(p) for p in designed_twins()}
    return pd.Series(
        [frozenset(p) in known for p in zip(pairs.class_a, pairs.class_b, strict=True)]
    )


def _explain(learn, dl, preds, data_dir, split, pairs, report_dir) -> pd.DataFrame:
    """Maps, masking drops, part ratios and a figure for every pair; their columns added."""
    boxes = part_boxes(data_dir, split)
    rows = []
    for pair in pairs.to_dict("records"):
        a, b = pair["class_a_id"], pair["class_b_id"]
        if not ((preds.true_id == a).any() or (preds.true_id == b).any()):
            rows.append({"n_images": 0, "figure": ""})
            continue
        pm = pair_maps(learn, dl, preds, data_dir, a, b, boxes)
        fig = FIG_DIR / TWIN_PNG.format(pair["rank"])
        plot_pair(learn, pm, pd.Series(pair), report_dir / fig)
        rows.append({**pair_scores(learn, pm), "n_images": len(pm.rows), "figure": fig.as_posix()})
    extra = pd.DataFrame(rows, index=pairs.index)
    out = pd.concat([pairs, extra], axis=1)
    if boxes is not None:
        out["designed_twin"] = _designed(out).to_numpy()
    return out


def _weighted(df: pd.DataFrame, col: str) -> float | None:
    """The image-weighted mean of a per-pair column (None when no pair has it)."""
    if col not in df or df[col].isna().all():
        return None
    ok = df[col].notna() & (df["n_images"] > 0)
    return float(np.average(df.loc[ok, col], weights=df.loc[ok, "n_images"]))


def _summary(pairs: pd.DataFrame, classes: list[str], split: str, splits: list[str]) -> dict:
    """twins.json: the split, the score means over the pairs and the demo's designed twins."""
    cols = ["drop_finer", "drop_gradcam", "part_ratio_finer", "part_ratio_gradcam"]
    out = {"split": split, "confusion_splits": splits, "n_pairs": len(pairs)}
    out.update(mask_share=MASK_SHARE, all_pairs={c: _weighted(pairs, c) for c in cols})
    if "designed_twin" in pairs:
        ours = pairs[pairs["designed_twin"]]
        n_designed = sum(a in classes and b in classes for a, b in designed_twins())
        out["designed"] = {
            "n_designed": n_designed,
            "found": len(ours),
            **{c: _weighted(ours, c) for c in cols},
        }
    return out


def _write(report_dir: Path, pairs: pd.DataFrame, summary: dict) -> pd.DataFrame:
    """twins.csv and twins.json (written last), old pair figures removed first."""
    fig_dir, kept = report_dir / FIG_DIR, set(pairs.get("figure", []))
    if fig_dir.is_dir():
        for old in fig_dir.glob(TWIN_PNG.replace("{:02d}", "*")):
            if old.relative_to(report_dir).as_posix() not in kept:
                old.unlink()
    write_csv(report_dir / TWINS_CSV, pairs)
    write_json(report_dir / TWINS_JSON, summary)
    return pairs


def find_twins(
    learn: Learner,
    cfg: ExperimentConfig | None,
    report_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    split: str,
    k: int,
) -> pd.DataFrame:
    """The run's top `k` twin pairs, explained on `split`; writes twins.csv/json and figures."""
    report_dir, data_dir = Path(report_dir), Path(data_dir)
    classes = check_vocab(learn.dls, data_dir)
    by_split = _split_preds(report_dir)
    if split not in by_split and len(classes) >= 2:
        evaluate_learner(learn, data_dir, split, report_dir, cfg)
        by_split = _split_preds(report_dir)
    cm = split_confusion(list(by_split.values()), len(classes))
    reason = no_twins_reason(classes, cm, list(by_split))
    if reason is not None:
        return _write(
            report_dir, pd.DataFrame(columns=PAIR_COLUMNS), {"split": split, "message": reason}
        )
    dl = split_dl(learn, data_dir, split, cfg)
    feats, labels = pooled_features(learn, dl)
    pairs = twin_pairs(cm, centroid_similarity(feats, labels, len(classes)), classes, k)
    pairs = _mixed_columns(pairs, pd.concat(list(by_split.values()), ignore_index=True))
    pairs = _explain(learn, dl, by_split[split], data_dir, split, pairs, report_dir)
    return _write(report_dir, pairs, _summary(pairs, classes, split, list(by_split)))


def copy_twins(report_dir: Path, model_dir: Path | None, force: bool = False) -> Path | None:
    """Copy the run's twins.csv into its model folder (the app's twins); its path, or None.

    A different twins.csv already there is replaced only with `force` (the model folder is
    what gets shipped); an equal one is left as it is.
    """
    src = Path(report_dir) / TWINS_CSV
    if model_dir is None or not src.is_file() or not Path(model_dir).is_dir():
        return None
    dest = Path(model_dir) / TWINS_CSV
    if dest.is_file() and dest.read_bytes() == src.read_bytes():
        return dest
    if dest.exists() and not force:
        raise TwincarError(
            f"{dest} exists and differs from the new twins: pass --force to replace it"
        )
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest


def _refuse_replacing(paths, force: bool) -> None:
    """One line when `twincar twins` would replace twins of the run (the model folder's
    twins.csv, the report's table and figures) without --force; checked before any work."""
    if force:
        return
    for folder in (paths.model_dir, paths.report_dir):
        path = Path(folder) / TWINS_CSV if folder is not None else None
        if path is not None and path.exists():
            raise TwincarError(
                f"{path} exists: twincar twins never replaces a run's twins (table and figures) "
                "without --force; pass --force to redo them"
            )


def twin_of(pairs: pd.DataFrame, label: str) -> tuple[str, int] | None:
    """The twin of class `label` in a twins.csv table and its pair's rank (best pair), or None."""
    for r in pairs.sort_values("rank").itertuples():
        if label in (r.class_a, r.class_b):
            return (r.class_b if r.class_a == label else r.class_a), int(r.rank)
    return None


def twins_run(
    run: str | os.PathLike,
    pairs: int | None = None,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> Path:
    """`twincar twins RUN`: find and explain a saved run's twins; return its new index.html.

    Args:
        run: reports/<run> or models/<run>.
        pairs: how many pairs (default: the run's eval.twins, else 5).
        split: the images explained (default: test when the run evaluates it, else valid).
        data_dir: the prepared data set (default: the run's).
        force: replace twins the run already has (report and model folder).
    """
    if pairs is not None and pairs < 1:
        raise TwincarError(f"--pairs must be at least 1, got {pairs}")
    _refuse_replacing(resolve_run(run), force)  # before the model is loaded or evaluated
    paths, cfg, data, learn = open_saved_run(run, data_dir, split)
    split = split or ("test" if cfg.eval.test else "valid")
    k = pairs if pairs is not None else (cfg.eval.twins or DEFAULT_PAIRS)
    with step("twins (Finer-CAM)"):
        found = find_twins(learn, cfg, paths.report_dir, data, split, k)
    copy_twins(paths.report_dir, paths.model_dir, force=force)
    index = write_index(paths.report_dir)
    console.print(
        f"{len(found)} twin pairs of {paths.name}: {paths.report_dir / TWINS_CSV}; report: {index}",
        markup=False,
    )
    return index
