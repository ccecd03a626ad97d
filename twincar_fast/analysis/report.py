"""`reports/<run>/index.html`: one page that shows how good a run is, where it fails, what it looks at.

The page is built only from the run's files (summary.json, metrics.csv, eval_<split>.json,
config.yaml, env.json, figures/*.png, *.csv, twins.json + twins.csv + figures/twins/), links them
relatively and escapes every text with `html.escape`, so the folder can be moved or zipped and
still opens in any browser.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pandas as pd

from twincar_fast.analysis.metrics import METRIC_NAMES
from twincar_fast.files import write_text
from twincar_fast.run_folder import (
    CONFIG_YAML,
    ENV_JSON,
    EVAL_JSON,
    FIGURES_DIR,
    GRADCAM_PARTS_CSV,
    INDEX_HTML,
    METRICS_CSV,
    MOST_CONFUSED_CSV,
    SUMMARY_JSON,
    TWINS_CSV,
    TWINS_JSON,
    read_json,
)

__all__ = ["headline_metrics", "write_index"]

# figure stem (without _<split>) -> caption, in page order
FIGURES = {
    "accuracy": "Accuracy (train and valid) and valid macro F1 per epoch",
    "loss": "Train and valid loss per epoch",
    "precision_recall": "Valid macro precision and recall per epoch",
    "topk": "Valid top-1, top-3 and top-5 accuracy per epoch",
    "class_f1": "The classes with the highest and the lowest F1, each bar coloured by its F1",
    "confusion": "Confusion matrix, rows normalized, confused classes clustered together",
    "confusion_zoom": "Zoom on the most-confused block of classes",
    "most_confused": "Most-confused pairs: an image of A predicted as B beside a real B, "
    "as the model saw them (its input crop)",
    "top_losses": "The images with the highest loss, as the model saw them (its input crop)",
    "gradcam_mistakes": "Grad-CAM++ on mistakes, on the model's input: predicted vs true class",
    "gradcam_correct": "Grad-CAM++ on a correct example of each class, on the model's input",
    "gradcam_images": "Grad-CAM++ on the images given on the command line, on the model's input",
    "gradcam_parts": "Grad-CAM++ and the box of the part that tells the classes apart, on the "
    "model's input: demo set only",
}
# the captions of the curves without a validation split (data.valid_pct: 0): what they do show
TRAIN_ONLY = {
    "accuracy": "Train accuracy per epoch (no validation split: the test split above judges the run)",
    "loss": "Train loss per epoch (no validation split)",
}

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0;border:1px solid #eee;padding:.5em}
figure img{max-width:100%;max-height:900px;object-fit:contain}
figcaption{color:#555;font-size:.9em}pre{background:#f7f7f7;padding:.8em;overflow-x:auto}
.wide{overflow-x:auto;max-width:100%}.wide table{font-size:.85em}
"""


def _valid_row(report_dir: Path) -> dict:
    """The metrics.csv row of the best epoch (summary.json's best_epoch; else the last row)."""
    path = report_dir / METRICS_CSV
    if not path.is_file():
        return {}
    df = pd.read_csv(path)
    if df.empty:
        return {}
    best = read_json(report_dir / SUMMARY_JSON).get("best_epoch")
    rows = df[df["epoch"] == best] if best is not None else df.iloc[0:0]
    return (rows if len(rows) else df.tail(1)).iloc[-1].to_dict()


def headline_metrics(report_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per metric (loss first) with a column per split: valid, test."""
    report_dir = Path(report_dir)
    best = read_json(report_dir / SUMMARY_JSON).get("best_epoch")
    label = "valid (kept epoch)" if best is None else f"valid (kept epoch {best})"
    sources = {label: ("valid", _valid_row(report_dir))}
    for split in ("test", "valid"):
        data = read_json(report_dir / EVAL_JSON.format(split))
        if data:
            n = data.get("n_images", "?")
            sources[f"{split} (evaluated, {n} images)"] = (split, data)
    rows = []
    for name in ["loss", *METRIC_NAMES]:
        row = {"metric": name}
        for col, (prefix, data) in sources.items():
            value = data.get(f"{prefix}_{name}")
            row[col] = None if value is None or pd.isna(value) else float(value)
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.loc[:, df.notna().any()]  # a split without any value (data.valid_pct: 0) is left out


def _table(df: pd.DataFrame, digits: int = 4) -> str:
    """An escaped HTML table of a DataFrame (numbers right-aligned, `digits` decimals)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                text = "–" if pd.isna(v) else f"{v:.{digits}f}"
                cells.append(f'<td class="num">{text}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _caption(stem: str, has_valid: bool = True) -> str:
    """The caption of a figure file stem such as `confusion_test` (`has_valid`: metrics.csv has
    validation values, else the curves' captions say what they show instead)."""
    for key in sorted(FIGURES, key=len, reverse=True):
        for split in ("", "_test", "_valid"):
            if stem == key + split:
                text = FIGURES[key] if has_valid else TRAIN_ONLY.get(key, FIGURES[key])
                return text + (f"; {split[1:]} split" if split else "")
    return stem.replace("_", " ")


def has_validation(report_dir: Path) -> bool:
    """Whether the run's metrics.csv holds any validation value (not so for data.valid_pct: 0)."""
    path = report_dir / METRICS_CSV
    if not path.is_file():
        return False
    df = pd.read_csv(path)
    return "valid_loss" in df and bool(df["valid_loss"].notna().any())


def _figure_order(path: Path) -> tuple:
    """Sort key: the FIGURES order, test before valid, unknown figures last."""
    keys = list(FIGURES)
    stem = path.stem
    base = stem.removesuffix("_test").removesuffix("_valid")
    return (keys.index(base) if base in keys else len(keys), stem.endswith("_valid"), stem)


def _figures_html(report_dir: Path) -> str:
    """Every PNG of figures/ with its caption, linked to the full-size file."""
    figs = sorted((report_dir / FIGURES_DIR).glob("*.png"), key=_figure_order)
    if not figs:
        return "<p>No figures yet (run <code>twincar interpret</code>).</p>"
    valid = has_validation(report_dir)
    return "\n".join(
        _figure_tag(f.relative_to(report_dir).as_posix(), _caption(f.stem, valid), f.stem)
        for f in figs
    )


def _figure_tag(rel: str, caption: str, fid: str) -> str:
    """A linked, captioned <figure> of the image at `rel` (relative to the report)."""
    rel, cap = html.escape(rel, quote=True), html.escape(caption)
    return (
        f'<figure id="{html.escape(fid)}"><a href="{rel}"><img src="{rel}" alt="{cap}" '
        f'loading="lazy"></a><figcaption>{cap} — <code>{rel}</code> (click for full size)'
        "</figcaption></figure>"
    )


def _files_html(report_dir: Path) -> str:
    """A list of links to the run's tables and JSON files."""
    files = sorted(
        p for ext in ("*.csv", "*.json", "*.npz", "*.yaml") for p in report_dir.glob(ext)
    )
    items = "".join(
        f'<li><a href="{html.escape(p.name, quote=True)}">{html.escape(p.name)}</a></li>'
        for p in files
    )
    return f"<ul>{items}</ul>"


def _summary_html(report_dir: Path) -> str:
    """Key facts of summary.json (the kept epoch and why, monitor, times) as a small table."""
    s = read_json(report_dir / SUMMARY_JSON)
    keys = ["kept_epoch", "kept_because"] if "kept_epoch" in s else ["best_epoch"]
    keys += ["monitor", "best_value", "epochs_run", "stopped_early", "wall_time_s"]
    keys += ["train_images_per_s"]
    rows = [
        (k, _short(s[k]))
        for k in keys
        if s.get(k) is not None and not isinstance(s[k], (dict, list))  # null: nothing to show
    ]
    machine = s.get("machine")
    if isinstance(machine, dict):
        rows.append(("machine", ", ".join(str(machine.get(k, "?")) for k in _MACHINE)))
    if not rows:
        return ""
    return _table(pd.DataFrame(rows, columns=["summary", "value"]).astype({"value": str}))


_MACHINE = ("device", "precision", "torch_threads", "processor")


def _short(value) -> str:
    """A summary value as text, floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _confused_html(report_dir: Path) -> str:
    """The most-confused pairs table of each split, inline."""
    out = []
    for split in ("test", "valid"):
        path = report_dir / MOST_CONFUSED_CSV.format(split)
        if path.is_file():
            df = pd.read_csv(path)[["actual", "predicted", "count"]]
            out.append(f"<h3>Most-confused pairs ({split})</h3>{_table(df)}")
    return "".join(out)


def _headline_text(report_dir: Path) -> str:
    """One sentence a person reads first: test and valid accuracy, top-5 and macro F1."""
    out = []
    for split in ("test", "valid"):
        e = read_json(report_dir / EVAL_JSON.format(split))
        if e:
            out.append(
                f"{split.capitalize()} split ({e.get('n_images', '?')} images): accuracy "
                f"{e[f'{split}_acc']:.2%}, top-5 {e[f'{split}_top5']:.2%}, "
                f"macro F1 {e[f'{split}_f1_macro']:.3f}."
            )
    row = _valid_row(report_dir)
    if row and pd.notna(row.get("valid_acc")):  # data.valid_pct: 0 has no validation values
        out.append(
            f"Validation during training (epoch {int(row['epoch'])}): accuracy "
            f"{row['valid_acc']:.2%}, macro F1 {row['valid_f1_macro']:.3f}."
        )
    out += _kept_text(read_json(report_dir / SUMMARY_JSON))
    for split in ("test", "valid"):
        path = report_dir / GRADCAM_PARTS_CSV.format(split)
        if path.is_file():
            ratio = pd.read_csv(path)["ratio"]
            out.append(
                f"Grad-CAM++ on the class-telling part ({split}, {ratio.notna().sum()} correct "
                f"images): {ratio.mean():.2f}× more map mass in the part's box than its area."
            )
    return "".join(f"<p>{html.escape(t)}</p>" for t in out)


def _kept_text(summary: dict) -> list[str]:
    """The sentence saying which epoch's weights the run kept and why (summary.json)."""
    kept, why, n = summary.get("kept_epoch"), summary.get("kept_because"), summary.get("epochs_run")
    if kept is None or not why:
        return []
    of = f" of epochs 0-{n - 1}" if isinstance(n, int) and n > 0 else ""
    return [f"The model is epoch {kept}{of}: {why}."]


# twins.csv column -> the page's header: short words that wrap, so the table fits its column
TWIN_COLUMNS = {
    "rank": "#", "class_a": "class A", "class_b": "class B", "score": "score",
    "confusion_a_as_b": "A seen as B", "confusion_b_as_a": "B seen as A",
    "centroid_cosine": "centroid cosine", "n_a_as_b": "images A→B", "n_b_as_a": "images B→A",
    "drop_finer": "drop Finer-CAM", "drop_gradcam": "drop Grad-CAM++",
    "part_ratio_finer": "part ratio Finer-CAM", "part_ratio_gradcam": "part ratio Grad-CAM++",
    "designed_twin": "designed twin",
}  # fmt: skip


def _ratio(value) -> str:
    """A ratio such as 2.53×, or – when missing."""
    return "–" if value is None or pd.isna(value) else f"{value:.2f}×"


def _twins_text(summary: dict) -> list[str]:
    """The sentences over the twin pairs: the masking check, the demo's designed twins."""
    allp, n = summary.get("all_pairs", {}), summary.get("n_pairs", 0)
    out = [
        f"The {n} class pairs the model mixes up most ({', '.join(summary.get('confusion_splits', []))} "
        f"confusion × centroid similarity), explained on the {summary['split']} split."
    ]
    if allp.get("drop_finer") is not None:
        out.append(
            f"Masking check (the top {summary['mask_share']:.0%} of a map's pixels masked): the "
            f"confidence in the target over its twin drops by {allp['drop_finer']:.3f} for "
            f"Finer-CAM and {allp['drop_gradcam']:.3f} for Grad-CAM++ on average."
        )
    if allp.get("part_ratio_finer") is not None:
        out.append(
            "Map mass in the differing part's box ÷ the box's area share: Finer-CAM "
            f"{_ratio(allp['part_ratio_finer'])}, Grad-CAM++ {_ratio(allp['part_ratio_gradcam'])}."
        )
    d = summary.get("designed")
    if d:
        out.append(
            f"Designed twins (demo set): {d['found']} of the {d['n_designed']} designed twin "
            f"pairs are among the top {n} pairs found; on them the part ratio is Finer-CAM "
            f"{_ratio(d.get('part_ratio_finer'))}, Grad-CAM++ {_ratio(d.get('part_ratio_gradcam'))}."
        )
    return out


def _twins_html(report_dir: Path) -> str:
    """The Twins section: a sentence when there are no pairs, else the summary, table, figures."""
    summary = read_json(report_dir / TWINS_JSON)
    if not summary:
        return ""
    head = "<h2>Twins: the look-alike classes and what tells them apart</h2>"
    if summary.get("message"):
        return head + f"<p>{html.escape(summary['message'])}</p>"
    pairs = pd.read_csv(report_dir / TWINS_CSV)
    text = "".join(f"<p>{html.escape(t)}</p>" for t in _twins_text(summary))
    shown = pairs[[c for c in TWIN_COLUMNS if c in pairs]].rename(columns=TWIN_COLUMNS)
    table = f'<div class="wide">{_table(shown, digits=3)}</div>'  # scrolls rather than spills
    figs = [
        _figure_tag(r.figure, f"Twins #{r.rank}: {r.class_a} vs {r.class_b}", f"twins_{r.rank}")
        for r in pairs.itertuples()
        if isinstance(getattr(r, "figure", None), str) and (report_dir / r.figure).is_file()
    ]
    return head + text + table + "\n".join(figs)


def _text_file(path: Path) -> str:
    """The escaped contents of a text file, or a note that it is missing."""
    if not path.is_file():
        return f"<p>{html.escape(path.name)} not found.</p>"
    return f"<pre>{html.escape(path.read_text(encoding='utf-8'))}</pre>"


def write_index(report_dir: str | os.PathLike) -> Path:
    """Write `report_dir/index.html` linking every figure and table of the run; return its path."""
    report_dir = Path(report_dir)
    run = html.escape(report_dir.name)
    sections = [
        f"<h1>Run {run}</h1>",
        "<h2>Headline metrics</h2>",
        _headline_text(report_dir),
        _table(headline_metrics(report_dir)),
        _summary_html(report_dir),
        "<h2>Figures</h2>",
        _figures_html(report_dir),
        _twins_html(report_dir),
        "<h2>Tables</h2>",
        _confused_html(report_dir),
        _files_html(report_dir),
        "<h2>Config (config.yaml)</h2>",
        _text_file(report_dir / CONFIG_YAML),
        "<h2>Environment (env.json)</h2>",
        _text_file(report_dir / ENV_JSON),
    ]
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{run}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    return write_text(report_dir / INDEX_HTML, page)
