"""`twincar lr-find`: fastai's `lr_find` on the configured learner, its plot and suggestions saved."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
from fastai.callback.schedule import minimum, slide, valley
from fastai.learner import Learner
from fastai.torch_core import set_seed

from twincar_fast.config import ExperimentConfig, save_config
from twincar_fast.console import console, plain_output, print_paths, quiet_if_plain
from twincar_fast.data import build_dls, ensure_dataset
from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path, new_run_name, write_json
from twincar_fast.model.learner import create_learner
from twincar_fast.run_folder import CONFIG_YAML, LR_FIND_JSON, LR_FIND_PNG
from twincar_fast.train.distributed import distributed

__all__ = ["lr_find_figure", "lr_find_report", "run_lr_find"]


def lr_find_figure(learn: Learner, result: dict):
    """fastai's lr_find plot, each point labelled with its name and LR as lr_find.json has them."""
    lrs = np.asarray(learn.recorder.lrs, dtype=float)
    losses = np.asarray([float(v) for v in learn.recorder.losses])
    names = {"valley": "valley", "slide": "slide", "minimum": "minimum (lowest loss)"}
    points, labels = [], []
    for key, label in names.items():
        x = result[key]
        points.append((x, float(np.interp(np.log10(x), np.log10(lrs), losses))))
        labels.append(f"{label} {x:.1e}")
    import matplotlib.pyplot as plt

    learn.recorder.plot_lr_find(suggestions=points, nms=labels)  # draws; returns no figure
    fig = plt.gcf()
    fig.axes[0].set_title(f"Learning-rate finder: loss over {len(lrs)} steps of rising LR")
    return fig


def lr_find_report(learn: Learner, out_dir: str | os.PathLike, num_it: int = 100) -> dict:
    """fastai's `lr_find` (valley, slide, minimum) → lr_find.png + lr_find.json in `out_dir`.

    `minimum` is the LR of the lowest loss, the plot's point of that name; fastai's own
    suggestion, a tenth of it, is `minimum_div10`. Weights and optimizer state are left as they
    were (fastai restores them; the optimizer's hyper-parameters, which `fit` resets to
    `learn.lr`, are restored here too).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hypers = copy.deepcopy(learn.opt.hypers) if learn.opt is not None else None
    old_path, old_model_dir = learn.path, learn.model_dir
    learn.path, learn.model_dir = out_dir, "."  # fastai's temporary save lands in out_dir
    try:
        with quiet_if_plain(learn):
            found = learn.lr_find(
                num_it=num_it, suggest_funcs=(valley, slide, minimum), show_plot=False
            )
    except IndexError:  # fastai's suggestions need about 20 recorded steps
        n = len(learn.recorder.losses)
        raise TwincarError(
            f"lr_find: only {n} steps before the loss diverged, too few to suggest an LR; "
            "try again with more steps or a smaller batch size"
        ) from None
    finally:
        learn.path, learn.model_dir = old_path, old_model_dir
        if hypers is not None:
            learn.opt.hypers = hypers
        if not plain_output():
            console.print()  # end the line of a bar that stopped early (the loss diverged)
    result = {k: float(v) for k, v in found._asdict().items()}
    result["minimum_div10"] = result["minimum"]  # fastai's suggestion: lowest-loss LR / 10
    result["minimum"] *= 10
    return _save_lr_find(learn, result, out_dir, num_it)


def _save_lr_find(learn: Learner, result: dict, out_dir: Path, num_it: int) -> dict:
    """lr_find.png and lr_find.json (which names the plot) in `out_dir`; the JSON's contents."""
    import matplotlib.pyplot as plt

    fig = lr_find_figure(learn, result)
    with atomic_path(out_dir / LR_FIND_PNG) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    result.update(num_it=num_it, plot=str(out_dir / LR_FIND_PNG))
    write_json(out_dir / LR_FIND_JSON, result)
    return result


def run_lr_find(cfg: ExperimentConfig) -> dict:
    """`twincar lr-find`: lr_find on the configured learner, saved to reports/<name>-lrfind-<stamp>/."""
    if distributed():  # fastai's lr_find under DDP hangs (fastai #3688)
        raise TwincarError(
            "lr-find runs in one process: start `twincar lr-find CONFIG` without a launcher, then "
            "train with several"
        )
    set_seed(cfg.train.seed, reproducible=True)
    data_dir = ensure_dataset(cfg)
    learn = create_learner(cfg, build_dls(cfg, data_dir))
    reports = Path(cfg.reports_dir)
    out = reports / new_run_name(f"{cfg.name or 'run'}-lrfind", [reports])
    out.mkdir(parents=True)
    save_config(cfg, out / CONFIG_YAML)
    result = lr_find_report(learn, out)
    console.print(
        f"lr_find: valley {result['valley']:.1e}, slide {result['slide']:.1e}, "
        f"minimum (lowest loss) {result['minimum']:.1e}, minimum/10 {result['minimum_div10']:.1e}"
        f"  (set train.lr, e.g. train.lr={result['valley']:.1e})",
        markup=False,
    )
    print_paths("outputs", {"plot": out / LR_FIND_PNG, "suggestions": out / LR_FIND_JSON})
    return result
