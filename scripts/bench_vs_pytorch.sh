#!/usr/bin/env bash
# Runs one of wick's benches and its PyTorch twin on the same machine with the same threads, and
# prints the rate of each workload side by side with the ratio wick / PyTorch.
#
#   scripts/bench_vs_pytorch.sh BENCH PYTHON_SCRIPT [--threads N] [--device cpu|cuda] [-- ARGS...]
#
# BENCH is a `[[bench]]` of Cargo.toml; PYTHON_SCRIPT prints the same workloads as JSON lines.
# ARGS after `--` go to both (e.g. `-- --iters 20`). Both print one JSON object a line, keyed by
# "bench" (or "name") and with a rate: seq_per_s, samples_per_s or tokens_per_s.
# Needs a Python with torch (+ transformers for the model benches): PYTHON=/path/to/venv/bin/python
#   python3 -m venv ~/wick-ref && ~/wick-ref/bin/pip install torch transformers
# Run it on an otherwise idle machine: both frameworks' thread pools degrade badly under load.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,12p "$0" >&2; exit 2; }
bench=$1 script=$2; shift 2
threads=2 device=cpu extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
features=""
[ "$device" != cpu ] && features="--features cuda"
cargo build --release --bench "$bench" $features >&2
bench_bin=$(ls -t target/release/deps/"$bench"-* | grep -v '\.d$' | head -1)
load_before=$(cut -d' ' -f1 /proc/loadavg)
wick_out=$(RAYON_NUM_THREADS=$threads "$bench_bin" --device "$device" "${extra[@]}")
torch_out=$(OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE "$python" "$script" --threads "$threads" --device "$device" "${extra[@]}")
"$python" - "$wick_out" "$torch_out" "$load_before $(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import json, sys
def rows(text):
    out = {}
    for r in map(json.loads, text.splitlines()):
        key = r.get("bench") or r["name"]
        if "dtype" in r:
            key += f" [{r['dtype']}]"
        out[key] = r
    return out
def rate(r):
    for k in ("seq_per_s", "samples_per_s", "tokens_per_s"):
        if k in r:
            return k, r[k]
    raise SystemExit(f"no rate in {r}")
wick, torch = rows(sys.argv[1]), rows(sys.argv[2])
unit = rate(next(iter(wick.values())))[0]
print(f"{'workload':36} {'wick ' + unit:>20} {'pytorch ' + unit:>20} {'ratio':>7}")
for name, w in wick.items():
    if name not in torch:
        print(f"{name:36} {rate(w)[1]:20.2f} {'-':>20}")
        continue
    print(f"{name:36} {rate(w)[1]:20.2f} {rate(torch[name])[1]:20.2f} {rate(w)[1] / rate(torch[name])[1]:6.2f}x")
first = next(iter(wick.values()))
print(f"(threads {first.get('threads')}, device {first.get('device')}, load average before/after {sys.argv[3]})")
PY
