"""The data commands of `twincar` (prepare, cache, demo-data): per command a parser builder and a
handler that only unpacks the arguments and calls one public function.

`path_arg` lives here, in the lowest stage folder with commands, so that every command group may use
it without importing upward.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twincar_fast.config import load_config

__all__ = ["add_cache", "add_demo_data", "add_prepare", "path_arg"]


def path_arg(text: str) -> Path:
    """A path argument, `~` expanded (also when the shell didn't)."""
    return Path(text).expanduser()


def _prepare(args: argparse.Namespace) -> None:
    from twincar_fast.data.prepare import prepare_dataset

    prepare_dataset(args.source, args.out, presize=args.presize)


def add_prepare(sub: argparse._SubParsersAction) -> None:
    """`twincar prepare SOURCE --out DIR`."""
    help = "convert a Stanford Cars download (any known layout) to annotations.csv + classes.csv"
    p = sub.add_parser("prepare", help=help, description=help)
    p.add_argument(
        "source",
        type=path_arg,
        help="the downloaded data set (devkit, torchvision, Kaggle, "
        "Hugging Face parquet or ImageFolder layout)",
    )
    p.add_argument("--out", type=path_arg, required=True, help="folder for the prepared data set")
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


def add_cache(sub: argparse._SubParsersAction) -> None:
    """`twincar cache CONFIG [key=value ...]`."""
    help = (
        "decode the config's training images once into the image cache (data.cache) ahead of a run"
    )
    p = sub.add_parser("cache", help=help, description=help)
    p.add_argument("config", type=path_arg, help="experiment YAML")
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


def add_demo_data(sub: argparse._SubParsersAction) -> None:
    """`twincar demo-data --out DIR`."""
    help = "draw the synthetic fine-grained 'cars' demo set in the original devkit layout"
    p = sub.add_parser("demo-data", help=help, description=help)
    p.add_argument(
        "--out", type=path_arg, required=True, help="folder to write the raw demo set to"
    )
    p.add_argument("--classes", type=int, default=12, help="number of classes (default 12)")
    p.add_argument(
        "--per-class", type=int, default=40, help="images per class and split (default 40)"
    )
    p.add_argument(
        "--size", type=_size, default=(192, 128), help="image size WxH (default 192x128)"
    )
    p.add_argument("--seed", type=int, default=0, help="drawing seed (default 0)")
    p.set_defaults(func=_demo_data)
