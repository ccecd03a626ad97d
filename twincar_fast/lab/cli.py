"""What `twincar sweep` does with its arguments (kept here so cli.py stays parse-and-call)."""

from __future__ import annotations

import argparse

from optuna.trial import TrialState

from twincar_fast.errors import TwincarError
from twincar_fast.lab.space import SearchSpec, parse_dims, split_overrides
from twincar_fast.lab.sweep import plan_sweep, run_sweep

__all__ = ["spec_from_args", "sweep_command"]


def spec_from_args(args: argparse.Namespace) -> SearchSpec:
    """The search of `twincar sweep`'s flags (one mode; --space only with --random/--optuna)."""
    if args.grid:
        if args.space:
            raise TwincarError("--space goes with --random N or --optuna N, not with --grid")
        grid, fixed = split_overrides(args.grid, False)
        dims = parse_dims("--grid", grid, False)
        return SearchSpec("grid", dims, None, args.seeds, [*args.overrides, *fixed])
    mode, n = ("random", args.random) if args.random is not None else ("optuna", args.optuna)
    if n < 1:
        raise TwincarError(f"--{mode} N: N must be at least 1, got {n}")
    space, fixed = split_overrides(args.space, True)
    dims = parse_dims("--space", space, True)
    return SearchSpec(mode, dims, n, args.seeds, [*args.overrides, *fixed])


def sweep_command(args: argparse.Namespace) -> int:
    """Plan and run the sweep; the number of failed trials."""
    sweep = plan_sweep(args.config, spec_from_args(args), args.name, args.storage, args.prune)
    study = run_sweep(sweep, args.workers)
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - _retried(study)


def _retried(study) -> int:
    """Failed trials that were enqueued again (interrupted, then redone): not failures."""
    return sum("retry_of" in t.user_attrs for t in study.get_trials(deepcopy=False))
