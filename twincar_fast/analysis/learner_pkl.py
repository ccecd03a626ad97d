"""The one loader of fastai's exported `learner.pkl`, for evaluation and for the Predictor.

A learner.pkl is a pickle: it can run any code, so callers load only files the user named (the
Predictor asks for `trust_pickle`). Any failure to unpickle is one line that says what to do.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from fastai.learner import Learner, load_learner

from twincar_fast.errors import TwincarError

__all__ = ["load_learner_pkl"]


def load_learner_pkl(path: str | os.PathLike, cpu: bool | None = None) -> Learner:
    """fastai's `load_learner` of an exported learner, on the GPU when there is one (unless
    `cpu`); a one-line TwincarError for a file that doesn't load."""
    path = Path(path)
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's pickle warning: the user named this file
        try:
            return load_learner(path, cpu=cpu)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad model file
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise TwincarError(
                f"{path}: can't load the learner ({reason}); export it again with `twincar run`"
            ) from None
