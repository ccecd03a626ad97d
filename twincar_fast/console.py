"""The run's console output: config summary at the start, one line per epoch, output paths at the end.

In a terminal (or a notebook) fastai's progress bars and table show the epochs; when stdout is not a
terminal (CI logs, `> file`) the bars are switched off and `epoch_line` prints one plain line each.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastprogress.core import IN_NOTEBOOK
from rich.console import Console
from rich.table import Table

from twincar_fast.config import ExperimentConfig

__all__ = [
    "console",
    "epoch_line",
    "plain_output",
    "print_config",
    "print_epoch",
    "print_paths",
    "quiet_if_plain",
]

console = Console(highlight=False, soft_wrap=True)  # long lines stay whole in logs


def plain_output() -> bool:
    """True when stdout is neither a terminal nor a notebook: no progress bars, plain lines."""
    return not IN_NOTEBOOK and not sys.stdout.isatty()


@contextmanager
def quiet_if_plain(learn) -> Iterator[None]:
    """No fastai progress bars and no stats print while `learn` runs, when stdout is not a terminal."""
    with ExitStack() as stack:
        if plain_output():
            stack.enter_context(learn.no_bar())
            stack.enter_context(learn.no_logging())
        yield


def print_config(cfg: ExperimentConfig, run: str) -> None:
    """The experiment's main settings as a small table."""
    d, m, t = cfg.data, cfg.model, cfg.train
    aug = f"{cfg.aug.stage}-stage" if cfg.aug.enabled else "no"
    if cfg.aug.enabled and cfg.aug.stage == "batch":
        aug += f" (items {d.item_size} px)"
    table = Table(title=f"run {run}", show_header=False)
    rows = {
        "data": f"{d.root} ({d.img_size} px crops, {aug} augmentation, batch {d.batch_size})",
        "model": f"{m.arch} ({'pretrained' if m.pretrained else 'from scratch'}, {m.head} head)",
        "fit": f"{t.epochs} epochs {t.schedule}, lr {t.lr}, {t.optimizer}, frozen {t.freeze or '-'}",
        "stopping": f"monitor {t.monitor}, early stop {t.early_stopping or 'off'}, "
        f"plateau {t.plateau_patience or 'off'}",
        "device": t.device,
    }
    if t.head_epochs:
        rows["fit"] = f"{t.head_epochs} head-only + {rows['fit']}"
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def _fmt(value: float) -> str:
    """A metric value with 4 decimals (nan as '-')."""
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def epoch_line(row: dict, n_epochs: int) -> str:
    """One plain line with an epoch's main numbers (a metrics.csv row)."""
    keys = ["train_loss", "train_acc", "valid_loss", "valid_acc", "valid_f1_macro", "valid_top5"]
    parts = [f"epoch {row['epoch']} ({row['epoch'] + 1}/{n_epochs})"]  # 0-based, as metrics.csv
    parts += [f"{k} {_fmt(row[k])}" for k in keys]
    parts += [f"lr {row['lr']:.2e}", f"{row['time_s']:.1f}s"]
    return "  ".join(parts)


def print_epoch(row: dict, n_epochs: int) -> None:
    """Print `epoch_line` as is (no wrapping, no markup)."""
    console.print(epoch_line(row, n_epochs), soft_wrap=True, markup=False)


def print_paths(title: str, paths: dict[str, str | Path]) -> None:
    """A titled list of output paths, one per line."""
    console.print(f"[bold]{title}[/bold]")
    for key, path in paths.items():
        console.print(f"  {key:<12} {path}", soft_wrap=True, markup=False)
