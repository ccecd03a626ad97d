"""`twincar ...`: parse the command line and call one public function per subcommand, no logic.

Each subcommand has a parser builder (`_add_<name>`) and a `_<name>(args)` that only unpacks the
arguments and calls into the package. User mistakes (`TwincarError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from twincar_fast.config import load_config
from twincar_fast.errors import ConfigError, TwincarError

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


def _path(text: str) -> Path:
    """A path argument, `~` expanded (also when the shell didn't)."""
    return Path(text).expanduser()


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
    p.add_argument("config", type=_path, help="experiment YAML, e.g. experiments/demo.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="section.key=value overrides, e.g. train.epochs=3",
    )
    p.add_argument(
        "--resume",
        type=_path,
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
    p.add_argument("config", type=_path, help="experiment YAML")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides")
    p.set_defaults(func=_lr_find)


def _prepare(args: argparse.Namespace) -> None:
    from twincar_fast.data.prepare import prepare_dataset

    prepare_dataset(args.source, args.out, presize=args.presize)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    help = "convert a Stanford Cars download (any known layout) to annotations.csv + classes.csv"
    p = sub.add_parser("prepare", help=help, description=help)
    p.add_argument(
        "source",
        type=_path,
        help="the downloaded data set (devkit, torchvision, Kaggle, "
        "Hugging Face parquet or ImageFolder layout)",
    )
    p.add_argument("--out", type=_path, required=True, help="folder for the prepared data set")
    p.add_argument(
        "--presize",
        type=int,
        default=None,
        metavar="N",
        help="also write copies resized so the shorter side is N px (faster loading)",
    )
    p.set_defaults(func=_prepare)


def _cache(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    from twincar_fast.data.cache import cache_command

    cache_command(cfg)


def _add_cache(sub: argparse._SubParsersAction) -> None:
    help = (
        "decode the config's training images once into the image cache (data.cache) ahead of a run"
    )
    p = sub.add_parser("cache", help=help, description=help)
    p.add_argument("config", type=_path, help="experiment YAML")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides")
    p.set_defaults(func=_cache)


def _size(text: str) -> tuple[int, int]:
    """Parse WxH."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like WxH (e.g. 192x128), got {text!r}"
        ) from None
    return w, h


def _demo_data(args: argparse.Namespace) -> None:
    from twincar_fast.data.demo import make_demo_data

    make_demo_data(
        args.out, n_classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed
    )


def _add_demo_data(sub: argparse._SubParsersAction) -> None:
    help = "draw the synthetic fine-grained 'cars' demo set in the original devkit layout"
    p = sub.add_parser("demo-data", help=help, description=help)
    p.add_argument("--out", type=_path, required=True, help="folder to write the raw demo set to")
    p.add_argument("--classes", type=int, default=12, help="number of classes (default 12)")
    p.add_argument(
        "--per-class", type=int, default=40, help="images per class and split (default 40)"
    )
    p.add_argument(
        "--size", type=_size, default=(192, 128), help="image size WxH (default 192x128)"
    )
    p.add_argument("--seed", type=int, default=0, help="drawing seed (default 0)")
    p.set_defaults(func=_demo_data)


def _evaluate(args: argparse.Namespace) -> None:
    from twincar_fast.ship.saved import evaluate

    evaluate(
        args.model,
        args.data,
        split=args.split,
        out_dir=args.out,
        trust_pickle=args.trust_pickle,
        force=args.force,
    )


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow learner.pkl, a pickle that can run any code (default: the safe files only)",
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    help = "the full metric table of a saved model on the test (or valid) split"
    p = sub.add_parser("evaluate", help=help, description=help)
    p.add_argument(
        "model", type=_path, help="learner.pkl, or a run folder under models/ or reports/"
    )
    p.add_argument("--data", type=_path, required=True, help="prepared data set (annotations.csv)")
    p.add_argument("--split", choices=["test", "valid"], default="test", help="default: test")
    p.add_argument(
        "--out",
        type=_path,
        default=None,
        help="output folder (default: the run's reports for its own data, else a new "
        "eval-<data>-<time> folder inside them)",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier evaluation there")
    _add_trust(p)
    p.set_defaults(func=_evaluate)


def _interpret(args: argparse.Namespace) -> None:
    from twincar_fast.analysis.interpret import interpret_run
    from twincar_fast.errors import DataError
    from twincar_fast.ship.boxes import image_boxes

    boxes = None
    if args.images and (args.boxes is not None or args.data is not None):
        found = image_boxes(args.images, args.boxes, args.data)  # `twincar predict`'s, alike
        if found.problems:  # one line for the first bad box, as predict lists them
            image, why = next(iter(found.problems.items()))
            raise DataError(f"{image}: {why}; fix or drop its row in --boxes")
        boxes = [found.boxes.get(str(f)) for f in args.images]
    interpret_run(args.run, images=args.images, data_dir=args.data, boxes=boxes, force=args.force)


def _add_interpret(sub: argparse._SubParsersAction) -> None:
    help = "redraw plots, confusion, top losses and Grad-CAM++ from a saved model, no retraining"
    p = sub.add_parser("interpret", help=help, description=help)
    p.add_argument(
        "run", type=_path, help="a run folder (reports/<run> or models/<run>) or learner.pkl"
    )
    p.add_argument(
        "--images", type=_path, nargs="*", default=None, help="Grad-CAM++ these files too"
    )
    p.add_argument(
        "--data",
        type=_path,
        default=None,
        help="prepared data set (default: the run's); its boxes cut the --images it lists",
    )
    p.add_argument(
        "--boxes",
        type=_path,
        default=None,
        help="car boxes of the --images: a CSV image,x1,y1,x2,y2 (as for twincar predict)",
    )
    p.add_argument(
        "--force", action="store_true", help="let new twins replace the model folder's twins.csv"
    )
    p.set_defaults(func=_interpret)


def _twins(args: argparse.Namespace) -> None:
    from twincar_fast.analysis.twins import twins_run

    twins_run(args.run, pairs=args.pairs, split=args.split, data_dir=args.data, force=args.force)


def _add_twins(sub: argparse._SubParsersAction) -> None:
    help = (
        "find the look-alike class pairs a run mixes up and show what tells them apart (Finer-CAM)"
    )
    p = sub.add_parser(
        "twins",
        help=help,
        description=help + "; writes twins.csv, figures/twins/ and the report's Twins section",
    )
    p.add_argument("run", type=_path, help="a run folder (reports/<run> or models/<run>)")
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
        "--data", type=_path, default=None, help="prepared data set (default: the run's)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the run's twins (report table and figures, the model folder's twins.csv)",
    )
    p.set_defaults(func=_twins)


def _predict(args: argparse.Namespace) -> int:
    from twincar_fast.ship.batch import predict_files

    rows = predict_files(
        args.model,
        args.images,
        top_k=args.top_k,
        boxes=args.boxes,
        data=args.data,
        out=args.out,
        trust_pickle=args.trust_pickle,
        tta=args.tta,
        cam=args.cam,
        batch_size=args.batch_size,
        device=args.device,
        backend=args.backend,
    )
    return 1 if any("error" in r for r in rows) else 0  # 1: some images could not be read


def _add_predict(sub: argparse._SubParsersAction) -> None:
    help = "predict the class of image files with an exported model"
    p = sub.add_parser(
        "predict",
        help=help,
        description=help + "; a model trained on car-box crops needs each image's box "
        "(--boxes or --data), as in training",
    )
    p.add_argument(
        "model", type=_path, help="learner.pkl, model.safetensors or a models/<run> folder"
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="PATH",
        help="image files, folders (searched recursively) or quoted glob patterns ('cars/*.jpg')",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument(
        "--cam",
        type=_path,
        default=None,
        metavar="DIR",
        help="write a Grad-CAM++ overlay of the top class per image into DIR (torch backend)",
    )
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="default 32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if any)")
    p.add_argument(
        "--backend",
        choices=["torch", "onnx", "onnx-int8"],  # ship.inputs.BACKENDS (not imported: pandas)
        default="torch",
        help="torch (default), onnx or onnx-int8 (the folder's model.onnx or model.int8.onnx, "
        "see `twincar export`)",
    )
    _add_trust(p)
    p.add_argument(
        "--boxes",
        type=_path,
        default=None,
        metavar="CSV",
        help="car boxes: a CSV with columns image,x1,y1,x2,y2 (1-based inclusive pixels; image: "
        "the path as given or the file name)",
    )
    p.add_argument(
        "--data",
        type=_path,
        default=None,
        metavar="DIR",
        help="a prepared data set: boxes from its annotations.csv for the images it lists",
    )
    p.add_argument(
        "--out",
        type=_path,
        default=None,
        metavar="FILE",
        help="also write the results to FILE.csv (image,label,prob,top1,top1_prob,...) or FILE.json",
    )
    p.set_defaults(func=_predict)


def _export(args: argparse.Namespace) -> None:
    from twincar_fast.ship.onnx import export_onnx
    from twincar_fast.ship.onnx_predict import ONNX_FILE

    # --int8 builds on the folder's model.onnx: made here unless it is already there
    if args.force or not args.int8 or not (args.model / ONNX_FILE).exists():
        print(f"checked, ONNX → {export_onnx(args.model, opset=args.opset, force=args.force)}")
    if args.int8:
        from twincar_fast.ship.quantize import quantize_onnx

        out, check = quantize_onnx(args.model, force=args.force, min_top1=args.int8_min_top1)
        print(f"checked (top-1 equal on {check['top1_equal']} test images), int8 ONNX → {out}")


def _add_export(sub: argparse._SubParsersAction) -> None:
    help = "export a model folder to another format (ONNX), checked against PyTorch"
    p = sub.add_parser("export", help=help, description=help)
    p.add_argument(
        "model", type=_path, help="a models/<run> folder (model.safetensors + config.json)"
    )
    p.add_argument("--format", choices=["onnx"], default="onnx", help="default: onnx")
    p.add_argument(
        "--opset", type=int, default=None, metavar="N", help="ONNX opset (default: torch's)"
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx: int8, calibrated on the run's training images, "
        "several times faster on CPUs (then `predict --backend onnx-int8`)",
    )
    p.add_argument(
        "--int8-min-top1",
        type=float,
        default=None,
        metavar="P",
        help="share of test images whose int8 top-1 must equal PyTorch's (default 0.95)",
    )
    p.add_argument("--force", action="store_true", help="replace existing ONNX files")
    p.set_defaults(func=_export)


def _import_torchvision(args: argparse.Namespace) -> None:
    from twincar_fast.ship.checkpoint import import_torchvision

    out = import_torchvision(args.checkpoint, args.classes, args.out, arch=args.arch)
    print(f"model folder → {out}")


def _add_import_torchvision(sub: argparse._SubParsersAction) -> None:
    help = "make a model folder from a torchvision ResNet state dict (TwinCar's checkpoint)"
    p = sub.add_parser("import-torchvision", help=help, description=help)
    p.add_argument("checkpoint", type=_path, help="the .pth state dict (fc: Linear or MLP)")
    p.add_argument(
        "--classes", type=_path, required=True, help="classes.csv (class_id,label) in output order"
    )
    p.add_argument("--out", type=_path, required=True, help="the new model folder")
    p.add_argument("--arch", default="resnet50", help="the ResNet's name (default resnet50)")
    p.set_defaults(func=_import_torchvision)


def _app(args: argparse.Namespace) -> None:
    from twincar_fast.ship.app import launch_app

    launch_app(
        args.model,
        host=args.host,
        port=args.port,
        trust_pickle=args.trust_pickle,
        max_file_size=args.max_file_size,
        device=args.device,
        max_pixels=args.max_pixels,
    )


def _add_app(sub: argparse._SubParsersAction) -> None:
    help = "serve the Gradio demo of a model: photo in, top 5 and Grad-CAM++ out"
    p = sub.add_parser("app", help=help, description=help + " (needs the [app] extra)")
    p.add_argument("model", type=_path, help="a models/<run> folder")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="default 7860")
    p.add_argument("--max-file-size", default="10mb", help="largest upload (default 10mb)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=40_000_000,
        help="most pixels (width × height, read from the header) an upload may have "
        "(default 40000000)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA if any)")
    _add_trust(p)
    p.set_defaults(func=_app)


# ---------------------------------------------------------------- entry point


def _sweep(args: argparse.Namespace) -> int:
    from twincar_fast.lab.cli import sweep_command

    return 1 if sweep_command(args) else 0  # 1: the sweep ran, some trials failed (see the table)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    help = "sweep an experiment on Optuna: grid, random or TPE points, seeds, workers, resumable"
    p = sub.add_parser(
        "sweep",
        help=help,
        description=help + ". Fixed overrides (key=value) go anywhere on the line.",
        epilog="example: twincar sweep experiments/demo.yaml data.valid_pct=0.1 "
        "--grid train.lr=3e-3,1e-2 model.arch=test_resnet,resnet18 --seeds 2",
    )
    p.add_argument("config", type=_path, help="experiment YAML, e.g. experiments/demo.yaml")
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


def _add_compare(sub: argparse._SubParsersAction) -> None:
    help = "compare runs and sweeps side by side: table, compare.csv, compare.html with curves"
    p = sub.add_parser("compare", help=help, description=help)
    p.add_argument("dirs", nargs="+", type=_path, help="reports/<run> or reports/<sweep> folders")
    p.add_argument("--out", type=_path, help="folder for compare.csv/.html (default: see README)")
    p.set_defaults(func=_compare)


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
    _add_prepare(sub)
    _add_cache(sub)
    _add_demo_data(sub)
    _add_evaluate(sub)
    _add_interpret(sub)
    _add_twins(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_import_torchvision(sub)
    _add_app(sub)
    _add_sweep(sub)
    _add_compare(sub)
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
