"""The analysis command of `twincar` (twins): its parser builder and a handler that only unpacks
the arguments and calls one public function.

`evaluate` and `interpret` judge a model too, but they load it (and read car boxes) through ship/,
a folder above this one, so they live in ship/cli.py.
"""

from __future__ import annotations

import argparse

from twincar_fast.data.cli import path_arg

__all__ = ["add_twins"]


def _twins(args: argparse.Namespace) -> None:
    from twincar_fast.analysis.twins import twins_run

    twins_run(args.run, pairs=args.pairs, split=args.split, data_dir=args.data, force=args.force)


def add_twins(sub: argparse._SubParsersAction) -> None:
    """`twincar twins RUN`."""
    help = (
        "find the look-alike class pairs a run mixes up and show what tells them apart (Finer-CAM)"
    )
    p = sub.add_parser(
        "twins",
        help=help,
        description=help + "; writes twins.csv, figures/twins/ and the report's Twins section",
    )
    p.add_argument("run", type=path_arg, help="a run folder (reports/<run> or models/<run>)")
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        metavar="K",
        help="how many pairs (default: the run's eval.twins, else 5)",
    )
    p.add_argument(
        "--split",
        choices=["valid", "test"],
        default=None,
        help="the images explained (default: test when the run evaluates it, else valid)",
    )
    p.add_argument(
        "--data", type=path_arg, default=None, help="prepared data set (default: the run's)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the run's twins (report table and figures, the model folder's twins.csv)",
    )
    p.set_defaults(func=_twins)
