"""`python -m benchmarks.gpu_epoch`: issue 14's GPU check, a Stanford-Cars-sized training epoch.

resnet50 at 224 px (the recipe's bf16 and channels-last) over 4,800 training rows of ~610×407
JPEGs (960 distinct files listed 5 times: drawing 8,000 would take most of the time),
first with every core, then with 2 (`os.sched_setaffinity`, which the spawned sides inherit: the
Colab/Kaggle set-up). Per core count, `benchmarks.training.bench_training`'s three processes:
ours (the cached loader, batched augmentation on the GPU), TwinCar's plain loop, and our learner's
epochs against the in-memory limit in turns. Prints images/s, the ratio to the limit (goals: ≥ 0.85
with 2 cores, ≥ 0.9 with all) and to the reference, and writes one JSON. About 3 minutes of
`benchmarks/gpu_check.sh`'s 8 (an estimate: not yet run on a GPU); `--tiny` is a seconds-long CPU smoke run of the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from benchmarks.data import DEFAULT_ROOT, BenchData, bench_dataset
from benchmarks.measure import machine_info
from benchmarks.settings import default_workers, settings_for
from twincar_fast.files import write_json

GOALS = {"all": 0.9, 2: 0.85}  # ratio to the limit, by core count


def gpu_settings(tiny: bool):
    """The epoch's settings: resnet50 at 224 on the Stanford-Cars-sized set (or the tiny ones)."""
    if tiny:
        return settings_for("tiny")
    return dataclasses.replace(
        settings_for("quick"),
        data=BenchData(n_classes=24, per_class=40),
        workers=default_workers(),  # after the affinity is set
        repeats=2,  # one process per side (see bench_training)
        train_repeat=5,  # epochs of ~5 s on an H200: the check's budget holds 10 of them
        limit_turns=2,
        train_arch="resnet50",
        train_img=224,
        train_item=256,
    )


def epoch_figures(cores: int | str, tiny: bool, data_root: Path) -> dict:
    """One core count's training-epoch figures (images/s, ratios, the JSON entry)."""
    from benchmarks.training import bench_training

    s = gpu_settings(tiny)
    data_dir = bench_dataset(s.data, data_root)
    epoch, memory = bench_training(s, data_dir)
    n = sum(epoch["n_images"]["ours"].values())
    turns = epoch["limit_turns"]
    return {
        "cores": cores,
        "workers": s.workers,
        "images_per_epoch": n,
        "img_per_s": {k: round(n / turns[k], 1) for k in ("ours", "limit")}
        | {"reference": round(n / epoch["reference"], 1)},
        "ratio_to_limit": epoch["ratio_to_limit"],
        "goal_to_limit": GOALS.get(cores),
        "ratio_to_reference": epoch["ratio"],
        "valid_seconds": turns["valid_only"],  # ours and the limit's validation pass
        "train_epoch": epoch,
        "peak_rss_mb": memory,
    }


def main(argv: Sequence[str] | None = None) -> Path:
    """Run all cores, then 2; print each line and write the JSON; return its path."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_epoch", description=__doc__.splitlines()[0]
    )
    p.add_argument("--tiny", action="store_true", help="a CPU smoke run of the same code")
    p.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = p.parse_args(argv)
    start, out = time.perf_counter(), {"machine": machine_info(), "runs": []}
    all_cores = sorted(os.sched_getaffinity(0))
    for cores in ("all", 2):
        if cores == 2:
            os.sched_setaffinity(0, all_cores[:2])
        run = epoch_figures(cores, args.tiny, args.data_root)
        out["runs"].append(run)
        print(
            f"cores {cores}: ours {run['img_per_s']['ours']} img/s, limit "
            f"{run['img_per_s']['limit']}, reference {run['img_per_s']['reference']}; ratio to "
            f"the limit {run['ratio_to_limit']} (goal {run['goal_to_limit']}), to the reference "
            f"{run['ratio_to_reference']}; validation pass {run['valid_seconds']['ours']} s "
            f"(limit {run['valid_seconds']['limit']} s) ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    os.sched_setaffinity(0, all_cores)
    out["wall_time_s"] = round(time.perf_counter() - start, 1)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = write_json(args.out / f"gpu-epoch-{stamp}.json", out)
    print(f"results → {path}")
    return path


if __name__ == "__main__":
    main()
