"""`python -m benchmarks.valid_pass`: the validation pass's data side, kept items against reading.

The loader alone (no model) over the Stanford-Cars-sized set's validation split (~610×407 JPEGs,
resnet50's 224 px, the batched path, 2 threads): the exact path reading every file each pass
(`memo=None`) against the kept items of the first pass (the default beside the cache). What a GPU
gets from the validation pass when its cores, not its model, are the bound. Prints images/s per
pass and the ratio of the later passes; `--tiny` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.data import DEFAULT_ROOT, BenchData, bench_dataset
from benchmarks.measure import compare, machine_info
from twincar_fast.config import load_config
from twincar_fast.data.loaders import build_dls
from twincar_fast.files import write_json


def pass_rates(dl, passes: int) -> list[float]:
    """Images/s of each full pass over `dl`."""
    rates = []
    for _ in range(passes):
        start, n = time.perf_counter(), 0
        for _, yb in dl:
            n += len(yb)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main(argv: Sequence[str] | None = None) -> dict:
    """Both loaders over the same split, in one run; the figures, printed and written."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.valid_pass", description=__doc__)
    p.add_argument("--tiny", action="store_true", help="a small set and 32 px: a smoke run")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = p.parse_args(argv)
    spec = BenchData(n_classes=4, per_class=8) if args.tiny else BenchData()
    size = 32 if args.tiny else 224
    overrides = [f"data.root={bench_dataset(spec, args.data_root)}", "model.pretrained=false"]
    overrides += ["data.valid_pct=0.5", "data.num_workers=2", "train.device=cpu"]
    overrides += ["data.cache_aug=batched", f"data.img_size={size}", f"data.item_size={size}"]
    torch.set_num_threads(2)
    kept = build_dls(load_config("experiments/baseline.yaml", overrides)).valid
    read = kept.new(memo=None)
    rates = {"read": pass_rates(read, args.passes), "kept": pass_rates(kept, args.passes)}
    later = {k: statistics.median(r[1:]) for k, r in rates.items()}  # after the first pass
    result = {
        "machine": machine_info(),
        "images": len(kept.dataset),
        "img_size": size,
        "img_per_s_by_pass": {k: [round(r) for r in v] for k, v in rates.items()},
        "later_passes": compare(later["kept"], later["read"], "img/s", higher_is_better=True),
    }
    for k, r in rates.items():
        print(f"{k:<5} {' '.join(f'{x:6.0f}' for x in r)} img/s by pass")
    print(f"passes after the first: {result['later_passes']['ratio']}× the reading loader")
    write_json(args.out / f"valid-pass-{time.strftime('%Y%m%d-%H%M%S')}.json", result)
    return result


if __name__ == "__main__":
    main()
