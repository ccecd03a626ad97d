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

import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from twincar_fast.config import flat_dict
from twincar_fast.console import console, plain_output, print_paths
from twincar_fast.errors import TwincarError
from twincar_fast.files import new_run_name, write_csv, write_text

__all__ = ["compare_runs", "compare_table", "find_runs", "run_record", "seed_summary"]

_SAME_BY_DESIGN = {"name", "reports_dir", "models_dir"}  # differ between any two runs
METRICS = ["best_epoch", "best_valid_loss", "best_valid_acc", "final_valid_loss", "final_valid_acc"]
METRICS += ["test_acc", "test_acc_tta", "epochs", "wall_time_s", "images_per_s"]
_OPTIONAL = {"test_acc_tta"}
_SEED_METRICS = ("best_valid_loss", "best_valid_acc", "test_acc", "test_acc_tta", "wall_time_s")


def _is_run(d: Path) -> bool:
    return (d / "config.yaml").is_file() and (d / "summary.json").is_file()


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


def run_record(run: Path) -> tuple[dict, dict]:
    """(flat config, metrics) of one finished run, values as its files hold them."""
    flat = flat_dict(yaml.safe_load((run / "config.yaml").read_text()))
    cfg = {k: json.dumps(v) if isinstance(v, list) else v for k, v in flat.items()}  # hashable
    s = json.loads((run / "summary.json").read_text())
    test = run / "eval_test.json"
    tested = json.loads(test.read_text()) if test.is_file() else {}
    m = {
        "best_epoch": s["best_epoch"],
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
    return cfg, m


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
    """valid_acc and valid_loss per epoch of every run, overlaid."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(runs, labels, strict=True):
        m = pd.read_csv(run / "metrics.csv")
        for ax, col in zip(axes, ("valid_acc", "valid_loss"), strict=True):
            ax.plot(m["epoch"], m[col], marker="o", label=label)
    for ax, col in zip(axes, ("valid_acc", "valid_loss"), strict=True):
        ax.set(xlabel="epoch", ylabel=col, title=col)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def optuna_figures(sweep_dir: Path) -> dict[str, str]:
    """Optuna's importance and parallel-coordinate plots of a sweep's SQLite study, as PNGs."""
    db = sweep_dir / "study.db"
    if not db.is_file():
        return {}
    import optuna
    from optuna.visualization import matplotlib as ovm

    storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
    out = {}
    for study in optuna.get_all_study_summaries(storage):
        s = optuna.load_study(study_name=study.study_name, storage=storage)
        for title, plot in (
            ("importance", ovm.plot_param_importances),
            ("parallel", ovm.plot_parallel_coordinate),
        ):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna's "experimental" notice
                    out[f"{s.study_name}: {title}"] = _png(plot(s).figure)
            except (ValueError, RuntimeError) as e:  # too few finished trials, one value only
                console.print(f"no {title} plot for {s.study_name}: {e}", markup=False)
    return out


def _html(title: str, df: pd.DataFrame, seeds: pd.DataFrame | None, images: dict[str, str]) -> str:
    """compare.html: the table, mean ± std, then the figures, one self-contained page."""
    parts = [f"<h1>{html.escape(title)}</h1>", df.to_html(index=False, float_format="%.4f")]
    if seeds is not None:
        parts += ["<h2>mean ± std over seeds</h2>", seeds.to_html(index=False)]
    for name, png in images.items():
        parts += [
            f"<h2>{html.escape(name)}</h2>",
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,{png}">',
        ]
    style = "body{font-family:sans-serif;margin:2em;font-size:13px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}"
    return f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>{''.join(parts)}"


def _default_out(dirs: list[Path]) -> Path:
    """<sweep>/compare for one sweep, else a new compare-<stamp> folder beside the first run."""
    if len(dirs) == 1 and not _is_run(dirs[0]):
        return dirs[0] / "compare"
    parent = dirs[0].parent
    return parent / new_run_name("compare", [parent])


def compare_runs(dirs: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Compare the runs in `dirs`: print the table, write compare.csv and compare.html to `out`."""
    dirs = [Path(d) for d in dirs]
    runs = find_runs(dirs)
    df, differ = compare_table(runs)
    seeds = seed_summary(df, differ)
    print_table(df, f"{len(runs)} runs")
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
            images.update(optuna_figures(d))
    write_csv(out / "compare.csv", df)
    write_text(
        out / "compare.html",
        _html(f"compare: {', '.join(d.name for d in dirs)}", df, seeds, images),
    )
    print_paths("outputs", {"table": out / "compare.csv", "page": out / "compare.html"})
    return out
