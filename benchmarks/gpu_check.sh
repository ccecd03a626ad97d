#!/usr/bin/env bash
# The one GPU check (benchmarks/gpu_check.py): the demo, the baseline on a Stanford-Cars-shaped
# set, the resnet50 epoch against its limit, the recipes and torchrun, one line each, in at most
# 8 minutes on one GPU. `--tiny` runs the same steps at toy sizes on a CPU (a test does).
# Needs only the project's dependencies (wheels, no network: benchmarks/gpu_wheels.sh makes them,
# their folder goes on PYTHONPATH); the checkout goes on PYTHONPATH before it.
# Usage: [PYTHON=python3] bash benchmarks/gpu_check.sh [--tiny] [--budget S] [--only CHECK ...]
#        [--out DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
