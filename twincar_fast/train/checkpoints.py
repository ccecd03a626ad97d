"""Training checkpoints: weights, optimizer, EMA and every random stream, saved atomically per epoch.

`SaveRun` (train.callbacks) writes them; a resumed run loads the last one, so the next epoch draws
what the uninterrupted run would have.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from fastai.learner import Learner
from fastai.torch_core import get_model

from twincar_fast.errors import TwincarError
from twincar_fast.files import atomic_path
from twincar_fast.train.distributed import gather_objects, own_rng, unwrapped

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def rng_state(learn: Learner) -> dict:
    """Every random state the next epoch draws from: Python, NumPy, torch (CPU, CUDA), the loaders;
    with several processes also every rank's, under "ranks" (a collective: call it on each)."""
    own = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "dls": [unwrapped(dl).rng.getstate() for dl in learn.dls.loaders],  # shuffle generators
    }
    return {**own, "ranks": gather_objects(own)}


def set_rng_state(learn: Learner, state: dict) -> None:
    """Restore a `rng_state`, so a resumed fit draws what the uninterrupted one would have: this
    rank's own when the same number of processes saved it (else rank 0's, as one process)."""
    state = own_rng(learn, state)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, s in zip(learn.dls.loaders, state["dls"], strict=False):
        unwrapped(dl).rng.setstate(s)


def save_checkpoint(
    learn: Learner, path: Path, with_opt: bool = True, rng: dict | None = None, best: bool = False
) -> Path:
    """`learn.save`'s file (model + optimizer state, and `rng`, a `rng_state`), atomically.

    With weight EMA on (`train.recipe.EmaWeights`), a `best` checkpoint's model is the EMA's (the
    weights the run evaluates and ships); any other keeps the raw weights and the EMA beside them.
    """
    ema = getattr(learn, "ema_weights", None)
    model = ema.module if best and ema is not None else get_model(learn.model)
    state = {"model": model.state_dict()}
    if ema is not None and not best:
        state["ema"] = ema.state()
    if with_opt and getattr(learn, "opt", None) is not None:
        state["opt"] = learn.opt.state_dict()
    if rng is not None:
        state["rng"] = rng
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(learn: Learner, path: Path, with_opt: bool = True) -> dict | None:
    """Load a `save_checkpoint` file into `learn` (on its device); its random states, if saved."""
    if learn.opt is None:
        learn.create_opt()
    device = getattr(learn.dls, "device", None) or "cpu"
    try:  # the file is ours (a checkpoint of this run), and holds NumPy's random state
        state = torch.load(path, map_location=device, weights_only=False)
        get_model(learn.model).load_state_dict(state.get("model", state))
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError) as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise TwincarError(
            f"{path}: damaged checkpoint ({reason}); delete the run's checkpoints and start a new run"
        ) from None
    if with_opt and "opt" in state:
        learn.opt.load_state_dict(state["opt"])
    ema = getattr(learn, "ema_weights", None)
    if with_opt and ema is not None and "ema" in state:
        ema.load_state(state["ema"])
    return state.get("rng")
