#!/usr/bin/env bash
# Runs one of wick's benches and its PyTorch twin on the same machine with the same threads, and
# prints the rate of each workload side by side with the ratio wick / PyTorch.
#
#   scripts/bench_vs_pytorch.sh BENCH PYTHON_SCRIPT [--threads N] [--device cpu|cuda] [--rounds R]
#                               [--save FILE] [-- ARGS...]
#
# BENCH is a `[[bench]]` of Cargo.toml; PYTHON_SCRIPT prints the same workloads as JSON lines.
# ARGS after `--` go to both (e.g. `-- --iters 20`). Both print one JSON object a line, keyed by
# "bench" (or "name") and with a rate: seq_per_s, samples_per_s or tokens_per_s.
# Needs a Python with torch (+ transformers for the model benches): PYTHON=/path/to/venv/bin/python
#   python3 -m venv ~/wick-ref && ~/wick-ref/bin/pip install torch transformers
# PyTorch runs with its default settings (what users get: no OMP_WAIT_POLICY or other change);
# PASSIVE=1 adds a second PyTorch run with OMP_WAIT_POLICY=PASSIVE as an extra column.
# --rounds R runs the two sides R times, alternating (wick, PyTorch, wick, ...), and prints the
# medians and each round's ratio: on a machine whose speed drifts over minutes (shared VMs), one
# side's run can fall in a slow spell, and alternating rounds show it (a PASSIVE run comes once,
# after the rounds). --save FILE writes every run's JSON line, with "side" (wick or pytorch) and
# "round" added, for ratios the table omits (FILE is replaced).
# The CPU model, its instruction sets, the kernels each side used and the load average are printed
# with the figures. Run it on an otherwise idle machine: both thread pools degrade under load.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,21p "$0" >&2; exit 2; }
bench=$1 script=$2; shift 2
threads=2 device=cpu rounds=1 save="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --save) save=$(realpath -m "$2"); shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "--rounds takes a positive integer, not '$rounds'" >&2; exit 2; }
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
features=""
[ "$device" != cpu ] && features="--features cuda"
source scripts/bench_bin.sh
bench_bin=$(bench_bin "$bench" $features)
load_before=$(cut -d' ' -f1 /proc/loadavg)
[ -n "$save" ] && : > "$save"
wick_out="" torch_out=""
for ((round = 1; round <= rounds; round++)); do
  [ "$rounds" -gt 1 ] && echo "round $round of $rounds (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  wick_round=$(RAYON_NUM_THREADS=$threads "$bench_bin" --device "$device" "${extra[@]}")
  torch_round=$(env -u OMP_WAIT_POLICY OMP_NUM_THREADS=$threads "$python" "$script" --threads "$threads" --device "$device" "${extra[@]}")
  wick_out+=$wick_round$'\n' torch_out+=$torch_round$'\n'
  if [ -n "$save" ]; then
    "$python" -c 'import json, sys
for side, text in (("wick", sys.argv[2]), ("pytorch", sys.argv[3])):
    for line in filter(str.strip, text.splitlines()):
        print(json.dumps({**json.loads(line), "side": side, "round": int(sys.argv[1])}))' "$round" "$wick_round" "$torch_round" >> "$save"
  fi
done
passive_out=""
if [ "${PASSIVE:-0}" = 1 ]; then
  passive_out=$(OMP_NUM_THREADS=$threads OMP_WAIT_POLICY=PASSIVE "$python" "$script" --threads "$threads" --device "$device" "${extra[@]}")
fi
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); flags: $(grep -m1 -o -w 'avx2\|fma\|f16c\|avx512f\|avx512bw\|avx512vnni\|avx512_bf16\|avx512_fp16' /proc/cpuinfo | sort -u | tr '\n' ' ' 2>/dev/null)"
echo "pytorch: $(env -u OMP_WAIT_POLICY "$python" -c 'import torch; print(torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())' 2>/dev/null)"
"$python" - "$wick_out" "$torch_out" "$load_before $(cut -d' ' -f1 /proc/loadavg)" "$passive_out" <<'PY'
import json, statistics, sys
def rows(text):
    """Each workload's runs, in the order of the rounds."""
    out = {}
    for r in map(json.loads, filter(str.strip, text.splitlines())):
        key = r.get("bench") or r["name"]
        if "dtype" in r:
            key += f" [{r['dtype']}]"
        out.setdefault(key, []).append(r)
    return out
def rate(r):
    for k in ("seq_per_s", "samples_per_s", "tokens_per_s"):
        if k in r:
            return k, r[k]
    raise SystemExit(f"no rate in {r}")
def median_rate(runs):
    return statistics.median(rate(r)[1] for r in runs)
wick, torch = rows(sys.argv[1]), rows(sys.argv[2])
if not wick:
    raise SystemExit("wick's bench printed no results (a mistyped --only?)")
passive = rows(sys.argv[4]) if sys.argv[4].strip() else {}
rounds = max(len(v) for v in wick.values())
unit = rate(next(iter(wick.values()))[0])[0]
extra = f" {'pytorch PASSIVE':>16}" if passive else ""
per_round = "  ratio in each round" if rounds > 1 else ""
print(f"{'workload':36} {'wick ' + unit:>20} {'pytorch ' + unit:>20} {'ratio':>7}{extra}{per_round}")
for name, w in wick.items():
    p = f" {median_rate(passive[name]):16.2f}" if name in passive else ""
    if name not in torch:
        print(f"{name:36} {median_rate(w):20.2f} {'-':>20}{p}")
        continue
    ratios = [rate(a)[1] / rate(b)[1] for a, b in zip(w, torch[name])]
    each = "  " + " ".join(f"{r:.2f}" for r in ratios) if rounds > 1 else ""
    print(f"{name:36} {median_rate(w):20.2f} {median_rate(torch[name]):20.2f} {statistics.median(ratios):6.2f}x{p}{each}")
if rounds > 1:
    print(f"(medians over {rounds} alternating rounds; the ratio column is the median of the rounds' ratios)")
first = next(iter(wick.values()))[0]
print(f"(threads {first.get('threads')}, device {first.get('device')}, wick kernels {first.get('isa', '?')}, load average before/after {sys.argv[3]})")
PY
