#!/usr/bin/env bash
# GPT-2-small greedy decoding (16-token prompts, 128 new tokens, random weights) at batch 1 and
# batch 8: wick's benches/gpt2_decode.rs and transformers' scripts/bench_gpt2.py on the same
# machine with the same thread count; prints tokens/s side by side, the ratio wick / PyTorch, and
# wick's memory-bandwidth limit (read bandwidth / weight bytes per decoding step; the bandwidth
# measured right before each of wick's timed runs, since it drifts on a shared machine).
#
#   scripts/bench_gpt2.sh [--threads N] [--dtypes f32,f16,bf16,q8_0,q4_0,q4_k] [--batches 1,8] [--runs R] [--device cpu|cuda]
#
# Quantized types (q8_0, q4_0, q4_k, q6_k: wick's linear layers quantized, see src/quant) are
# compared with PyTorch in f32, which runs once for them.
#
# (PyTorch in f16 on the CPU is very slow: its runs take minutes.)
#
# Needs a Python with torch and transformers: PYTHON=/path/to/venv/bin/python (default python3).
# The bench binary is built under $CARGO_TARGET_DIR (default target/).
# Run it on an idle machine (check `uptime`): decoding is bound by memory bandwidth, which
# anything else running shares.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 dtypes=f32,bf16 batches=1,8 runs=3 device=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --dtypes) dtypes=$2; shift 2 ;;
    --batches) batches=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
features=""
[ "$device" != cpu ] && features="--features cuda"
source scripts/bench_bin.sh
bench_bin=$(bench_bin gpt2_decode $features)
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
wick_out=$(RAYON_NUM_THREADS=$threads "$bench_bin" --dtype "$dtypes" --batch "$batches" --reps "$runs" --device "$device")
torch_out=""
torch_dtypes=$(echo "$dtypes" | tr ',' '\n' | sed 's/^q.*/f32/' | awk '!seen[$0]++' | tr '\n' ' ')
for d in $torch_dtypes; do
  for b in ${batches//,/ }; do
    line=$(OMP_NUM_THREADS=$threads "$python" scripts/bench_gpt2.py --threads "$threads" --dtype "$d" --batch "$b" --runs "$runs" --device "$device")
    echo "$line" >&2  # as it comes: PyTorch's bf16/f16 runs on the CPU are slow
    torch_out+=$line$'\n'
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
printf '%s\n%s' "$wick_out" "$torch_out"
"$python" - "$wick_out" "$torch_out" <<'PY'
import json, sys
rows = lambda s: [json.loads(l) for l in s.splitlines() if l.strip()]
wick = {(r["dtype"], r.get("batch", 1)): r for r in rows(sys.argv[1])}
torch = {(r["dtype"], r.get("batch", 1)): r for r in rows(sys.argv[2])}
if wick:
    w0 = next(iter(wick.values()))
    print(f"cpu: {w0.get('cpu')}; wick kernels: {w0.get('isa')}; read bandwidth measured before each of wick's runs, limit from its median")
print(f"{'dtype':6} {'batch':>5} {'wick tok/s':>11} {'decode':>8} {'limit':>8} {'of limit':>8} {'pytorch tok/s':>14} {'ratio':>7}")
for key in sorted(set(wick) | set(torch), key=lambda k: (k[0], k[1])):
    d, b = key
    # Quantized wick models are compared with PyTorch in f32.
    t = torch.get((d if not d.startswith("q") else "f32", b), {}).get("tokens_per_s")
    if d == "f32" and key not in wick:
        continue
    w = wick.get(key)
    if w is None:
        print(f"{d:6} {b:5} {'n/a':>11} {'':>8} {'':>8} {'':>8} {t:14.2f}     n/a  (wick: not supported on this device)")
        continue
    lim = w.get("limit_tokens_per_s") or float("nan")
    # Each run against the bandwidth measured just before it (the machine's may drift).
    of = w.get("of_limit")
    if of is None:  # older benches, or no bandwidth (a GPU)
        of = w["decode_tokens_per_s"] / lim
    frac = f"{100 * of:7.0f}%" if of == of else f"{'':>8}"
    # (JSON has no NaN: a run without a bandwidth, on a GPU, holds nulls)
    each = [x for x in w.get("read_bandwidth_gb_s_each_run") or [] if isinstance(x, (int, float))]
    ts = f"{t:14.2f}" if t else f"{'n/a':>14}"
    ratio = f"{w['tokens_per_s'] / t:6.2f}x" if t else f"{'n/a':>7}"
    vs = " (vs PyTorch f32)" if d.startswith("q") else ""
    bw = f"  (bandwidth {min(each):.1f}–{max(each):.1f} GB/s)" if each else ""
    # Decoding over wick's f32 in the same repetitions (the bench runs the formats side by side).
    paired = f"  {w['decode_vs_f32']:.2f}x wick f32" if w.get("decode_vs_f32") else ""
    print(f"{d:6} {b:5} {w['tokens_per_s']:11.2f} {w['decode_tokens_per_s']:8.1f} {lim:8.1f} {frac} {ts} {ratio}{vs}{bw}{paired}")
PY
