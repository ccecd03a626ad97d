"""The commands of `twincar` that use a saved model (evaluate, interpret, predict, export,
import-torchvision, app): per command a parser builder and a handler that only unpacks the
arguments and calls one public function.

`evaluate` and `interpret` judge a model (analysis/), but they load it, and read the car boxes of
`--images`, through this folder, so they live here rather than in analysis/cli.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twincar_fast.data.cli import path_arg
from twincar_fast.errors import DataError

__all__ = [
    "add_app",
    "add_evaluate",
    "add_export",
    "add_import_torchvision",
    "add_interpret",
    "add_predict",
]


def _add_trust(p: argparse.ArgumentParser) -> None:
    """--trust-pickle, for the commands that may load learner.pkl."""
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow learner.pkl, a pickle that can run any code (default: the safe files only)",
    )


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


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """`twincar evaluate MODEL --data DIR`."""
    help = "the full metric table of a saved model on the test (or valid) split"
    p = sub.add_parser("evaluate", help=help, description=help)
    p.add_argument(
        "model", type=path_arg, help="learner.pkl, or a run folder under models/ or reports/"
    )
    p.add_argument(
        "--data", type=path_arg, required=True, help="prepared data set (annotations.csv)"
    )
    p.add_argument("--split", choices=["test", "valid"], default="test", help="default: test")
    p.add_argument(
        "--out",
        type=path_arg,
        default=None,
        help="output folder (default: the run's reports for its own data, else a new "
        "eval-<data>-<time> folder inside them)",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier evaluation there")
    _add_trust(p)
    p.set_defaults(func=_evaluate)


def _image_boxes(images: list[Path] | None, boxes: Path | None, data: Path | None) -> list | None:
    """Per image of `--images` its car box or None, read as `twincar predict` reads them."""
    if not images or (boxes is None and data is None):
        return None
    from twincar_fast.ship.boxes import image_boxes

    found = image_boxes(images, boxes, data)
    if found.problems:  # one line for the first bad box, as predict lists them
        image, why = next(iter(found.problems.items()))
        raise DataError(f"{image}: {why}; fix or drop its row in --boxes")
    return [found.boxes.get(str(f)) for f in images]


def _interpret(args: argparse.Namespace) -> None:
    from twincar_fast.analysis.interpret import interpret_run

    boxes = _image_boxes(args.images, args.boxes, args.data)
    interpret_run(args.run, images=args.images, data_dir=args.data, boxes=boxes, force=args.force)


def add_interpret(sub: argparse._SubParsersAction) -> None:
    """`twincar interpret RUN`."""
    help = "redraw plots, confusion, top losses and Grad-CAM++ from a saved model, no retraining"
    p = sub.add_parser("interpret", help=help, description=help)
    p.add_argument(
        "run", type=path_arg, help="a run folder (reports/<run> or models/<run>) or learner.pkl"
    )
    p.add_argument(
        "--images", type=path_arg, nargs="*", default=None, help="Grad-CAM++ these files too"
    )
    p.add_argument(
        "--data",
        type=path_arg,
        default=None,
        help="prepared data set (default: the run's); its boxes cut the --images it lists",
    )
    p.add_argument(
        "--boxes",
        type=path_arg,
        default=None,
        help="car boxes of the --images: a CSV image,x1,y1,x2,y2 (as for twincar predict)",
    )
    p.add_argument(
        "--force", action="store_true", help="let new twins replace the model folder's twins.csv"
    )
    p.set_defaults(func=_interpret)


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


def add_predict(sub: argparse._SubParsersAction) -> None:
    """`twincar predict MODEL PATH ...`."""
    help = "predict the class of image files with an exported model"
    p = sub.add_parser(
        "predict",
        help=help,
        description=help + "; a model trained on car-box crops needs each image's box "
        "(--boxes or --data), as in training",
    )
    p.add_argument(
        "model", type=path_arg, help="learner.pkl, model.safetensors or a models/<run> folder"
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="PATH",
        help="image files, folders (searched recursively) or quoted glob patterns ('cars/*.jpg')",
    )
    _add_predict_how(p)
    _add_trust(p)
    _add_predict_files(p)
    p.set_defaults(func=_predict)


def _add_predict_how(p: argparse.ArgumentParser) -> None:
    """predict's flags for how it predicts: top k, TTA, CAM, batch size, device, backend."""
    p.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--tta", action="store_true", help="average with the horizontally flipped image")
    p.add_argument(
        "--cam",
        type=path_arg,
        default=None,
        metavar="DIR",
        help="write a Grad-CAM++ overlay of the top class per image into DIR (torch backend)",
    )
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="default 32")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: CUDA, then MPS, then the CPU)",
    )
    p.add_argument(
        "--backend",
        choices=["torch", "onnx", "onnx-int8"],  # ship.inputs.BACKENDS (not imported: pandas)
        default="torch",
        help="torch (default), onnx or onnx-int8 (the folder's model.onnx or model.int8.onnx, "
        "see `twincar export`)",
    )


def _add_predict_files(p: argparse.ArgumentParser) -> None:
    """predict's files besides the images: their car boxes (a CSV or a data set) and the output."""
    p.add_argument(
        "--boxes",
        type=path_arg,
        default=None,
        metavar="CSV",
        help="car boxes: a CSV with columns image,x1,y1,x2,y2 (1-based inclusive pixels; image: "
        "the path as given or the file name)",
    )
    p.add_argument(
        "--data",
        type=path_arg,
        default=None,
        metavar="DIR",
        help="a prepared data set: boxes from its annotations.csv for the images it lists",
    )
    p.add_argument(
        "--out",
        type=path_arg,
        default=None,
        metavar="FILE",
        help="also write the results to FILE.csv (image,label,prob,top1,top1_prob,...) or FILE.json",
    )


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


def add_export(sub: argparse._SubParsersAction) -> None:
    """`twincar export MODEL [--int8]`."""
    help = "export a model folder to another format (ONNX), checked against PyTorch"
    p = sub.add_parser("export", help=help, description=help)
    p.add_argument(
        "model", type=path_arg, help="a models/<run> folder (model.safetensors + config.json)"
    )
    # ONNX is the one format, so the handler never reads --format; the flag stays because the
    # README, the help epilog and the ONNX error messages tell users to type `--format onnx`
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


def add_import_torchvision(sub: argparse._SubParsersAction) -> None:
    """`twincar import-torchvision CHECKPOINT --classes CSV --out DIR`."""
    help = "make a model folder from a torchvision ResNet state dict (TwinCar's checkpoint)"
    p = sub.add_parser("import-torchvision", help=help, description=help)
    p.add_argument("checkpoint", type=path_arg, help="the .pth state dict (fc: Linear or MLP)")
    p.add_argument(
        "--classes",
        type=path_arg,
        required=True,
        help="classes.csv (class_id,label) in output order",
    )
    p.add_argument("--out", type=path_arg, required=True, help="the new model folder")
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


def add_app(sub: argparse._SubParsersAction) -> None:
    """`twincar app MODEL`."""
    help = "serve the Gradio demo of a model: photo in, top 5 and Grad-CAM++ out"
    p = sub.add_parser("app", help=help, description=help + " (needs the [app] extra)")
    p.add_argument("model", type=path_arg, help="a models/<run> folder")
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
    p.add_argument(
        "--device", default=None, help="cpu, cuda ... (default: CUDA, then MPS, then the CPU)"
    )
    _add_trust(p)
    p.set_defaults(func=_app)
