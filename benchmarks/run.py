"""`python -m benchmarks.run [--quick]`: our toolkit vs. TwinCar's plain PyTorch pipeline, side by side.

Runs every benchmark on both sides in this one run, prints a table and writes
`reports/benchmarks/<timestamp>.json`:
`{"machine", "settings", "data", "cache_build", "data_pipeline", "train_epoch",
"predict_single", "predict_batch", "peak_rss_mb", "goals"}`; each comparison holds `ours`,
`reference`, `unit`, `ratio` (> 1: ours is better) and the images each side processed;
`train_epoch` also holds `limit` (the same learner on in-memory random batches) and
`ratio_to_limit` (limit / ours: 1 = the loader costs nothing; from epochs in turns, `limit_turns`);
`predict_single` holds `limit_ms` (decode + resize + the bare forward) and `ratio_to_limit`, and
both predict entries the ONNX backend's figure (`onnx`) and `onnx_vs_torch` (> 1: ONNX is
faster); `predict_batch` also holds `onnx_forward_ceiling` (the bare forward of one batch in
both runtimes: what bounds `onnx_vs_torch`) and the int8 model's `onnx_int8`,
`onnx_int8_vs_torch` and `onnx_int8_check`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.data import (
    DEFAULT_ROOT,
    bench_dataset,
    image_stats,
    presize_seconds,
    presized_dataset,
)
from benchmarks.measure import machine_info
from benchmarks.settings import Settings, settings_for
from twincar_fast.files import write_json

DEFAULT_OUT = Path("reports/benchmarks")
RESULT_KEYS = ("data_pipeline", "train_epoch", "predict_single", "predict_batch", "peak_rss_mb")
# The goals, as minimum ratios (ours better when > 1).
GOALS = {
    "data_pipeline": (5.0, "≥ 5×"),
    "train_epoch": (1.5, "≥ 1.5×"),
    "train_epoch_to_limit": (0.9, "≥ 0.9 of the limit"),
    "predict_single": (1 / 1.2, "≤ 1.2× slower"),
    "predict_single_to_limit": (1 / 1.1, "≤ 1.1× the limit"),
    "predict_batch": (1.0, "≥ 1×"),
    "predict_batch_onnx_vs_torch": (1.5, "≥ 1.5×"),
}  # learn.predict's ratio stays in the JSON and the table as information (its 5× goal is retired)


def goals(results: dict) -> dict:
    """Each goal's ratio, target and whether it is met."""
    ratios = {k: results[k]["ratio"] for k in GOALS if k in results}
    if "predict_single" in results:
        ratios["predict_single_to_limit"] = results["predict_single"]["ratio_to_limit"]
    if "predict_batch" in results:
        ratios["predict_batch_onnx_vs_torch"] = results["predict_batch"]["onnx_vs_torch"]
    if "train_epoch" in results:
        ratios["train_epoch_to_limit"] = results["train_epoch"]["ratio_to_limit"]
    return {
        k: {"ratio": r, "target": GOALS[k][0], "goal": GOALS[k][1], "met": r >= GOALS[k][0]}
        for k, r in ratios.items()
    }


def _variants(s: Settings, data_root: str | os.PathLike, ablations: bool) -> dict:
    """Extra pipeline runs: ours with fastai's batch-stage augmentation, our item work in a plain
    torch DataLoader, ours on a `prepare --presize` copy; with ablations, draft off too."""
    out: dict = {
        "ours_per_item": {"cache": "off"},
        "ours_batched": {"cache_aug": "batched"},  # the GPU's batched augmentation, here too
        "ours_batch_stage": {"aug": {"stage": "batch"}},
        "plain_torch_items": {},
    }
    if s.presize:
        presized = presized_dataset(s.data, s.presize, data_root)
        out[f"ours_presized_{s.presize}"] = {"root": str(presized)}
    if ablations:
        out["ours_no_draft"] = {"draft": False}
        if s.presize:
            out[f"reference_presized_{s.presize}"] = dict(out[f"ours_presized_{s.presize}"])
    return out


def run_benchmarks(s: Settings, data_root: str | os.PathLike, ablations: bool = False) -> dict:
    """Every benchmark on both sides; the JSON-ready results."""
    from benchmarks.inference import bench_predict
    from benchmarks.pipeline import bench_cache_build, bench_pipeline
    from benchmarks.training import bench_training

    console = Console(stderr=True)
    start = time.perf_counter()
    data_dir = bench_dataset(s.data, data_root)
    variants = _variants(s, data_root, ablations)
    out = {"machine": machine_info(), "settings": dataclasses.asdict(s)}
    out["data"] = image_stats(data_dir) | {"dir": str(data_dir)}
    if s.presize:
        presized = presized_dataset(s.data, s.presize, data_root)
        out["data"]["presize_one_time_s"] = presize_seconds(presized)
    console.print(f"[bold]1/3[/] data pipeline … ({time.perf_counter() - start:.0f} s)")
    out["cache_build"] = bench_cache_build(s, data_dir)
    out["data_pipeline"] = bench_pipeline(s, data_dir, variants)
    console.print(
        f"[bold]2/3[/] training epoch and memory, each side in its own process … "
        f"({time.perf_counter() - start:.0f} s)"
    )
    out["train_epoch"], out["peak_rss_mb"] = bench_training(s, data_dir)
    console.print(f"[bold]3/3[/] prediction … ({time.perf_counter() - start:.0f} s)")
    out["predict_single"], out["predict_batch"] = bench_predict(s, data_dir)
    out["goals"] = goals(out)
    out["wall_time_s"] = round(time.perf_counter() - start, 1)
    return out


def _fmt(v) -> str:
    """A figure for the table."""
    return f"{v:,.1f}" if isinstance(v, float) else str(v)


def _row(table: Table, name: str, ours, ref, unit: str, ratio: float, goal: dict) -> None:
    """One table row: both figures, the ratio, and the goal with whether it is met (if any)."""
    met = {True: "[green]yes[/]", False: "[red]no[/]"}.get(goal.get("met"), "")
    table.add_row(name, _fmt(ours), _fmt(ref), unit, f"{ratio:.2f}×", goal.get("goal", ""), met)


def print_table(results: dict) -> None:
    """Both sides' figures, the ratios and the goals as a rich table."""
    table = Table(title=f"twincar_fast vs. TwinCar reference ({results['settings']['mode']})")
    for col in ("benchmark", "ours", "reference", "unit", "ratio", "goal", "met"):
        table.add_column(col, justify="left" if col in ("benchmark", "goal") else "right")
    g = results["goals"]
    for key in RESULT_KEYS:
        r = results[key]
        _row(table, key, r["ours"], r["reference"], r["unit"], r["ratio"], g.get(key, {}))
        if key == "train_epoch":
            f = g["train_epoch_to_limit"]
            turns = r["limit_turns"]  # in turns in one process: the ratio's own figures
            _row(
                table,
                "  vs the limit (in turns)",
                turns["ours"],
                turns["limit"],
                "s",
                f["ratio"],
                f,
            )
        if key == "predict_single":
            f = g["predict_single_to_limit"]
            _row(table, "  vs the limit", r["ours"], r["limit_ms"], "ms", f["ratio"], f)
            _row(table, "  onnx vs ours", r["onnx"], r["ours"], "ms", r["onnx_vs_torch"], {})
            _row(
                table, "  vs learn.predict", r["ours"], r["fastai"], "ms", r["ratio_vs_fastai"], {}
            )
            ceiling = r["ratio_vs_fastai_ceiling"]
            _row(table, "    ceiling: model alone", r["forward_ms"], r["fastai"], "ms", ceiling, {})
        if key == "predict_batch":
            f = g["predict_batch_onnx_vs_torch"]
            _row(table, "  onnx vs ours", r["onnx"], r["ours"], "img/s", f["ratio"], f)
            c = r["onnx_forward_ceiling"]  # what bounds the row above
            _row(
                table,
                "    ceiling: bare forward",
                c["onnx_ms"],
                c["torch_ms"],
                "ms",
                c["ratio"],
                {},
            )
            q = r["onnx_int8_vs_torch"]
            _row(table, "  onnx int8 vs ours", r["onnx_int8"], r["ours"], "img/s", q, {})
    ref = results["data_pipeline"]["reference"]
    for name, v in results["data_pipeline"].get("variants", {}).items():
        if name not in ("ours", "reference"):
            ratio = f"{v['img_per_s'] / ref:.2f}×" if ref else ""
            table.add_row(f"  {name}", _fmt(v["img_per_s"]), "", "img/s", ratio, "", "")
    c = results["cache_build"]
    table.add_row("  cache build (once)", _fmt(c["seconds"]), "", "s", f"{c['mb']} MB", "", "")
    mem = results["peak_rss_mb"]["with_workers"]
    table.add_row(
        "  PSS incl. workers", _fmt(mem["ours"]), _fmt(mem["reference"]), mem["unit"], "", "", ""
    )
    Console(width=max(Console().width, 100)).print(table)
    d, m = results["data"], results["machine"]
    Console().print(
        f"{d['images']} images, mean {d['mean_wh'][0]}×{d['mean_wh'][1]}, max "
        f"{d['max_wh'][0]}×{d['max_wh'][1]} · {m['cpus_usable']} CPUs ({m['cpu']}), "
        f"GPU: {m['gpu'] or 'none'} · workers {results['settings']['workers']} · "
        f"batch {results['settings']['batch_size']} · {results['wall_time_s']} s"
    )


def write_results(results: dict, out_dir: str | os.PathLike = DEFAULT_OUT) -> Path:
    """Write the results to `out_dir/<timestamp>.json` (never over an earlier file)."""
    out_dir = Path(out_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = out_dir / f"{stamp}.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"{stamp}-{n}.json"
    return write_json(path, results)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark command line."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="a few hundred images (< ~3 min on 2 cores)"
    )
    size.add_argument(
        "--tiny", action="store_true", help="smallest run, for the tests (figures meaningless)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers on both sides (default: one per core, ≤ 8)",
    )
    p.add_argument(
        "--ablations",
        action="store_true",
        help="also time our pipeline without JPEG draft decoding, and the reference on presized images",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=DEFAULT_ROOT,
        help=f"cache of the synthetic sets (default {DEFAULT_ROOT})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder of the JSON results (default {DEFAULT_OUT})",
    )
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmarks, print the table, write the JSON; return its path."""
    args = build_parser().parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    s = settings_for(mode, args.workers)
    results = run_benchmarks(s, args.data_root, ablations=args.ablations)
    print_table(results)
    path = write_results(results, args.out)
    Console().print(f"results → {path}")
    return path


if __name__ == "__main__":
    main()
