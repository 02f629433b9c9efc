#!/usr/bin/env bash
# GPT-2-small greedy decoding (batch 1, 16-token prompt, 128 new tokens, random weights): wick's
# benches/gpt2_decode.rs and transformers' scripts/bench_gpt2.py on the same machine with the same
# thread count; prints tokens/s side by side and the ratio wick / PyTorch.
#
#   scripts/bench_gpt2.sh [--threads N] [--dtypes f32,bf16] [--runs R] [--device cpu|cuda]
#
# (PyTorch in f16 on the CPU takes minutes per run; add f16 to --dtypes only if you mean it.)
#
# Needs a Python with torch and transformers: PYTHON=/path/to/venv/bin/python (default python3).
# Run it on an idle machine (check `uptime`): decoding is bound by memory bandwidth, which
# anything else running shares.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 dtypes=f32,bf16 runs=3 device=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --dtypes) dtypes=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
features=""
[ "$device" != cpu ] && features="--features cuda"
cargo build --release --bench gpt2_decode $features >&2
bench_bin=$(ls -t target/release/deps/gpt2_decode-* | grep -v '\.d$' | head -1)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
wick_out=$(RAYON_NUM_THREADS=$threads "$bench_bin" --dtype "$dtypes" --reps "$runs" --device "$device")
torch_out=""
for d in ${dtypes//,/ }; do
  torch_out+=$(OMP_NUM_THREADS=$threads "$python" scripts/bench_gpt2.py --threads "$threads" --dtype "$d" --runs "$runs" --device "$device")$'\n'
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
printf '%s\n%s' "$wick_out" "$torch_out"
"$python" - "$wick_out" "$torch_out" <<'PY'
import json, sys
rows = lambda s: [json.loads(l) for l in s.splitlines() if l.strip()]
wick = {r["dtype"]: r for r in rows(sys.argv[1])}
torch = {r["dtype"]: r for r in rows(sys.argv[2])}
print(f"{'dtype':6} {'wick tok/s':>11} {'pytorch tok/s':>14} {'ratio':>7}")
for d in torch:
    t = torch[d]["tokens_per_s"]
    if d in wick:
        w = wick[d]["tokens_per_s"]
        print(f"{d:6} {w:11.2f} {t:14.2f} {w / t:6.2f}x")
    else:
        print(f"{d:6} {'n/a':>11} {t:14.2f}     n/a  (wick: not supported on this device)")
PY
