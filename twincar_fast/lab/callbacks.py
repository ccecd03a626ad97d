"""fastai callbacks that tie a run to its Optuna trial: where the run lives, and pruning."""

from __future__ import annotations

from pathlib import Path

import optuna
from fastai.callback.core import Callback

from twincar_fast.train.callbacks import SaveRun, epoch_skipped

__all__ = ["OptunaPrune", "RecordRun"]


class RecordRun(Callback):
    """Store the run folder on the trial as training starts, so a killed trial resumes there."""

    def __init__(self, trial: optuna.Trial, reports_dir: str | Path):
        self.trial, self.reports_dir = trial, Path(reports_dir)

    def before_fit(self):
        self.trial.set_user_attr("run_dir", str(self.reports_dir / Path(self.learn.path).name))


class OptunaPrune(Callback):
    """Report `monitor` to the trial after each committed epoch; stop the run if Optuna prunes it."""

    order = SaveRun.order + 1  # the epoch's metrics.csv row is written

    def __init__(self, trial: optuna.Trial, monitor: str):
        self.trial, self.monitor = trial, monitor

    def after_epoch(self):
        if epoch_skipped(self.learn):
            return
        row = self.learn.save_run.rows[-1]
        self.trial.report(float(row[self.monitor]), step=int(row["epoch"]))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {row['epoch']}")
