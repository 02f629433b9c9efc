#!/usr/bin/env bash
# Times wick's fused attention, the same maths in plain candle ops, and PyTorch's
# scaled_dot_product_attention on the same machine with the same thread count, and prints a table
# with the speed-up of the fused op over both (time of the other / time of ours).
#
#   scripts/bench_attention.sh [--threads N] [--seconds S] [--seqs 256,1024,4096] [--head-dims 64]
#                              [--dtype f32|f16|bf16] [--device cpu|cuda] [--backward]
#                              [--batch 1] [--heads 12]
#
# Shapes: batch 1, 12 heads by default, causal and not. Needs a Python with torch:
# PYTHON=/path/to/venv/bin/python (default: python3); install with
#   python3 -m venv venv && venv/bin/pip install torch
# Run it on an otherwise idle machine: both thread pools degrade badly under load.
# BENCH_BIN=path skips the cargo build and runs that (already built) bench binary.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 seconds=2 seqs=256,1024,4096 head_dims=64 dtype=f32 device=cpu backward="" batch=1 heads=12
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --seqs) seqs=$2; shift 2 ;;
    --head-dims) head_dims=$2; shift 2 ;;
    --dtype) dtype=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --backward) backward=--backward; shift ;;
    --batch) batch=$2; shift 2 ;;
    --heads) heads=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
if [ -z "${BENCH_BIN:-}" ]; then
  features=""
  [ "$device" != cpu ] && features="--features cuda"
  source scripts/bench_bin.sh
  BENCH_BIN=$(bench_bin attention $features)
fi
common=(--seconds "$seconds" --seqs "$seqs" --head-dims "$head_dims" --dtype "$dtype" --device "$device" --batch "$batch" --heads "$heads" $backward)
wick_out=$(RAYON_NUM_THREADS=$threads "$BENCH_BIN" "${common[@]}")
torch_out=$(OMP_NUM_THREADS=$threads "$python" scripts/bench_attention.py --threads "$threads" "${common[@]}")
"$python" - "$wick_out" "$torch_out" <<'PY'
import json, sys
rows = [json.loads(l) for part in sys.argv[1:] for l in part.splitlines() if l.startswith("{")]
key = lambda r: (r["head_dim"], r["seq"], r["causal"])
by = {}
for r in rows:
    by.setdefault(key(r), {})[r["impl"]] = r
first = rows[0]
print(f"attention {'forward+backward' if first['backward'] else 'forward'}, batch {first['batch']}, "
      f"heads {first['heads']}, {first['dtype']}, {first['device']}, threads {first['threads']} (median ms)")
print(f"{'d':>4} {'seq':>6} {'causal':>6} {'fused':>9} {'candle':>9} {'torch':>9} {'vs candle':>10} {'vs torch':>9} {'fused TFLOP/s':>14} {'extra MiB':>10}")
for k in sorted(by):
    r = by[k]
    f, c, t = (r.get(n, {}).get("ms") for n in ("fused", "reference", "sdpa"))
    fmt = lambda x: f"{x:9.2f}" if x else f"{'-':>9}"
    ratio = lambda x: f"{x / f:9.2f}x" if x and f else f"{'-':>10}"
    extra = r.get("fused", {}).get("extra_bytes")
    print(f"{k[0]:4} {k[1]:6} {str(k[2]):>6} {fmt(f)} {fmt(c)} {fmt(t)} {ratio(c):>10} {ratio(t):>9} "
          f"{r['fused']['tflops'] if 'fused' in r else 0:14.3f} {extra / 2**20 if extra is not None else float('nan'):10.2f}")
PY
