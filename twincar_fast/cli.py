"""`twincar ...`: parse the command line and call one public function per subcommand, no logic.

Each subcommand has a parser builder (`add_<name>`) and a `_<name>(args)` that only unpacks the
arguments and calls into the package, kept beside the code it calls: data/cli.py (prepare, cache,
demo-data), analysis/cli.py (twins), ship/cli.py (evaluate, interpret, predict, export,
import-torchvision, app), lab/cli.py (sweep, compare); run, train and lr-find, which run a whole
experiment, stay here. User mistakes (`TwincarError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from twincar_fast.analysis.cli import add_twins
from twincar_fast.config import load_config
from twincar_fast.data.cli import add_cache, add_demo_data, add_prepare, path_arg
from twincar_fast.errors import ConfigError, TwincarError
from twincar_fast.lab.cli import add_compare, add_sweep
from twincar_fast.ship.cli import (
    add_app,
    add_evaluate,
    add_export,
    add_import_torchvision,
    add_interpret,
    add_predict,
)

DESCRIPTION = """Fine-grained car recognition (Stanford Cars 196) with fastai + timm.
One experiment YAML trains, evaluates, interprets and exports a model; the other commands
prepare data, evaluate, redraw reports and predict with a saved model."""
EPILOG = """common commands:
  twincar run experiments/demo.yaml
      the whole pipeline on the synthetic demo set (no downloads): train, test, report, export
  twincar train experiments/baseline.yaml --processes 4
      the same run on 4 GPUs (DDP through Accelerate; data.batch_size is per process)
  twincar evaluate models/<run> --data data/stanford_cars
      the full metric table of a saved model on the official test split
  twincar twins reports/<run> --pairs 5
      the look-alike classes the model mixes up, and what tells each pair apart (Finer-CAM)
  twincar predict models/<run> photos/ --out preds.csv
      classify photos: files, folders, globs (a model trained on car-box crops needs boxes)
  twincar export models/<run> --format onnx [--int8]
      add a checked model.onnx (and its int8 copy) to the folder (then `predict --backend onnx`)

`twincar COMMAND --help` lists a command's options."""

# ---------------------------------------------------------------- subcommands


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser: `key=value` overrides may come anywhere on the line, also after
    the flags (argparse's intermixed parsing), when the subcommand takes overrides."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        takes_overrides = any(a.dest == "overrides" for a in self._actions)
        if self._inside or not takes_overrides:
            return super().parse_known_args(args, namespace)
        self._inside = True  # the intermixed parse calls parse_known_args itself, twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _run(args: argparse.Namespace) -> int | None:
    if args.processes < 1:
        raise TwincarError(f"--processes must be at least 1, got {args.processes}")
    cfg = load_config(args.config, args.overrides)  # before the heavy imports: fail fast
    if args.resume is not None:  # ... also on a finished or wrong run folder
        from twincar_fast.run_folder import open_resume

        open_resume(args.resume, cfg)
    if args.processes > 1:
        from twincar_fast.train.distributed import launch

        resume = ["--resume", str(args.resume)] if args.resume is not None else []
        argv = [str(args.config), *args.overrides, *resume]
        return launch(args.processes, argv, cfg, args.resume)
    from twincar_fast.experiment import run_experiment

    run_experiment(cfg, resume=args.resume)
    return None


def _add_run(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("config", type=path_arg, help="experiment YAML, e.g. experiments/demo.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="section.key=value overrides, e.g. train.epochs=3",
    )
    p.add_argument(
        "--resume",
        type=path_arg,
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run from its last saved epoch",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="train in N processes through Accelerate (one GPU each; gloo on CPUs); "
        "data.batch_size is per process",
    )
    p.set_defaults(func=_run)


def _lr_find(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from twincar_fast.experiment import run_lr_find

    run_lr_find(cfg)


def _add_lr_find(sub: argparse._SubParsersAction) -> None:
    help = "run fastai's lr_find on the configured learner; save the plot and suggestions"
    p = sub.add_parser("lr-find", help=help, description=help)
    p.add_argument("config", type=path_arg, help="experiment YAML")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides")
    p.set_defaults(func=_lr_find)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The `twincar` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="twincar",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the epilog's lines
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_run(sub, "run", "train, evaluate, interpret and export one experiment")
    _add_run(sub, "train", "same as run (train, evaluate, interpret, export); --resume continues")
    _add_lr_find(sub)
    add_prepare(sub)
    add_cache(sub)
    add_demo_data(sub)
    add_evaluate(sub)
    add_interpret(sub)
    add_twins(sub)
    add_predict(sub)
    add_export(sub)
    add_import_torchvision(sub)
    add_app(sub)
    add_sweep(sub)
    add_compare(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `twincar` command line; return the exit code."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args)
    except TwincarError as e:
        if not (isinstance(e, ConfigError) and os.environ.get("RANK", "0") != "0"):
            print(f"twincar: error: {e}", file=sys.stderr)  # (a config error: rank 0's line)
        return 2
    except KeyboardInterrupt:
        print("twincar: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the file system said no (read-only, a file where a folder goes, ...)
        if e.filename is None:
            raise
        print(f"twincar: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
