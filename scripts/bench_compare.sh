#!/usr/bin/env bash
# Runs wick's training-step benches and PyTorch's equivalents on the same machine with the same
# thread count, and prints samples/s side by side with the ratio wick / PyTorch.
#
#   scripts/bench_compare.sh [--threads N] [--seconds S] [--device cpu|cuda]
#
# Needs a Python with torch: PYTHON=/path/to/venv/bin/python (default: python3). Install with
#   python3 -m venv ~/wick-ref && ~/wick-ref/bin/pip install torch
# Run it on an otherwise idle machine: both frameworks' thread pools degrade badly under load.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 seconds=10 device=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
features=""
[ "$device" != cpu ] && features="--features cuda"
cargo build --release --bench train_step $features >&2
bench_bin=$(ls -t target/release/deps/train_step-* | grep -v '\.d$' | head -1)
wick_out=$(RAYON_NUM_THREADS=$threads "$bench_bin" --seconds "$seconds" --device "$device")
torch_out=$(OMP_NUM_THREADS=$threads "$python" scripts/bench_pytorch.py --threads "$threads" --seconds "$seconds" --device "$device")
"$python" - "$wick_out" "$torch_out" <<'PY'
import json, sys
wick = {r["name"]: r for r in map(json.loads, sys.argv[1].splitlines())}
torch = {r["name"]: r for r in map(json.loads, sys.argv[2].splitlines())}
print(f"{'workload':10} {'wick samples/s':>15} {'pytorch samples/s':>18} {'ratio':>7}")
for name in wick:
    w, t = wick[name]["samples_per_s"], torch[name]["samples_per_s"]
    print(f"{name:10} {w:15.1f} {t:18.1f} {w / t:6.2f}x")
print(f"(threads {next(iter(wick.values()))['threads']}, device {next(iter(wick.values()))['device']})")
PY
