#!/usr/bin/env bash
# The wheels a GPU box of this workplace needs for `bash benchmarks/gpu_check.sh`: its image has
# torch, torchvision, timm's and the analysis' dependencies, but not fastai and its family,
# grad-cam or optuna, and it reaches no registry. Run here (network, this venv active); it writes
# the versions installed here, for the box's Python 3.12 on x86-64, into DIR (default .whl/,
# git-ignored). On the box, with DIR carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh
# Usage: bash benchmarks/gpu_wheels.sh [DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/.whl}"
mkdir -p "$dir"
# What the box lacks, from the project's dependencies down (its package list, device README).
# timm travels too, so the box runs the timm the tests ran.
names="fastai fastcore fasttransform fastdownload plum-dispatch beartype ttach timm
       optuna alembic sqlalchemy colorlog mako"
pins=$(python - $names <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"gpu_wheels: {name} is not installed here; run: pip install -e '.[dev]'")
EOF
)
grad_cam=$(python -c "from importlib.metadata import version; print(version('grad-cam'))")
platforms=""
for n in 17 27 28; do platforms+=" --platform manylinux_2_${n}_x86_64"; done
# fastprogress 1.0.3: 1.1.x imports python-fasthtml and its web stack, which the box lacks too
# shellcheck disable=SC2086
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $platforms --platform manylinux2014_x86_64 -d "$dir" \
    $pins fastprogress==1.0.3
python -m pip wheel -q --no-deps -w "$dir" "grad-cam==$grad_cam"  # published as a source only
ls "$dir"/*.whl | wc -l | xargs printf "gpu_wheels: %s wheels in $dir, "
du -sh "$dir" | cut -f1
