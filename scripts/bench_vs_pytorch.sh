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
# PyTorch runs with its default settings (what users get: no OMP_WAIT_POLICY or other change);
# PASSIVE=1 adds a second PyTorch run with OMP_WAIT_POLICY=PASSIVE as an extra column.
# The CPU model, its instruction sets, the kernels each side used and the load average are printed
# with the figures. Run it on an otherwise idle machine: both thread pools degrade under load.
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
torch_out=$(env -u OMP_WAIT_POLICY OMP_NUM_THREADS=$threads "$python" "$script" --threads "$threads" --device "$device" "${extra[@]}")
passive_out=""
if [ "${PASSIVE:-0}" = 1 ]; then
  passive_out=$(OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE "$python" "$script" --threads "$threads" --device "$device" "${extra[@]}")
fi
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); flags: $(grep -m1 -o -w 'avx2\|fma\|f16c\|avx512f\|avx512bw\|avx512vnni\|avx512_bf16\|avx512_fp16' /proc/cpuinfo | sort -u | tr '\n' ' ' 2>/dev/null)"
echo "pytorch: $(env -u OMP_WAIT_POLICY "$python" -c 'import torch; print(torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())' 2>/dev/null)"
"$python" - "$wick_out" "$torch_out" "$load_before $(cut -d' ' -f1 /proc/loadavg)" "$passive_out" <<'PY'
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
passive = rows(sys.argv[4]) if sys.argv[4].strip() else {}
unit = rate(next(iter(wick.values())))[0]
extra = f" {'pytorch PASSIVE':>16}" if passive else ""
print(f"{'workload':36} {'wick ' + unit:>20} {'pytorch ' + unit:>20} {'ratio':>7}{extra}")
for name, w in wick.items():
    p = f" {rate(passive[name])[1]:16.2f}" if name in passive else ""
    if name not in torch:
        print(f"{name:36} {rate(w)[1]:20.2f} {'-':>20}{p}")
        continue
    print(f"{name:36} {rate(w)[1]:20.2f} {rate(torch[name])[1]:20.2f} {rate(w)[1] / rate(torch[name])[1]:6.2f}x{p}")
first = next(iter(wick.values()))
print(f"(threads {first.get('threads')}, device {first.get('device')}, wick kernels {first.get('isa', '?')}, load average before/after {sys.argv[3]})")
PY
