"""The lab commands of `twincar` (sweep, compare): per command a parser builder and a handler that
only unpacks the arguments and calls one public function, and what `sweep` makes of its flags.

Optuna and the sweep runner load inside the handlers, so that `twincar --help` stays light.
"""

from __future__ import annotations

import argparse

from twincar_fast.data.cli import path_arg
from twincar_fast.errors import TwincarError
from twincar_fast.lab.space import SearchSpec, parse_dims, split_overrides

__all__ = ["add_compare", "add_sweep", "spec_from_args", "sweep_command"]


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
    from optuna.trial import TrialState

    from twincar_fast.lab.sweep import plan_sweep, run_sweep

    sweep = plan_sweep(args.config, spec_from_args(args), args.name, args.storage, args.prune)
    study = run_sweep(sweep, args.workers)
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - _retried(study)


def _retried(study) -> int:
    """Failed trials that were enqueued again (interrupted, then redone): not failures."""
    return sum("retry_of" in t.user_attrs for t in study.get_trials(deepcopy=False))


def _sweep(args: argparse.Namespace) -> int:
    return 1 if sweep_command(args) else 0  # 1: the sweep ran, some trials failed (see the table)


def add_sweep(sub: argparse._SubParsersAction) -> None:
    """`twincar sweep CONFIG [key=value ...] --grid/--random/--optuna ...`."""
    help = "sweep an experiment on Optuna: grid, random or TPE points, seeds, workers, resumable"
    p = sub.add_parser(
        "sweep",
        help=help,
        description=help + ". Fixed overrides (key=value) go anywhere on the line.",
        epilog="example: twincar sweep experiments/demo.yaml data.valid_pct=0.1 "
        "--grid train.lr=3e-3,1e-2 model.arch=test_resnet,resnet18 --seeds 2",
    )
    p.add_argument("config", type=path_arg, help="experiment YAML, e.g. experiments/demo.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="key=value for every trial")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--grid", nargs="+", action="extend", metavar="KEY=V1,V2", help="a grid")
    mode.add_argument("--random", type=int, metavar="N", help="N random points of --space")
    mode.add_argument("--optuna", type=int, metavar="N", help="N points of --space from TPE")
    p.add_argument(
        "--space",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=LOW:HIGH[:log]",
        help="a range (or KEY=V1,V2 choices) for --random/--optuna",
    )
    p.add_argument("--seeds", type=int, default=1, help="runs of each point (train.seed + 0..K-1)")
    p.add_argument("--name", help="the sweep's name (default: <config name>-sweep)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study (default: SQLite in the sweep)")
    p.add_argument("--workers", type=int, default=1, help="trial processes on this machine")
    p.add_argument("--prune", action="store_true", help="Optuna's median pruner, per epoch")
    p.set_defaults(func=_sweep)


def _compare(args: argparse.Namespace) -> None:
    from twincar_fast.lab.compare import compare_runs

    compare_runs(args.dirs, args.out)


def add_compare(sub: argparse._SubParsersAction) -> None:
    """`twincar compare DIR ...`."""
    help = "compare runs and sweeps side by side: table, compare.csv, compare.html with curves"
    p = sub.add_parser("compare", help=help, description=help)
    p.add_argument(
        "dirs", nargs="+", type=path_arg, help="reports/<run> or reports/<sweep> folders"
    )
    p.add_argument(
        "--out", type=path_arg, help="folder for compare.csv/.html (default: see README)"
    )
    p.set_defaults(func=_compare)
