"""`python -m benchmarks.peer_timm CONFIG --timm-repo PATH [key=value ...]`: us vs. timm's train.py.

Exports the config's prepared set to the ImageFolder timm's script reads (train/ and test/, one
folder per class), each image opened, box-cropped and resized exactly as our validation loader
does (`ImageLoader` + the validation resize), maps the config's settings to train.py flags, runs
both sides as whole processes on the same machine and prints (and writes to `--out`/results.json)
each side's test top-1 and wall time. `--seeds N` runs both sides with seeds 1..N (`--first-seed
S`: S..S+N-1), taking turns (ours, timm, timm, ours, ...: a drift of the machine hits both), and
prints each run and each side's mean ± std of test top-1 and wall time; `--only ours|timm` runs
one side, to switch one factor at a time; `--timm-extra="FLAGS"` adds train.py flags. timm's
script comes from a local copy of the pytorch-image-models repository; it runs with `python -P`
so that it imports the installed timm, not the copy beside it. Nothing is downloaded (unless the
config asks for pretrained weights).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from twincar_fast.config import ExperimentConfig, load_config
from twincar_fast.data import ensure_dataset, read_annotations, read_classes, resolve_device
from twincar_fast.data.loaders import ImageLoader, item_transforms
from twincar_fast.errors import ConfigError
from twincar_fast.files import atomic_dir, new_run_name, write_json
from twincar_fast.model.precision import precision_for

# timm's "sgd" is Nesterov SGD; "momentum" is plain momentum SGD
TIMM_OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "sgd": "momentum"}
# our settings that timm's train.py has no flag for: named in the notes when they are on
NO_TIMM_FLAG = ("max_rotate", "max_warp", "blur_p", "hue")
SIDES = ("ours", "timm")


def export_imagefolder(cfg: ExperimentConfig, data_dir: Path, out: Path) -> dict[str, int]:
    """Write train/ and test/ ImageFolders of `data_dir`, as our validation loader sees each image.

    Every image is opened (box crop and margin as `data.bbox_crop`/`bbox_margin` say) and resized
    to `data.img_size` by `data.resize`, so timm's crops at `--crop-pct 1` change nothing. Class
    folders are the zero-padded class ids, so timm's sorted folders keep our class order.
    """
    d = cfg.data
    loader = ImageLoader(d.img_size, d.bbox_crop, d.bbox_margin, d.draft)
    on_items = dataclasses.replace(
        cfg, aug=dataclasses.replace(cfg.aug, enabled=True, stage="item")
    )
    resize = item_transforms(on_items)[-1]  # the validation resize straight to img_size
    df = read_annotations(data_dir)
    width = len(str(len(read_classes(data_dir)) - 1))
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "test"):
            rows = df[df["split"] == split]
            for _, row in rows.iterrows():
                folder = tmp / split / f"{int(row['class_id']):0{width}d}"
                folder.mkdir(parents=True, exist_ok=True)
                image = resize(loader(row), split_idx=1)
                image.save(folder / f"{Path(row['image']).stem}.png")
            counts[split] = len(rows)
    return counts


def _schedule_flags(cfg: ExperimentConfig) -> list[str]:
    """timm's --sched/--warmup flags for our schedule (one-cycle: timm's cosine, 25% warm-up)."""
    t = cfg.train
    if isinstance(t.lr, list):
        raise ConfigError("train.lr: timm's train.py takes one LR; give one value to compare")
    warmup = {"one_cycle": round(0.25 * t.epochs)}.get(t.schedule, round(t.warmup_epochs))
    sched = {"flat": ["--sched", "step", "--decay-epochs", str(t.epochs + 1)]}.get(
        t.schedule, ["--sched", "cosine"]
    )
    # our LR moves every batch unless train.lr_step says epoch; timm's moves once an epoch unless
    # told --sched-on-updates (one-cycle and the warm-up too)
    sched += ["--sched-on-updates"] if t.lr_step == "batch" or t.schedule == "one_cycle" else []
    return [*sched, "--lr", f"{t.lr:g}", "--warmup-epochs", str(warmup), "--cooldown-epochs", "0",
            "--warmup-lr", f"{t.lr / 100:g}", "--min-lr", f"{t.lr / 1e5:g}"]  # fmt: skip


def _aug_flags(cfg: ExperimentConfig) -> list[str]:
    """timm's augmentation flags: flips, colour jitter, the random-resized-crop scale."""
    a = cfg.aug
    if not a.enabled:
        return ["--no-aug"]
    ratio = ["1", "1"] if a.min_scale == 1 else ["0.75", "1.3333"]
    return ["--hflip", "0.5" if a.flip else "0", "--color-jitter", f"{a.max_lighting:g}",
            "--scale", f"{a.min_scale:g}", "1", "--ratio", *ratio, "--reprob", "0"]  # fmt: skip


def _recipe_flags(cfg: ExperimentConfig) -> list[str]:
    """timm's flags for the recipe keys: mixup/CutMix, weight EMA, SGD momentum."""
    a, t = cfg.aug, cfg.train
    flags = []
    if a.enabled and (a.mixup or a.cutmix):
        flags += ["--mixup", f"{a.mixup:g}", "--cutmix", f"{a.cutmix:g}", "--mixup-prob",
                  f"{a.mix_prob:g}", "--mixup-off-epoch", str(t.epochs - a.mix_off_epochs)]  # fmt: skip
    if t.ema:
        flags += ["--model-ema", "--model-ema-decay", f"{t.ema:g}"]
        flags += ["--model-ema-warmup"] if t.ema_warmup else []
    if t.optimizer == "sgd":
        flags += ["--momentum", f"{t.momentum:g}"]
    return flags


def timm_flags(cfg: ExperimentConfig, data_dir: Path, n_classes: int, out: Path) -> list[str]:
    """train.py's command-line flags for our config's settings (where train.py has them)."""
    t, d, m = cfg.train, cfg.data, cfg.model
    if t.freeze or t.head_epochs:
        raise ConfigError("train.freeze/head_epochs: timm's train.py trains every layer at once")
    if t.optimizer not in TIMM_OPTIMIZERS:
        raise ConfigError(f"train.optimizer: {t.optimizer!r} has no timm counterpart here")
    device = resolve_device(t.device)
    precision = precision_for(t, device)
    flags = ["--data-dir", str(data_dir), "--train-split", "train", "--val-split", "test",
             "--model", m.arch, "--num-classes", str(n_classes), "--img-size", str(d.img_size),
             "--crop-pct", "1.0", "--interpolation", "bilinear", "--train-interpolation",
             "bilinear", "-b", str(d.batch_size), "--epochs", str(t.epochs),
             "--opt", "sgd" if t.nesterov else TIMM_OPTIMIZERS[t.optimizer],
             "--weight-decay", f"{t.weight_decay:g}",
             "--smoothing", f"{t.label_smoothing:g}", "--seed", str(t.seed),
             "--device", device.type, "-j", str(d.num_workers or 0),
             "--output", str(out), "--experiment", "timm", "--log-interval", "100000",
             "--checkpoint-hist", "1"]  # fmt: skip
    flags += _schedule_flags(cfg) + _aug_flags(cfg) + _recipe_flags(cfg)
    if m.weights:  # a local file stands in for the hub's weights on both sides
        flags += ["--pretrained", "--pretrained-path", str(Path(m.weights).resolve())]
    elif m.pretrained:
        flags.append("--pretrained")
    if precision != "none":
        flags += ["--amp", "--amp-dtype", "bfloat16" if precision == "bf16" else "float16"]
    if t.channels_last:
        flags.append("--channels-last")
    if device.type != "cuda":
        flags.append("--no-prefetcher")  # timm's prefetcher is CUDA-only
    return flags


def mapping_notes(cfg: ExperimentConfig) -> list[str]:
    """Where the two sides still differ after the mapping (printed beside the results)."""
    notes = [f"aug.{k}={getattr(cfg.aug, k)} has no train.py flag" for k in NO_TIMM_FLAG
             if cfg.aug.enabled and getattr(cfg.aug, k)]  # fmt: skip
    if cfg.aug.enabled and cfg.aug.saturation != cfg.aug.max_lighting:
        notes.append("timm's --color-jitter sets saturation to aug.max_lighting too")
    if cfg.data.valid_pct:
        notes.append(f"we hold out data.valid_pct={cfg.data.valid_pct:g}; timm trains on all")
    if cfg.model.head != "timm":
        notes.append(f"model.head={cfg.model.head}; timm uses the model's own classifier")
    if cfg.train.schedule == "one_cycle":
        notes.append("one_cycle maps to timm's cosine with 25% warm-up")
    if cfg.data.img_size_schedule:
        notes.append(f"timm trains at data.img_size={cfg.data.img_size} throughout (no schedule)")
    if cfg.eval.tta != "none":
        notes.append(
            f"timm's test top-1 is without TTA; ours is too (eval.tta={cfg.eval.tta} beside)"
        )
    if cfg.train.optimizer == "sgd":
        notes.append("torch SGD on both sides; timm keeps weight decay off norm and bias, we don't")
    return notes


def _timed(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run `cmd` in `cwd` with its output in `log`; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])[:80]} failed (exit {done.returncode}); see {log}")
    return wall


# train.py as __main__, with the installed timm imported first (-P: not the copy beside the script)
_TIMM_MAIN = (
    "import runpy, sys, timm; print('timm', timm.__version__, timm.__file__, flush=True); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_timm(repo: Path, flags: list[str], out: Path) -> dict:
    """timm's train.py with `flags`: the last epoch's test top-1 (summary.csv) and wall time."""
    script = repo / "train.py"
    if not script.is_file():
        raise ConfigError(f"--timm-repo: no train.py in {repo}; give a pytorch-image-models copy")
    wall = _timed(
        [sys.executable, "-P", "-c", _TIMM_MAIN, str(script), *flags], out, out / "timm.log"
    )
    with open(out / "timm" / "summary.csv") as f:
        last = list(csv.DictReader(f))[-1]
    version = (out / "timm.log").read_text().partition("\n")[0]  # "timm <version> <file>"
    return {"test_acc": float(last["eval_top1"]) / 100, "wall_s": round(wall, 1), "timm": version}


def run_ours(config: str, overrides: Sequence[str], out: Path) -> dict:
    """`python -m twincar_fast.run` with the same overrides: test accuracy and wall time."""
    ours = [
        f"reports_dir={out / 'reports'}",
        f"models_dir={out / 'models'}",
        "eval.interpret=false",
    ]
    cmd = [sys.executable, "-m", "twincar_fast.run", config, *overrides, *ours]
    wall = _timed(cmd, Path.cwd(), out / "ours.log")
    (report,) = (out / "reports").iterdir()
    result = json.loads((report / "eval_test.json").read_text())
    ours = {"test_acc": result["test_acc"], "wall_s": round(wall, 1), "run": str(report)}
    if "test_acc_tta" in result:
        ours["test_acc_tta"] = result["test_acc_tta"]
    return ours


def with_flag(flags: list[str], name: str, value: object) -> list[str]:
    """train.py's flags with the value of `name` (a flag already in them) set to `value`."""
    i = flags.index(name)
    return [*flags[: i + 1], str(value), *flags[i + 2 :]]


def with_seed(flags: list[str], seed: int, out: Path) -> list[str]:
    """train.py's flags for one seed's run, writing under that run's folder `out`."""
    return with_flag(with_flag(flags, "--seed", seed), "--output", out)


def run_seeds(
    config: str,
    overrides: list[str],
    flags: list[str],
    repo: Path,
    out: Path,
    n: int,
    sides: Sequence[str] = SIDES,
    first: int = 1,
):
    """`sides` with n seeds from `first`, taking turns; {side: [run, ...]}, each with its seed."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for seed in range(first, first + n):
        where = {side: out / f"seed{seed}" / side for side in runs}
        for side in sides if seed % 2 else sides[::-1]:
            where[side].mkdir(parents=True, exist_ok=True)
            if side == "ours":
                r = run_ours(config, [*overrides, f"train.seed={seed}"], where[side])
            else:
                r = run_timm(repo, with_seed(flags, seed, where[side]), where[side])
            runs[side].append({"seed": seed, **r})
            print(
                f"seed {seed:>3} {side:5s} test top-1 {r['test_acc']:.2%}  wall {r['wall_s']:.0f} s"
            )
    return runs


def seed_summary(runs: list[dict]) -> dict:
    """Mean and (sample) std of test top-1 and wall time over a side's runs."""
    acc, wall = [r["test_acc"] for r in runs], [r["wall_s"] for r in runs]
    spread = statistics.stdev if len(runs) > 1 else lambda _: 0.0
    return {
        "seeds": [r["seed"] for r in runs],
        "test_acc_mean": round(statistics.mean(acc), 5),
        "test_acc_std": round(spread(acc), 5),
        "wall_s_mean": round(statistics.mean(wall), 1),
        "wall_s_total": round(sum(wall), 1),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, run both sides, print and write the comparison."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_timm", description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--timm-repo", type=Path, required=True, help="pytorch-image-models copy")
    parser.add_argument("--out", type=Path, default=None, help="default: reports/peer_timm-<stamp>")
    parser.add_argument("--seeds", type=int, default=0, help="both sides with seeds 1..N, in turns")
    parser.add_argument("--first-seed", type=int, default=1, help="with --seeds: the first seed")
    parser.add_argument("--only", choices=SIDES, default=None, help="with --seeds: one side")
    parser.add_argument(
        "--timm-extra", default="", help="more train.py flags, e.g. '--sched-on-updates'"
    )
    parser.add_argument("overrides", nargs="*", help="key=value, as for twincar_fast.run")
    args = parser.parse_intermixed_args(argv)
    if args.only and not args.seeds:
        raise ConfigError("--only: give --seeds N too (one side's runs over seeds)")
    cfg = load_config(args.config, args.overrides)
    out = args.out or Path("reports") / new_run_name("peer_timm", [Path("reports")])
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()  # timm's train.py runs inside `out`: its flags need absolute paths
    data_dir = ensure_dataset(cfg)
    counts = export_imagefolder(cfg, data_dir, out / "imagefolder")
    flags = timm_flags(cfg, out / "imagefolder", len(read_classes(data_dir)), out)
    flags += args.timm_extra.split()  # a factor of the comparison switched on timm's side
    result = {"config": args.config, "overrides": args.overrides, "images": counts,
              "notes": mapping_notes(cfg), "timm_flags": flags}  # fmt: skip
    if args.seeds:
        runs = run_seeds(
            args.config, args.overrides, flags, args.timm_repo.resolve(), out, args.seeds,
            (args.only,) if args.only else SIDES, args.first_seed,
        )  # fmt: skip
        result["runs"] = runs
        result["summary"] = {side: seed_summary(r) for side, r in runs.items()}
        write_json(out / "results.json", result)
        for side, m in result["summary"].items():
            print(
                f"{side:5s} mean test top-1 {m['test_acc_mean']:.2%} ± {m['test_acc_std']:.2%} over "
                f"{len(m['seeds'])} seeds, wall {m['wall_s_mean']:.0f} s a run"
            )
        return result
    result["ours"] = run_ours(args.config, args.overrides, out)
    result["timm"] = run_timm(args.timm_repo.resolve(), flags, out)
    write_json(out / "results.json", result)
    for side in ("ours", "timm"):
        r = result[side]
        print(f"{side:5s} test top-1 {r['test_acc']:.2%}  wall {r['wall_s']:.0f} s")
    for note in result["notes"]:
        print(f"note: {note}")
    return result


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
