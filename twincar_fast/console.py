"""The run's console output: config summary at the start, one line per epoch, output paths at the end.

Epochs show as a compact table (`EpochPrinter`: the `train.console_columns` of metrics.csv, the
same values as there, so `train_loss` is the epoch's mean loss, not fastai's smoothed one); in a
terminal (or a notebook) fastai's progress bars run above it, when stdout is not a terminal (CI
logs, `> file`) they are switched off. The steps after training say what they do (`step`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from fastprogress.core import IN_NOTEBOOK
from rich.console import Console
from rich.table import Table

from twincar_fast.config import CONSOLE_COLUMNS, ExperimentConfig, ModelConfig

__all__ = [
    "EpochPrinter",
    "console",
    "epoch_header",
    "epoch_line",
    "eval_bars",
    "plain_output",
    "print_config",
    "print_paths",
    "quiet_if_plain",
    "step",
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


def _model_start(m: ModelConfig) -> str:
    """Where the model's weights start: a local file (`model.weights` wins), the hub, or random."""
    if m.weights:
        return f"weights {Path(m.weights).name}"
    return "pretrained" if m.pretrained else "from scratch"


def print_config(cfg: ExperimentConfig, run: str, machine: dict | None = None) -> None:
    """The experiment's main settings as a small table; `machine`: `device_info`'s dict."""
    d, m, t = cfg.data, cfg.model, cfg.train
    aug = f"{cfg.aug.stage}-stage" if cfg.aug.enabled else "no"
    if cfg.aug.enabled and cfg.aug.stage == "batch":
        aug += f" (items {d.item_size} px)"
    table = Table(title=f"run {run}", show_header=False)
    rows = {
        "data": f"{d.root} ({d.img_size} px crops, {aug} augmentation, batch {d.batch_size})",
        "model": f"{m.arch} ({_model_start(m)}, {m.head} head)",
        "fit": f"{t.epochs} epochs {t.schedule}, lr {t.lr}, {t.optimizer}, frozen {t.freeze or '-'}",
        "stopping": f"monitor {t.monitor}, early stop {t.early_stopping or 'off'}, "
        f"plateau {t.plateau_patience or 'off'}",
        "device": t.device,
    }
    if machine:
        rows["device"] = (
            f"{t.device} → {machine['device']}, {machine['precision']} "
            f"({machine['torch_threads']} threads, {machine['processor']})"
        )
    if t.head_epochs:
        rows["fit"] = f"{t.head_epochs} head-only + {rows['fit']}"
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def _fmt(value: float) -> str:
    """A metric value with 4 decimals (nan, an epoch without that column, as '-')."""
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def _width(column: str) -> int:
    """Characters of a column of the epoch table: its name, at least a 4-decimal value."""
    return max(len(column), 6)


def epoch_header(columns: Sequence[str]) -> str:
    """The header of the compact epoch table (epoch, the chosen metrics.csv columns, lr, time)."""
    names = [f"{'epoch':<7}", *(f"{c:>{_width(c)}}" for c in columns), f"{'lr':>8}", "  time"]
    return "  ".join(names)


def epoch_line(row: dict, n_epochs: int, columns: Sequence[str] = CONSOLE_COLUMNS) -> str:
    """One row of the compact epoch table: a metrics.csv row's `columns` (epoch 0-based, as
    there, of `n_epochs`), its LR and seconds."""
    parts = [f"{row['epoch']:>3}/{n_epochs:<3}"]
    parts += [f"{_fmt(row[c]):>{_width(c)}}" for c in columns]
    parts += [f"{row['lr']:8.2e}", f"{row['time_s']:5.1f}s"]
    return "  ".join(parts)


class EpochPrinter:
    """Prints the compact epoch table: a header before the first row, then one line per epoch."""

    def __init__(self, n_epochs: int, columns: Sequence[str] = CONSOLE_COLUMNS):
        self.n_epochs, self.columns, self.started = n_epochs, list(columns), False

    def __call__(self, row: dict) -> None:
        if not self.started:
            console.print(epoch_header(self.columns), markup=False, style="bold")
            self.started = True
        console.print(epoch_line(row, self.n_epochs, self.columns), markup=False)


@contextmanager
def eval_bars(learn) -> Iterator[None]:
    """`quiet_if_plain` for evaluation: and in a terminal, progress bars without the stale
    training loss (fastai shows `learn.smooth_loss`, last set by the training batches)."""
    stale = learn.__dict__.pop("smooth_loss", None)
    try:
        with quiet_if_plain(learn):
            yield
    finally:
        if stale is not None:
            learn.smooth_loss = stale


@contextmanager
def step(title: str) -> Iterator[None]:
    """Say what a step after training does as it starts, and how long it took when done."""
    console.print(f"{title} …", markup=False)
    start = time.perf_counter()
    yield
    console.print(f"{title}: done in {time.perf_counter() - start:.1f}s", markup=False)


def print_paths(title: str, paths: dict[str, str | Path]) -> None:
    """A titled list of output paths, one per line, the paths aligned after the longest name."""
    console.print(f"[bold]{title}[/bold]")
    width = max((len(k) for k in paths), default=0)
    for key, path in paths.items():
        console.print(f"  {key:<{width}}  {path}", soft_wrap=True, markup=False)
