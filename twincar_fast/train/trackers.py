"""Experiment trackers a run feeds (`log: [tensorboard, wandb, mlflow]`), each an optional extra.

Every tracker gets each committed epoch's metrics.csv row (the values the run folder keeps, step =
the epoch), the resolved config as parameters, and at the end the run's outputs where it stores
files. TensorBoard and W&B go through fastai's own callbacks (their per-batch loss and LR logging
kept; their per-epoch logging replaced by the metrics.csv row, which they don't know); MLflow,
which fastai lacks, is a small callback over `MlflowClient` with a local SQLite store under
`<reports_dir>/mlruns` unless `MLFLOW_TRACKING_URI` says otherwise.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

from fastai.callback.core import Callback

from twincar_fast.config import ExperimentConfig, config_to_dict, flat_dict
from twincar_fast.console import console
from twincar_fast.errors import TwincarError
from twincar_fast.run_folder import RunFolder
from twincar_fast.train.callbacks import SaveRun, epoch_skipped

__all__ = ["check_trackers", "flat_config", "make_trackers"]

_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_ORDER = SaveRun.order + 1  # the epoch's row is in `learn.save_run.rows`


def check_trackers(cfg: ExperimentConfig) -> None:
    """A one-line error naming the extra for a tracker in `log` whose package is missing."""
    for name in cfg.log:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise TwincarError(
                f'log: {name} is not installed; pip install -e ".[{name}]" (or drop it from log)'
            )


def flat_config(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as {'section.key': text}, a tracker's parameters."""
    return {k: str(v) for k, v in sorted(flat_dict(config_to_dict(cfg)).items())}


def _epoch_row(learn) -> dict[str, float] | None:
    """The epoch's metrics.csv row (finite values only), or None for a skipped epoch."""
    if epoch_skipped(learn):
        return None
    row = learn.save_run.rows[-1]
    return {k: float(v) for k, v in row.items() if k != "epoch" and math.isfinite(float(v))} | {
        "epoch": int(row["epoch"])
    }


class Tracker(Callback):
    """A tracker's end-of-run hook: the outputs after the report, and the run's status."""

    order = _ORDER

    def finish(self, paths: dict[str, Path], ok: bool) -> None:
        """Called once by `run_experiment` when the run ends (ok) or fails."""


def _tensorboard(cfg: ExperimentConfig, folders: RunFolder) -> Tracker:
    from fastai.callback.tensorboard import TensorBoardCallback

    class TensorBoardLog(TensorBoardCallback, Tracker):
        """fastai's TensorBoard callback, logging metrics.csv's row per epoch under `epoch/`."""

        order = _ORDER

        def after_epoch(self):
            row = _epoch_row(self.learn)
            for k, v in (row or {}).items():
                if k != "epoch":
                    self.writer.add_scalar(f"epoch/{k}", v, row["epoch"])
            self.writer.flush()

    log_dir = folders.report_dir / "tensorboard"
    console.print(f"tensorboard: tensorboard --logdir {log_dir}", markup=False)
    return TensorBoardLog(log_dir=str(log_dir), trace_model=False, log_preds=False)


def _wandb_init(cfg: ExperimentConfig, folders: RunFolder) -> None:
    """Start (or, on resume, continue) the run's W&B run: offline without an API key."""
    import wandb

    offline = not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ
    wandb.init(
        project=os.environ.get("WANDB_PROJECT", "twincar_fast"),
        name=folders.name,
        id=folders.name.replace(".", "-"),
        resume="allow",  # a resumed run continues its own W&B run
        dir=str(folders.report_dir),
        config=flat_config(cfg),
        mode="offline" if offline else None,
    )
    if offline:
        console.print(
            f"wandb: no WANDB_API_KEY, logging offline; later: wandb sync {folders.report_dir / 'wandb'}",
            markup=False,
        )


def _wandb(cfg: ExperimentConfig, folders: RunFolder) -> Tracker:
    import wandb
    from fastai.callback.wandb import WandbCallback

    class WandbLog(WandbCallback, Tracker):
        """fastai's W&B callback; the run starts on first fit, each epoch logs metrics.csv's row."""

        order = _ORDER

        def before_fit(self):
            if wandb.run is None:
                _wandb_init(cfg, folders)
            # fastai's own before_fit logs `learn.gather_args()`, which fails on our callbacks'
            # attributes; the config is logged above, so only its step counters are set here
            self._wandb_step = wandb.run.step - 1
            self._wandb_epoch = 0
            self.run = not hasattr(self.learn, "lr_finder")

        def after_epoch(self):
            row = _epoch_row(self.learn)
            if row is not None:
                wandb.log({f"epoch/{k}": v for k, v in row.items()}, step=self._wandb_step)

        def finish(self, paths: dict[str, Path], ok: bool) -> None:
            if wandb.run is not None:
                wandb.finish(exit_code=0 if ok else 1)

    return WandbLog(log=None, log_preds=False, log_model=False)


class MlflowLog(Tracker):
    """Params = the resolved config, metrics = metrics.csv per epoch, artifacts = the outputs."""

    def __init__(self, cfg: ExperimentConfig, folders: RunFolder):
        from mlflow.tracking import MlflowClient

        store = Path(cfg.reports_dir).resolve() / "mlruns"
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
        self.client, self.folders, self.cfg = MlflowClient(tracking_uri=uri), folders, cfg
        self.run_id = self._run_id(store)
        console.print(f"mlflow: run {self.run_id} in {uri}", markup=False)

    def _run_id(self, store: Path) -> str:
        """This run's MLflow run: the one a resumed run made before, else a new one."""
        saved = self.folders.report_dir / "mlflow_run_id"
        if saved.is_file():
            return saved.read_text().strip()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "twincar_fast")
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            loc = (
                (store / "artifacts").as_uri() if "MLFLOW_TRACKING_URI" not in os.environ else None
            )
            exp_id = self.client.create_experiment(name, artifact_location=loc)
        else:
            exp_id = exp.experiment_id
        from mlflow.entities import Param

        run = self.client.create_run(exp_id, run_name=self.folders.name)
        params = [Param(k, v[:6000]) for k, v in flat_config(self.cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        saved.write_text(run.info.run_id)
        return run.info.run_id

    def after_epoch(self):
        row = _epoch_row(self.learn)
        if row is None:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), row.pop("epoch")
        metrics = [Metric(k, v, now, step) for k, v in row.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, paths: dict[str, Path], ok: bool) -> None:
        if ok:
            run = self.folders
            for f in (run.summary_json, run.eval_json("test"), run.metrics_csv, run.config_yaml):
                if f.is_file():
                    self.client.log_artifact(self.run_id, str(f))
            if run.figures_dir.is_dir():
                self.client.log_artifacts(self.run_id, str(run.figures_dir), "figures")
            model_files = [p for p in self.folders.model_dir.iterdir() if p.is_file()]
            for p in model_files:  # the model folder, without its training checkpoints
                self.client.log_artifact(self.run_id, str(p), "model")
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def make_trackers(cfg: ExperimentConfig, folders: RunFolder) -> list[Tracker]:
    """The callbacks of the trackers named in `cfg.log`."""
    makers = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": MlflowLog}
    return [makers[name](cfg, folders) for name in cfg.log]
