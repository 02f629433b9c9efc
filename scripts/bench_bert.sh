#!/usr/bin/env bash
# BERT speed, wick vs transformers, same machine and threads: benches/bert.rs and
# scripts/bench_bert.py run the same workloads (BERT-base forward b8 s128, BERT-base train step
# b8 s128, MiniLM-L6 train step b32 s64); prints sequences/s side by side and the ratio.
#
#   scripts/bench_bert.sh [--threads N] [--iters N] [--device cpu|cuda]
#
# Needs a Python with torch + transformers: PYTHON=/path/to/venv/bin/python (default python3):
#   python3 -m venv ~/wick-ref && ~/wick-ref/bin/pip install torch transformers
# Run it on an otherwise idle machine: both frameworks' thread pools degrade badly under load.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 iters=10 device=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
features=""
[ "$device" != cpu ] && features="--features cuda"
cargo build --release --bench bert $features >&2
bench_bin=$(ls -t target/release/deps/bert-* | grep -v '\.d$' | head -1)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
wick_out=$(RAYON_NUM_THREADS=$threads "$bench_bin" --iters "$iters" --device "$device")
torch_out=$(OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE "$python" scripts/bench_bert.py --threads "$threads" --iters "$iters" --device "$device")
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$python" - "$wick_out" "$torch_out" <<'PY'
import json, sys
wick = {r["bench"]: r for r in map(json.loads, sys.argv[1].splitlines())}
torch = {r["bench"]: r for r in map(json.loads, sys.argv[2].splitlines())}
print(f"{'workload':28} {'wick seq/s':>11} {'pytorch seq/s':>14} {'ratio':>7}")
for name, w in wick.items():
    t = torch[name]
    print(f"{name:28} {w['seq_per_s']:11.2f} {t['seq_per_s']:14.2f} {w['seq_per_s'] / t['seq_per_s']:6.2f}x")
print(f"(threads {next(iter(wick.values()))['threads']}, device {next(iter(wick.values()))['device']})")
PY
