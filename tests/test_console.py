"""The run's console: a compact epoch table with metrics.csv's values, the test result at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pathlib
import re

import pandas as pd
import pytest

from twincar_fast.console import epoch_header, epoch_line
from twincar_fast.errors import ConfigError
from twincar_fast.experiment import run_experiment
from twincar_fast.train.callbacks import METRICS_COLUMNS


def _rows(out: str, n_epochs: int) -> list[list[str]]:
    """The epoch table's rows (`k/n  values...`) in console output."""
    pattern = rf"\s*\d+/{n_epochs}\s"
    return [ln.split() for ln in out.splitlines() if re.match(pattern, ln)]


@pytest.fixture(scope="module")
def terminal_run(tiny_data, tmp_path_factory):
    """A tiny run with test evaluation, its console output as if stdout were a terminal."""
    from conftest import make_tiny_cfg

    out = tmp_path_factory.mktemp("console_run")
    cfg = make_tiny_cfg(tiny_data, out)
    cfg.eval = dataclasses.replace(cfg.eval, test=True)
    mp = pytest.MonkeyPatch()
    mp.setattr("twincar_fast.console.plain_output", lambda: False)  # fastai's bars and table on
    mp.setattr("twincar_fast.train.fit.plain_output", lambda: False, raising=False)
    buf = io.StringIO()  # capsys is function-scoped
    try:
        with contextlib.redirect_stdout(buf):
            result = run_experiment(cfg)
    finally:
        mp.undo()
    return cfg, result, buf.getvalue()


def test_epoch_table_shows_metrics_csv_values_within_100_columns(terminal_run):
    cfg, result, out = terminal_run
    metrics = pd.read_csv(result.report_dir / "metrics.csv")
    rows = _rows(out, cfg.train.epochs)
    assert len(rows) == cfg.train.epochs
    header = next(ln for ln in out.splitlines() if ln.startswith("epoch "))
    names = header.split()[1:-2]  # between epoch and lr, time
    assert names == cfg.train.console_columns
    for row, (_, csv_row) in zip(rows, metrics.iterrows(), strict=True):
        for name, value in zip(names, row[1:], strict=False):
            # one definition of train_loss: the epoch mean of metrics.csv, not fastai's smoothed
            assert value == f"{csv_row[name]:.4f}", name
    table = [header, *(ln for ln in out.splitlines() if re.match(r"\s*\d+/\d+\s", ln))]
    assert max(len(ln) for ln in table) <= 100


def test_end_of_run_prints_the_test_result_and_the_report(terminal_run):
    _, result, out = terminal_run
    test = json.loads((result.report_dir / "eval_test.json").read_text())
    tail = "\n".join(out.splitlines()[-20:])
    assert f"acc {test['test_acc']:.4f}" in tail
    assert (
        f"top-5 {test['test_top5']:.4f}" in tail and f"macro F1 {test['test_f1_macro']:.4f}" in tail
    )
    assert str(result.report_dir / "eval_test.json") in tail
    assert re.search(r"evaluating the model of epoch \d+ on the test split: done in", out)
    machine = json.loads((result.report_dir / "summary.json").read_text())["machine"]
    assert machine["device"] == "cpu" and machine["precision"] in ("fp32", "bf16 autocast")
    assert f"cpu → cpu, {machine['precision']}" in out  # the device row of the first table


def test_epoch_columns_are_configurable_and_checked(tiny_cfg):
    row = {c: 0.5 for c in METRICS_COLUMNS} | {"epoch": 3, "lr": 1e-3, "time_s": 2.0}
    line = epoch_line(row, 10, ["valid_acc", "valid_mcc"])
    assert line.split() == ["3/10", "0.5000", "0.5000", "1.00e-03", "2.0s"]
    assert epoch_header(["valid_acc", "valid_mcc"]).split() == [
        "epoch", "valid_acc", "valid_mcc", "lr", "time"
    ]  # fmt: skip
    wide = epoch_line(row, 10, [c for c in METRICS_COLUMNS if c not in ("epoch", "lr", "time_s")])
    assert len(wide) > 100  # all of them don't fit: hence the compact default
    tiny_cfg.train.console_columns = ["valid_acc", "valid_accuracy"]
    with pytest.raises(ConfigError, match="valid_accuracy"):
        run_experiment(tiny_cfg)


def test_importing_the_package_prints_no_torch_jit_notice(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "user.py"
    script.write_text(
        "import twincar_fast\n"
        "from twincar_fast.data import build_dls\n"
        "import torch\n\n\n"
        "def double(x):\n"
        "    return x * 2\n\n\n"
        "torch.jit.script(double)  # the user's own call still warns\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "always::FutureWarning", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("torch.jit.script` is deprecated") == 1, proc.stderr[-2000:]


def test_output_paths_stay_aligned_after_a_long_name(capsys):
    from twincar_fast.console import print_paths

    print_paths(
        "outputs", {"metrics": "r/metrics.csv", "best_checkpoint": "m/best.pth", "index": "r/i"}
    )
    lines = capsys.readouterr().out.splitlines()[1:]
    starts = {
        ln.index(p) for ln, p in zip(lines, ["r/metrics.csv", "m/best.pth", "r/i"], strict=True)
    }
    assert len(starts) == 1, lines  # every path in one column


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        ([], "from scratch"),
        (["model.pretrained=true"], "pretrained"),
        # a local file wins over both (model.weights), so the table names it
        (
            ["model.pretrained=false", "model.weights=w/init.safetensors"],
            "weights init.safetensors",
        ),
    ],
)
def test_the_config_table_says_where_the_weights_start(overrides, start):
    from twincar_fast.config import load_config
    from twincar_fast.console import console, print_config

    demo = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
    cfg = load_config(demo, overrides)
    with console.capture() as cap:
        print_config(cfg, "r")
    assert f"test_resnet ({start}, timm head)" in cap.get()
