"""`bash benchmarks/gpu_check.sh --tiny`: the GPU check's every step, at toy sizes on the CPU, so
the script a GPU session runs as is can't rot between the sessions that have one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import CHECKS, CheckFailed, Context, _command, main

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_runs_every_check_and_writes_one_line_each(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    args = [
        "bash",
        "benchmarks/gpu_check.sh",
        "--tiny",
        "--out",
        str(out),
        "--data-root",
        str(data),
    ]
    # the script runs `python3` from PATH, as a person's shell would: this test's interpreter first
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok ", "FAILED"))]
    assert [ln.split()[1] for ln in lines] == [name for name, _, _ in CHECKS]
    assert all(ln.startswith("ok ") for ln in lines)
    (report,) = out.glob("gpu-check-*-tiny/gpu_check.json")
    checks = json.loads(report.read_text())["checks"]
    assert [c["check"] for c in checks] == [name for name, _, _ in CHECKS]
    line = {c["check"]: c["line"] for c in checks}
    assert "of the limit" in line["gpu_epoch"] and "validation" in line["gpu_epoch"]
    assert "test acc" in line["baseline"] and "max |Δ train_loss|" in line["torchrun"]
    assert "TTA" in line["demo_recipe"]


def test_a_check_that_does_not_fit_the_budget_fails_the_script(tmp_path, capsys):
    args = ["--tiny", "--only", "env", "demo", "--budget", "1", "--out", str(tmp_path)]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert printed.count("FAILED") == 2 and "budget is spent" in printed


def test_a_failing_command_is_one_line_with_its_log(tmp_path):
    ctx = Context(tmp_path, True, tmp_path, time.monotonic() + 60)
    code = "import sys; print('step one'); sys.exit('boom: the GPU is gone')"
    with pytest.raises(CheckFailed, match=r"exit 1: boom: the GPU is gone \(log: .*x\.log\)"):
        _command(ctx, "x", [sys.executable, "-c", code], 60)
    assert "step one" in (tmp_path / "x.log").read_text()
    with pytest.raises(CheckFailed, match="did not finish in 1 s"):
        _command(ctx, "slow", [sys.executable, "-c", "import time; time.sleep(30)"], 1)


def test_every_check_sees_the_packages_on_the_callers_path(tmp_path, monkeypatch):
    # a GPU box gets fastai & co. as wheels in a folder on PYTHONPATH (benchmarks/gpu_wheels.sh):
    # each check's process must see that folder as well as the checkout
    site = tmp_path / "site"
    site.mkdir()
    (site / "carried_wheel.py").write_text("NAME = 'carried'\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    ctx = Context(tmp_path, True, tmp_path, time.monotonic() + 60)
    code = "import carried_wheel, benchmarks.gpu_check; print(carried_wheel.NAME)"
    assert _command(ctx, "env", [sys.executable, "-c", code], 60).strip() == "carried"
