"""The command line: every subcommand is wired, and user mistakes are one line with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from twincar_fast.cli import build_parser, main

COMMANDS = [
    "run",
    "train",
    "lr-find",
    "prepare",
    "demo-data",
    "evaluate",
    "interpret",
    "twins",
    "predict",
    "cache",
    "export",
    "import-torchvision",
    "app",
    "sweep",
    "compare",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert command in capsys.readouterr().out


def test_help_lists_every_command_in_order():
    """Issue 30.5: the commands moved to their groups' cli modules; `twincar --help` keeps them all."""
    proc = subprocess.run(
        [sys.executable, "-m", "twincar_fast.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^    (\S+)", proc.stdout, flags=re.MULTILINE)  # not the wrapped lines
    order = ["run", "train", "lr-find", "prepare", "cache", "demo-data", "evaluate", "interpret"]
    order += ["twins", "predict", "export", "import-torchvision", "app", "sweep", "compare"]
    assert listed == order and sorted(order) == sorted(COMMANDS), proc.stdout
    assert list(build_parser()._subparsers._group_actions[0].choices) == order


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_through_main(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: twincar {command} ")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_missing_config_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in one_error_line(capsys)


def test_bad_override_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("train:\n  epochs: 2\n")
    assert main(["run", str(cfg), "train.epoks=3"]) == 2
    assert "did you mean 'train.epochs'" in one_error_line(capsys)


def test_python_m_run_reports_errors_without_traceback(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("data:\n  valid_pct: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "twincar_fast.run", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.valid_pct" in lines[0], proc.stderr


def test_errors_after_the_heavy_imports_are_one_line_too(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "twincar_fast.cli",
            "evaluate",
            str(tmp_path / "nope.pkl"),
            "--data",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twincar: error:"), proc.stderr


def test_run_without_arguments_asks_only_for_the_config(capsys):
    """Issue 12.18: `twincar run` alone said that `overrides` were required too."""
    with pytest.raises(SystemExit):
        main(["run"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("required: config")


@pytest.mark.parametrize("command", ["run", "train"])
def test_overrides_may_come_after_the_flags(command):
    """Issue 31.5: `key=value` after a flag was 'unrecognized arguments' (sweep: test_sweep.py)."""
    line = [command, "x.yaml", "a.b=1", "--processes", "2", "train.epochs=2"]
    args = build_parser().parse_args(line)
    assert args.overrides == ["a.b=1", "train.epochs=2"] and str(args.config) == "x.yaml"
