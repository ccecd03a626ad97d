"""The sweep's trials as a table: live in a terminal (rich), a line per change in a log."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.live import Live
from rich.table import Table

from twincar_fast.console import console

__all__ = ["best_line", "trials_table", "watch_trials"]

_POLL_S = 1.0


def _params(t: FrozenTrial) -> str:
    """A trial's searched values, short."""
    return " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in t.params.items())


def _short(v: object) -> str:
    """A value as few characters as tell it."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _row(t: FrozenTrial) -> list[str]:
    """number, state, point/seed, params, value, note (the error or the run folder)."""
    value = "" if t.value is None else f"{t.value:.4f}"
    note = t.user_attrs.get("error") or t.user_attrs.get("run_name", "")
    where = f"{t.user_attrs.get('point', '')}/{t.user_attrs.get('seed_index', '')}"
    return [str(t.number), t.state.name.lower(), where, _params(t), value, note]


def trials_table(study: optuna.Study) -> Table:
    """Every trial of the study (waiting ones included) as a rich table."""
    table = Table(title=f"sweep {study.study_name}", title_justify="left")
    for col in ("#", "state", "point/seed", "params", "value", "run or error"):
        table.add_column(col, overflow="fold")
    for t in study.get_trials(deepcopy=False):
        table.add_row(*_row(t))
    return table


def best_line(study: optuna.Study) -> str:
    """'best: trial N value ... (params) in <run>', or why there is none."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    counts = f"{len(done)} finished, {len(failed)} failed"
    if not done:
        return f"sweep {study.study_name}: {counts}; no finished trial to choose from"
    b = study.best_trial
    return (
        f"sweep {study.study_name}: {counts}; best trial {b.number}: value {b.value:.4f} "
        f"({_params(b)}) in {b.user_attrs.get('run_dir')}"
    )


def _changes(study: optuna.Study, seen: dict[int, str]) -> list[str]:
    """Lines for trials whose state changed since the last look (plain output)."""
    lines = []
    for t in study.get_trials(deepcopy=False):
        if seen.get(t.number) != t.state.name and t.state != TrialState.WAITING:
            seen[t.number] = t.state.name
            lines.append("  ".join(x for x in _row(t) if x))
    return lines


def watch_trials(study: optuna.Study, procs: Sequence[subprocess.Popen], live: bool) -> None:
    """Show the trials until every worker process has ended."""
    if live:
        with Live(trials_table(study), console=console, refresh_per_second=2) as view:
            while any(p.poll() is None for p in procs):
                time.sleep(_POLL_S)
                view.update(trials_table(study))
            view.update(trials_table(study))
    else:
        seen: dict[int, str] = {}
        while any(p.poll() is None for p in procs):
            for line in _changes(study, seen):
                console.print(line, markup=False)
            time.sleep(_POLL_S)
        for line in _changes(study, seen):
            console.print(line, markup=False)
    for i, p in enumerate(procs):
        if p.returncode:
            console.print(
                f"worker {i} ended with exit code {p.returncode} (see its log)", markup=False
            )
    console.print(best_line(study), markup=False, style="bold")
