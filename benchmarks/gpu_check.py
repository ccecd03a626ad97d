"""`bash benchmarks/gpu_check.sh [--tiny]`: the one GPU check, every step a new user's GPU meets.

In order, each in its own process with a time limit taken from one budget (8 minutes by default):
the environment (imports, the GPU, its precision); `experiments/demo.yaml` with its defaults;
`experiments/baseline.yaml` (pretrained off, 2 epochs) on a Stanford-Cars-shaped synthetic set
(196 classes, 8,144 train and 8,041 test rows of ~610×407 JPEGs, `benchmarks.data`) with its test
evaluation, figures and export; `benchmarks.gpu_epoch` (the resnet50 epoch against the in-memory
limit and TwinCar's loop, all cores then 2, with its goals); `experiments/demo_recipe.yaml`;
`torchrun --nproc_per_node 1` against the same run in one plain process; `experiments/highres.yaml`
shortened to 3 epochs. One line per check (ok / failed, its figures), a JSON under
`reports/benchmarks/`, exit code 1 when any check failed or did not fit the budget.

`--tiny` is its CPU smoke form: the same steps and code at toy sizes (a test runs it), so the
script can't rot between the sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from benchmarks.data import BenchData, cars_sized_dataset
from benchmarks.settings import settings_for

ROOT = Path(__file__).resolve().parent.parent
MODULES = (  # the project's runtime dependencies, by import name (wheels on a GPU box)
    "torch torchvision fastai timm pytorch_grad_cam cv2 pandas scipy sklearn matplotlib rich "
    "yaml safetensors optuna accelerate"
).split()


class CheckFailed(Exception):
    """A check's one-line reason to fail."""


@dataclass
class Context:
    """Where a check writes and how big it runs."""

    out: Path
    tiny: bool
    data_root: Path
    deadline: float  # time.monotonic() by which every check must be done
    logs: list[Path] = field(default_factory=list)

    def left(self) -> float:
        """Seconds left in the budget."""
        return self.deadline - time.monotonic()


def _command(ctx: Context, name: str, args: list[str], limit: float, **env: str) -> str:
    """Run `args` from the checkout (logged to OUT/NAME.log) within `limit` s; its output."""
    log = ctx.out / f"{name}.log"
    ctx.logs.append(log)
    # the checkout first, then what was on the path (a GPU box's carried wheels: /tmp/site)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environ = {**os.environ, "PYTHONPATH": path, **env}
    try:
        done = subprocess.run(
            args, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=max(1, limit)
        )
    except subprocess.TimeoutExpired as e:
        out = [
            o.decode(errors="replace") if isinstance(o, bytes) else o or ""
            for o in (e.stdout, e.stderr)
        ]
        log.write_text("\n".join(out))
        raise CheckFailed(f"did not finish in {limit:.0f} s (log: {log})") from None
    log.write_text(done.stdout + "\n" + done.stderr)
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise CheckFailed(f"exit {done.returncode}: {last[:200]} (log: {log})")
    return done.stdout


def _run_config(ctx: Context, name: str, config: str, overrides: list[str], limit: float) -> dict:
    """`python -m twincar_fast.run CONFIG` into OUT/NAME; its summary and test evaluation."""
    where = ctx.out / name
    args = [*overrides, f"reports_dir={where}/reports", f"models_dir={where}/models"]
    _command(ctx, name, [sys.executable, "-m", "twincar_fast.run", config, *args], limit)
    return run_results(where, report="eval.interpret=false" not in overrides)


def run_results(where: Path, report: bool = True) -> dict:
    """The one run under WHERE/reports: summary.json, eval_test.json, metrics.csv, the model
    folder's weights and config, and (`report`) index.html."""
    runs = sorted((where / "reports").iterdir())
    if len(runs) != 1:
        raise CheckFailed(f"expected one run folder in {where / 'reports'}, found {len(runs)}")
    run = runs[0]
    model = where / "models" / run.name
    needs = [model / "model.safetensors", model / "config.json", *([run / "index.html"] * report)]
    for need in needs:
        if not need.is_file():
            raise CheckFailed(f"the run left no {need}")
    return {
        "summary": json.loads((run / "summary.json").read_text()),
        "test": json.loads((run / "eval_test.json").read_text()),
        "metrics": pd.read_csv(run / "metrics.csv"),
    }


def _figures(r: dict) -> str:
    """A run's line: test accuracy, epoch speed, precision."""
    s, test = r["summary"], r["test"]
    acc = test["test_acc"]
    speed = s.get("train_images_per_s")
    return (
        f"test acc {acc:.1%}, {s['epochs_run']} epochs in {s['wall_time_s']:.0f} s, "
        f"{speed or 0:.0f} train img/s, {s['machine']['device']} {s['machine']['precision']}"
    )


TINY_DEMO = ["data.demo_classes=4", "data.demo_per_class=10"]


def tiny_overrides(size: int = 32, interpret: bool = True) -> list[str]:
    """Toy sizes for `--tiny`: one small epoch of a tiny model, a few maps (or no report: the
    demo and the baseline check draw it)."""
    return [
        "data.cache_aug=batched",  # the GPU's augmentation path, here on the CPU
        f"eval.interpret={str(interpret).lower()}",
        "train.epochs=1",
        "train.warmup_epochs=0",
        f"data.img_size={size}",
        f"data.item_size={size}",
        "data.batch_size=8",
        "eval.gradcam=2",
        "eval.top_losses=4",
        "eval.twins=1",
    ]


def check_env(ctx: Context, limit: float) -> str:
    """Every runtime dependency imports; the device, its precision and the core count."""
    code = (
        "import importlib, os, torch\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "cuda = torch.cuda.is_available()\n"
        "name = torch.cuda.get_device_name() if cuda else 'no GPU'\n"
        "bf16 = cuda and torch.cuda.is_bf16_supported()\n"
        "import fastai, timm\n"
        "print(f'{name}, torch {torch.__version__}, fastai {fastai.__version__}, '"
        " f'timm {timm.__version__}, '"
        " f\"{'bf16' if bf16 else 'fp16' if cuda else 'cpu'}, {os.cpu_count()} cores\")\n"
    )
    line = _command(ctx, "env", [sys.executable, "-c", code], limit).strip()
    if not ctx.tiny and "no GPU" in line:
        raise CheckFailed(f"torch sees no CUDA GPU ({line})")
    return line


def check_demo(ctx: Context, limit: float) -> str:
    """experiments/demo.yaml with its defaults (the README's first run)."""
    extra = [*tiny_overrides(), *TINY_DEMO] if ctx.tiny else []
    demo = [f"data.root={ctx.data_root / 'demo'}", *extra]
    return _figures(_run_config(ctx, "demo", "experiments/demo.yaml", demo, limit))


def _sized(ctx: Context) -> Path:
    """The Stanford-Cars-shaped set (tiny: 6 classes, 60 train and 40 test rows)."""
    if ctx.tiny:
        return cars_sized_dataset(settings_for("tiny").data, ctx.data_root, 6, 60, 40)
    return cars_sized_dataset(BenchData(n_classes=24, per_class=40), ctx.data_root)


def check_baseline(ctx: Context, limit: float) -> str:
    """experiments/baseline.yaml, pretrained off, 2 epochs, on the Stanford-Cars-shaped set."""
    args = [f"data.root={_sized(ctx)}", "model.pretrained=false", "train.epochs=2"]
    if ctx.tiny:
        args += [*tiny_overrides(), "model.arch=test_resnet", "model.head_hidden=16"]
    return _figures(_run_config(ctx, "baseline", "experiments/baseline.yaml", args, limit))


def check_recipe(ctx: Context, limit: float) -> str:
    """experiments/demo_recipe.yaml with its defaults (EMA, mixup, progressive resizing, TTA)."""
    args = [f"data.root={ctx.data_root / 'demo'}"]
    if ctx.tiny:
        args += [*tiny_overrides(48, interpret=False), *TINY_DEMO, "train.epochs=3"]
        args += ["data.img_size_schedule=[[0,32],[2,48]]", "aug.mix_off_epochs=1"]
    r = _run_config(ctx, "demo_recipe", "experiments/demo_recipe.yaml", args, limit)
    tta = r["test"].get("test_acc_tta")
    return _figures(r) + (f", TTA {tta:.1%}" if tta is not None else "")


def check_highres(ctx: Context, limit: float) -> str:
    """experiments/highres.yaml (448 px, SGD, EMA, mixup, resizing) cut to 3 epochs."""
    args = [f"data.root={_sized(ctx)}", "model.pretrained=false", "train.epochs=3"]
    args += ["train.warmup_epochs=1", "aug.mix_off_epochs=1"]
    sizes = "[[0,32],[1,40],[2,48]]" if ctx.tiny else "[[0,224],[1,320],[2,448]]"
    if ctx.tiny:
        args += [*tiny_overrides(48, interpret=False), "model.arch=test_resnet", "train.epochs=3"]
    args.append(f"data.img_size_schedule={sizes}")
    return _figures(_run_config(ctx, "highres", "experiments/highres.yaml", args, limit))


def check_epoch(ctx: Context, limit: float) -> str:
    """benchmarks.gpu_epoch: ratio to the limit (all cores, 2) and to TwinCar's loop."""
    args = [sys.executable, "-m", "benchmarks.gpu_epoch", "--out", str(ctx.out)]
    args += ["--data-root", str(ctx.data_root), *(["--tiny"] if ctx.tiny else [])]
    _command(ctx, "gpu_epoch", args, limit)
    result = json.loads(sorted(ctx.out.glob("gpu-epoch-*.json"))[-1].read_text())
    parts, missed = [], []
    for run in result["runs"]:
        ratio, goal = run["ratio_to_limit"], run["goal_to_limit"]
        parts.append(
            f"{run['cores']} cores: {run['img_per_s']['ours']:.0f} img/s, {ratio:.2f} of the "
            f"limit (goal {goal}), {run['ratio_to_reference']:.2f}× TwinCar, validation "
            f"{run['valid_seconds']['ours']:.2f} s (limit {run['valid_seconds']['limit']:.2f} s)"
        )
        if not ctx.tiny and ratio < goal:
            missed.append(f"{run['cores']} cores {ratio:.2f} < {goal}")
    if missed:
        raise CheckFailed("below the goal: " + ", ".join(missed) + "; " + "; ".join(parts))
    return "; ".join(parts)


def check_torchrun(ctx: Context, limit: float) -> str:
    """`torchrun --nproc_per_node 1` (the distributed path) against one plain process."""
    args = [f"data.root={ctx.data_root / 'demo'}", "train.epochs=3"]
    if ctx.tiny:
        args += [*tiny_overrides(interpret=False), *TINY_DEMO, "train.epochs=2"]
    start = time.monotonic()
    plain = _run_config(ctx, "plain", "experiments/demo.yaml", args, limit)
    where = ctx.out / "torchrun"
    folders = [f"reports_dir={where}/reports", f"models_dir={where}/models"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    cmd += ["-m", "twincar_fast.run", "experiments/demo.yaml", *args, *folders]
    _command(ctx, "torchrun", cmd, limit - (time.monotonic() - start))
    ddp = run_results(where, report=not ctx.tiny)
    gap = (plain["metrics"]["train_loss"] - ddp["metrics"]["train_loss"]).abs().max()
    line = f"max |Δ train_loss| {gap:.4f} over {len(ddp['metrics'])} epochs; " + _figures(ddp)
    if not gap <= 0.1:  # one rank sees the same batches: only kernel order may differ
        raise CheckFailed(f"the torchrun run diverged from the plain one: {line}")
    return line


CHECKS: list[tuple[str, Callable[[Context, float], str], int]] = [
    ("env", check_env, 60),  # name, check, the most seconds it may take
    ("demo", check_demo, 120),
    ("baseline", check_baseline, 180),
    ("gpu_epoch", check_epoch, 240),
    ("demo_recipe", check_recipe, 120),
    ("torchrun", check_torchrun, 150),
    ("highres", check_highres, 150),
]


def run_checks(ctx: Context, names: Sequence[str] | None = None) -> list[dict]:
    """Each check in order within the budget; one printed line and one result each."""
    results = []
    for name, check, cap in CHECKS:
        if names and name not in names:
            continue
        limit, start = min(cap * (3 if ctx.tiny else 1), ctx.left()), time.monotonic()
        if limit < 10:
            ok, line = False, "not run: the budget is spent (--budget, or run it alone: --only)"
        else:
            try:
                ok, line = True, check(ctx, limit)
            except CheckFailed as e:
                ok, line = False, str(e)
            except Exception as e:  # a broken check is a failed check, with the rest still run
                ok, line = False, f"the check itself broke: {type(e).__name__}: {e}"
        seconds = round(time.monotonic() - start, 1)
        print(f"{'ok    ' if ok else 'FAILED'} {name:<12} {seconds:>6.1f} s  {line}", flush=True)
        results.append({"check": name, "ok": ok, "seconds": seconds, "line": line})
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; write the JSON; 0 only when every check passed."""
    p = argparse.ArgumentParser(
        prog="bash benchmarks/gpu_check.sh", description=__doc__.split("\n")[0]
    )
    p.add_argument("--tiny", action="store_true", help="the CPU smoke form: same steps, toy sizes")
    p.add_argument("--budget", type=float, help="seconds for all checks (480; --tiny: 1200)")
    p.add_argument("--only", nargs="+", choices=[c[0] for c in CHECKS], help="these checks only")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks")
    p.add_argument("--data-root", type=Path, default=ROOT / "data" / "bench")
    args = p.parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out / f"gpu-check-{stamp}{'-tiny' if args.tiny else ''}"
    out.mkdir(parents=True)
    budget = args.budget or (1200 if args.tiny else 480)  # tiny: a slow, shared CPU
    ctx = Context(out, args.tiny, args.data_root.resolve(), time.monotonic() + budget)
    start = time.monotonic()
    results = run_checks(ctx, args.only)
    report = {"tiny": args.tiny, "wall_time_s": round(time.monotonic() - start, 1)}
    report["checks"] = results
    path = out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"gpu check: {len(results) - len(failed)} of {len(results)} ok → {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
