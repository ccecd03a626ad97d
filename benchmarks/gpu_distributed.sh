#!/usr/bin/env bash
# The distributed path on a one-GPU machine: `torchrun --nproc_per_node 1` starts the same run as
# a launcher would on several GPUs (NCCL process group, DDP, DistributedDL, gathered validation,
# the cache's batched augmentation on the GPU), beside the same config in one plain process.
# With one rank the two must agree epoch by epoch; what only several GPUs show (the gathers
# across ranks, the padding, SyncBatchNorm, NCCL between devices) is tested with 2 gloo processes
# on CPUs in tests/test_distributed.py.
# Usage: bash benchmarks/gpu_distributed.sh [OUT_DIR]   (needs a GPU; the demo set, no downloads)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # and any carried wheels' folder after it
py="${PYTHON:-python3}"
out="${1:-/tmp/twincar-gpu-ddp}"
rm -rf "$out" && mkdir -p "$out"
args=(experiments/demo.yaml train.epochs=3 "reports_dir=$out/plain/reports" "models_dir=$out/plain/models")
"$py" -m twincar_fast.run "${args[@]}" > "$out/plain.log" 2>&1
args=(experiments/demo.yaml train.epochs=3 "reports_dir=$out/ddp/reports" "models_dir=$out/ddp/models")
"$py" -m torch.distributed.run --nproc_per_node 1 -m twincar_fast.run "${args[@]}" > "$out/ddp.log" 2>&1
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
out = Path(sys.argv[1])
runs = {k: next((out / k / "reports").iterdir()) for k in ("plain", "ddp")}
m = {k: pd.read_csv(r / "metrics.csv") for k, r in runs.items()}
s = {k: json.loads((r / "summary.json").read_text()) for k, r in runs.items()}
cols = ["valid_loss", "valid_acc", "valid_f1_macro", "train_loss", "time_s"]
for k in m:
    print(k, s[k]["machine"], "\n", m[k][["epoch", *cols]].to_string(index=False))
diff = (m["plain"][cols[:-1]] - m["ddp"][cols[:-1]]).abs().max()
print("largest |plain - ddp| per column:\n", diff.to_string())
print("wall s: plain", s["plain"]["wall_time_s"], "ddp", s["ddp"]["wall_time_s"])
PY
