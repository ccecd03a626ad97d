"""`twincar compare`: finished runs side by side, from their run folders only.

One row a run: the config keys that differ between the runs, the best and final validation
metrics, test accuracy, epochs, wall time and images/s, as summary.json and eval_test.json have
them. Runs that differ only in `train.seed` are also summarised as mean ± std. compare.html adds
the validation curves of every run and, for a sweep with an SQLite study, Optuna's
parameter-importance and parallel-coordinate plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from twincar_fast.config import flat_dict
from twincar_fast.console import console, plain_output, print_paths
from twincar_fast.errors import TwincarError
from twincar_fast.files import new_run_name, write_csv, write_text
from twincar_fast.run_folder import (
    COMPARE_CSV,
    COMPARE_HTML,
    CONFIG_YAML,
    EVAL_JSON,
    METRICS_CSV,
    STUDY_DB,
    SUMMARY_JSON,
)

__all__ = ["compare_runs", "compare_table", "find_runs", "run_record", "seed_summary"]

_SAME_BY_DESIGN = {"name", "reports_dir", "models_dir"}  # differ between any two runs
METRICS = ["best_epoch", "best_valid_loss", "best_valid_acc", "final_valid_loss", "final_valid_acc"]
METRICS += ["test_acc", "test_acc_tta", "epochs", "wall_time_s", "images_per_s"]
_OPTIONAL = {"test_acc_tta"}
_SEED_METRICS = ("best_valid_loss", "best_valid_acc", "test_acc", "test_acc_tta", "wall_time_s")


def _is_run(d: Path) -> bool:
    return (d / CONFIG_YAML).is_file() and (d / SUMMARY_JSON).is_file()


def find_runs(dirs: list[Path]) -> list[Path]:
    """The finished run folders among `dirs`: each a run, or a sweep holding runs."""
    runs: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise TwincarError(f"{d}: no such folder; give reports/<run> or reports/<sweep>")
        found = [d] if _is_run(d) else sorted(p for p in d.iterdir() if p.is_dir() and _is_run(p))
        if not found:
            raise TwincarError(
                f"{d}: no finished run here (a run folder has config.yaml and summary.json)"
            )
        runs += [r for r in found if r not in runs]
    return runs


def _read(path: Path, parse):
    """`parse(text)` of the file at `path`; a TwincarError naming the file and what is wrong."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())[:100] or type(e).__name__
        raise TwincarError(f"{path.name} is unreadable ({reason})") from None


def run_record(run: Path) -> tuple[dict, dict]:
    """(flat config, metrics) of one finished run, values as its files hold them; a TwincarError
    naming the damaged file otherwise."""
    flat = flat_dict(_read(run / CONFIG_YAML, yaml.safe_load) or {})
    cfg = {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat.items()}  # hashable
    s = _read(run / SUMMARY_JSON, json.loads)
    test = run / EVAL_JSON.format("test")
    tested = _read(test, json.loads) if test.is_file() else {}
    try:
        m = {
            "best_epoch": s.get("kept_epoch", s["best_epoch"]),
            "best_valid_loss": s["best"].get("valid_loss"),
            "best_valid_acc": s["best"].get("valid_acc"),
            "final_valid_loss": s["final"].get("valid_loss"),
            "final_valid_acc": s["final"].get("valid_acc"),
            "test_acc": tested.get("test_acc"),
            "test_acc_tta": tested.get("test_acc_tta"),  # eval.tta
            "epochs": s["epochs_run"],
            "wall_time_s": s["wall_time_s"],
            "images_per_s": s["train_images_per_s"],
        }
    except (KeyError, TypeError, AttributeError) as e:  # valid JSON of another shape
        raise TwincarError(
            f"summary.json lacks the run's results ({type(e).__name__} {e})"
        ) from None
    _read(run / METRICS_CSV, lambda text: pd.read_csv(io.StringIO(text)))  # the curves' source
    return cfg, m


def split_damaged(runs: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the runs whose files read, [(damaged run, what is wrong with it)])."""
    good, damaged = [], []
    for run in runs:
        try:
            run_record(run)
            good.append(run)
        except TwincarError as e:
            damaged.append((run, str(e)))
    return good, damaged


def compare_table(runs: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """One row a run: `run`, the differing config keys, then METRICS; and those keys."""
    records = [run_record(r) for r in runs]
    keys = sorted({k for cfg, _ in records for k in cfg} - _SAME_BY_DESIGN)
    differ = [k for k in keys if len({json.dumps(cfg.get(k)) for cfg, _ in records}) > 1]
    rows = [
        {"run": r.name, **{k: cfg.get(k) for k in differ}, **m}
        for r, (cfg, m) in zip(runs, records, strict=True)
    ]
    # a metric only some recipes produce (TTA) gets a column when one of the runs has it
    shown = [m for m in METRICS if m not in _OPTIONAL or any(r[m] is not None for r in rows)]
    return pd.DataFrame(rows, columns=["run", *differ, *shown]), differ


def seed_summary(df: pd.DataFrame, differ: list[str]) -> pd.DataFrame | None:
    """Mean ± std of METRICS over runs that differ only in train.seed (None if no such group)."""
    if "train.seed" not in differ:
        return None
    keys = [k for k in differ if k != "train.seed"]
    groups = df.groupby(keys, dropna=False, sort=False) if keys else [((), df)]
    rows = []
    for key, g in groups:
        if len(g) < 2:
            continue
        key = key if isinstance(key, tuple) else (key,)
        row = {**dict(zip(keys, key, strict=True)), "runs": len(g)}
        for m in [c for c in _SEED_METRICS if c in g]:
            v = pd.to_numeric(g[m], errors="coerce")
            row[m] = f"{v.mean():.4f} ± {v.std():.4f}"
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def _fmt(col: str, v: object) -> str:
    """A table cell: metrics to 4 decimals, times and speeds to 1, config values as they are."""
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return ""
    if isinstance(v, float) and col in METRICS:
        return f"{v:.1f}" if col in ("wall_time_s", "images_per_s") else f"{v:.4f}"
    return str(v)


_SHORT = {
    "best_epoch": "best ep",
    "best_valid_loss": "best loss",
    "best_valid_acc": "best acc",
    "final_valid_loss": "last loss",
    "final_valid_acc": "last acc",
    "test_acc": "test acc",
    "test_acc_tta": "tta acc",
    "epochs": "ep",
    "wall_time_s": "wall s",
    "images_per_s": "img/s",
}


def print_table(df: pd.DataFrame, title: str) -> None:
    """A DataFrame as a rich table in the terminal (short headers: the files keep full names)."""
    table = Table(title=title, title_justify="left")
    for c in df.columns:
        name = _SHORT.get(str(c), str(c).split(".")[-1])
        table.add_column(name, overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*(_fmt(str(c), v) for c, v in zip(df.columns, row, strict=True)))
    wide = Console(highlight=False, width=250) if plain_output() else console  # logs: whole cells
    wide.print(table)


def _png(fig) -> str:
    """A matplotlib figure as a base64 PNG (compare.html carries its images)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def curves_figure(runs: list[Path], labels: list[str]):
    """Accuracy and loss per epoch of every run, overlaid: the validation curves, or the
    training ones when no run has a validation split."""
    import matplotlib.pyplot as plt

    tables = [pd.read_csv(run / METRICS_CSV) for run in runs]
    has_valid = any("valid_loss" in m and m["valid_loss"].notna().any() for m in tables)
    split = "valid" if has_valid else "train"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, label in zip(tables, labels, strict=True):
        for ax, col in zip(axes, (f"{split}_acc", f"{split}_loss"), strict=True):
            if col in m:
                ax.plot(m["epoch"], m[col], marker="o", label=label)
    for ax, col in zip(axes, (f"{split}_acc", f"{split}_loss"), strict=True):
        title = col if has_valid else f"{col} (no run has a validation split)"
        ax.set(xlabel="epoch", ylabel=col, title=title)
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def parallel_figure(study):
    """Optuna's parallel-coordinate plot, every trial visible: a colour scale without its
    near-white end, thicker lines, and room above and below the extreme trials."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LinearSegmentedColormap
    from optuna.visualization import matplotlib as ovm

    ax = ovm.plot_parallel_coordinate(study)
    fig = ax.figure
    # viridis without its pale yellow end: the extreme trial stays as visible as the others
    dark = plt.get_cmap("viridis")(np.linspace(0, 0.85, 256))
    cmap = LinearSegmentedColormap.from_list("viridis_dark", dark)
    for coll in ax.collections:
        if isinstance(coll, LineCollection):
            coll.set_cmap(cmap)
            coll.set_linewidth(2.5)
    for a in fig.axes:  # the objective axis and each parameter's twin, padded alike
        if a is not ax and a.get_label() == "<colorbar>":
            continue
        lo, hi = a.get_ylim()
        pad = (hi - lo) * 0.06
        a.set_ylim(lo - pad, hi + pad)
    return fig


def optuna_figures(sweep_dir: Path) -> tuple[dict[str, str], list[str]]:
    """Optuna's importance and parallel-coordinate plots of a sweep's SQLite study, as PNGs, and
    the notes that say why a plot is left out."""
    db = sweep_dir / STUDY_DB
    if not db.is_file():
        return {}, []
    import optuna
    from optuna.visualization import matplotlib as ovm

    storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
    out, notes = {}, []
    for summary in optuna.get_all_study_summaries(storage):
        s = optuna.load_study(study_name=summary.study_name, storage=storage)
        params = sorted({p for t in s.get_trials(deepcopy=False) for p in t.params})
        plots = {"parallel": parallel_figure}
        if len(params) > 1:
            plots = {"importance": lambda st: ovm.plot_param_importances(st).figure, **plots}
        else:  # one searched parameter takes all the importance: a bar at 1.00 tells nothing
            notes.append(
                f"{s.study_name}: no parameter-importance plot: the sweep searches one parameter "
                f"({', '.join(params) or 'none'}), which has all the importance by definition"
            )
        for title, plot in plots.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna's "experimental" notice
                    out[f"{s.study_name}: {title}"] = _png(plot(s))
            except (ValueError, RuntimeError) as e:  # too few finished trials, one value only
                notes.append(f"{s.study_name}: no {title} plot ({e})")
    return out, notes


def _html(
    title: str,
    df: pd.DataFrame,
    seeds: pd.DataFrame | None,
    images: dict[str, str],
    notes: list[str],
) -> str:
    """compare.html: the damaged runs and notes, the table, mean ± std, then the figures."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append(df.to_html(index=False, float_format="%.4f", na_rep=""))
    if seeds is not None:
        parts += ["<h2>mean ± std over seeds</h2>", seeds.to_html(index=False)]
    for name, png in images.items():
        parts += [
            f"<h2>{html.escape(name)}</h2>",
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,{png}">',
        ]
    style = (
        "body{font-family:sans-serif;margin:2em;font-size:13px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}.note{color:#8a4b00}"
    )
    return f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>{''.join(parts)}"


def _default_out(dirs: list[Path]) -> Path:
    """<sweep>/compare for one sweep, else a new compare-<stamp> folder beside the first run."""
    if len(dirs) == 1 and not _is_run(dirs[0]):
        return dirs[0] / "compare"
    parent = dirs[0].parent
    return parent / new_run_name("compare", [parent])


def compare_runs(dirs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Compare the runs in `dirs`: print the table, write compare.csv and compare.html to `out`.

    A run whose files don't read (garbage summary.json, empty metrics.csv, ...) is listed as
    damaged, with the reason, and the others are compared.
    """
    dirs = [Path(d) for d in dirs]
    runs, damaged = split_damaged(find_runs(dirs))
    notes = [f"damaged run left out: {r} ({why})" for r, why in damaged]
    for note in notes:
        console.print(note, markup=False, style="bold red")
    if not runs:
        raise TwincarError(
            f"no run to compare: all {len(damaged)} are damaged (see above); re-run or remove them"
        )
    df, differ = compare_table(runs)
    seeds = seed_summary(df, differ)
    print_table(
        df, f"{len(runs)} runs" + (f" ({len(damaged)} damaged, left out)" if damaged else "")
    )
    if seeds is not None:
        print_table(seeds, "mean ± std over seeds")
    out = Path(out) if out is not None else _default_out(dirs)
    labels = [
        " ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(differ, row, strict=True)) or r.name
        for r, row in zip(runs, df[differ].itertuples(index=False), strict=True)
    ]
    images = {"validation curves": _png(curves_figure(runs, labels))}
    for d in dirs:
        if not _is_run(d):
            found, why = optuna_figures(d)
            images.update(found)
            notes += why
            for note in why:
                console.print(note, markup=False)
    write_csv(out / COMPARE_CSV, df)
    title = f"compare: {', '.join(d.name for d in dirs)}"
    write_text(out / COMPARE_HTML, _html(title, df, seeds, images, notes))
    print_paths("outputs", {"table": out / COMPARE_CSV, "page": out / COMPARE_HTML})
    return out
