#!/usr/bin/env bash
# The compression study of the README's "Distillation and pruning" section, end to end with the
# `wick` command on SST-2 (../shared/data/sst2 or --data DIR with train.tsv and dev.tsv):
#
#   1. teacher: all-MiniLM-L6-v2 fine-tuned on the first --rows training rows;
#   2. a 3-layer student (teacher layers 0, 2, 4) distilled from it on the same rows, and the
#      same student trained on the labels alone (--alpha 0); then the student distilled on the
#      teacher's outputs alone (--alpha 1: no labels) over --transfer-rows rows, the teacher's
#      rows and unlabelled ones after them (Hinton et al.'s transfer set), and once more over
#      every training row (67,349; the best of its evaluations every 500 steps is kept), and the
#      labels-only student on every row; then a teacher fine-tuned on every row, the student
#      distilled from it (--alpha 0.5) on every row and the same student on the labels alone,
#      then both again over two epochs;
#   3. magnitude pruning of the teacher to 0/30/50/70/90% sparsity, each recovered on
#      --recovery-rows rows (`wick prune --sparsity 0,0.3,...`: sweep.json and sweep.svg);
#   4. the teacher with half its FFN neurons, recovered the same way, the neurons ranked by
#      weight norms and by Michel et al.'s gradient score, and the gradient-ranked one again
#      recovered on the teacher's --rows rows at its learning rate (1e-4);
#   5. distil -> prune -> quantize: the all-rows transfer-set student with half its FFN neurons
#      (recovered), then quantized to q8_0.
# Then `wick predict` on the dev set for every model (accuracy; seconds for 872 rows), and one
# table (size on disk, dev accuracy, predict seq/s). Every step writes its JSON summary in OUT.
#
#   scripts/compress_study.sh [--out DIR] [--rows 8000] [--transfer-rows 24000]
#                             [--recovery-rows 2560] [--threads 2] [--only-predict]
#
# Accuracy does not depend on the machine's load; the seq/s column does: run --only-predict
# again on an idle machine for the speeds. Takes about nine hours on 2 cores; a step whose summary
# is in OUT already is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/compress-study rows=8000 transfer_rows=24000 recovery_rows=2560 threads=2 only_predict=0
data=../shared/data/sst2
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --rows) rows=$2; shift 2 ;;
    --transfer-rows) transfer_rows=$2; shift 2 ;;
    --recovery-rows) recovery_rows=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --only-predict) only_predict=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build --release --bin wick >&2
wick="target/release/wick"
export RAYON_NUM_THREADS=$threads
mkdir -p "$out"
train=$data/train.tsv dev=$data/dev.tsv
common=(--data "$train" --eval "$dev" --max-len 64 --batch-size 32 --json)
step() { # name, then the wick arguments: runs once, keeps the summary (last JSON line)
  local name=$1; shift
  if [ -s "$out/$name.json" ]; then echo "$name: done before" >&2; return; fi
  echo "$name: wick $*  (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$wick" "$@" | tail -1 > "$out/$name.json.tmp"
  mv "$out/$name.json.tmp" "$out/$name.json"
}
if [ $only_predict = 0 ]; then
  minilm=$data/../all-MiniLM-L6-v2
  step teacher finetune --model "$minilm" --train "$train" --eval "$dev" --max-train-examples "$rows" \
    --epochs 1 --max-len 64 --batch-size 32 --lr 1e-4 --json --output "$out/teacher"
  step student distill --teacher "$out/teacher" --student-layers 3 --cache-teacher --alpha 0.5 --temperature 2 \
    --max-train-examples "$rows" --lr 3e-4 "${common[@]}" --output "$out/student"
  step student-labels distill --teacher "$out/teacher" --student-layers 3 --alpha 0 \
    --max-train-examples "$rows" --lr 3e-4 "${common[@]}" --output "$out/student-labels"
  step student-transfer distill --teacher "$out/teacher" --student-layers 3 --cache-teacher --alpha 1 --temperature 2 \
    --max-train-examples "$transfer_rows" --lr 3e-4 "${common[@]}" --output "$out/student-transfer"
  step student-transfer-all distill --teacher "$out/teacher" --student-layers 3 --cache-teacher --alpha 1 --temperature 2 \
    --lr 3e-4 --eval-every 500 "${common[@]}" --output "$out/student-transfer-all"
  step student-labels-all distill --teacher "$out/teacher" --student-layers 3 --alpha 0 \
    --lr 3e-4 --eval-every 500 "${common[@]}" --output "$out/student-labels-all"
  # the same comparison with a teacher fine-tuned on every row: the student distilled from it
  # (alpha 0.5) against the same student (its layers) trained on the labels alone
  step teacher-all finetune --model "$minilm" --train "$train" --eval "$dev" --eval-every 500 \
    --epochs 1 --max-len 64 --batch-size 32 --lr 1e-4 --json --output "$out/teacher-all"
  step student-all distill --teacher "$out/teacher-all" --student-layers 3 --cache-teacher --alpha 0.5 --temperature 2 \
    --lr 3e-4 --eval-every 500 "${common[@]}" --output "$out/student-all"
  step student-all-labels distill --teacher "$out/teacher-all" --student-layers 3 --alpha 0 \
    --lr 3e-4 --eval-every 500 "${common[@]}" --output "$out/student-all-labels"
  # the same two students over two epochs: the soft targets' gain is expected to show as the
  # labels-only student starts to overfit
  step student-all-e2 distill --teacher "$out/teacher-all" --student-layers 3 --cache-teacher --alpha 0.5 --temperature 2 \
    --epochs 2 --lr 3e-4 --eval-every 500 "${common[@]}" --output "$out/student-all-e2"
  step student-all-labels-e2 distill --teacher "$out/teacher-all" --student-layers 3 --alpha 0 \
    --epochs 2 --lr 3e-4 --eval-every 500 "${common[@]}" --output "$out/student-all-labels-e2"
  # both again with another seed (initialisation of the classifier, shuffling, dropout): one
  # run each cannot tell a 1.5-point lead from noise
  step student-all-e2-seed43 distill --teacher "$out/teacher-all" --student-layers 3 --cache-teacher --alpha 0.5 --temperature 2 \
    --epochs 2 --lr 3e-4 --eval-every 500 --seed 43 "${common[@]}" --output "$out/student-all-e2-seed43"
  step student-all-labels-e2-seed43 distill --teacher "$out/teacher-all" --student-layers 3 --alpha 0 \
    --epochs 2 --lr 3e-4 --eval-every 500 --seed 43 "${common[@]}" --output "$out/student-all-labels-e2-seed43"
  step sweep prune --model "$out/teacher" --sparsity 0,0.3,0.5,0.7,0.9 \
    --max-train-examples "$recovery_rows" --lr 3e-5 "${common[@]}" --output "$out/sweep"
  step ffn-half prune --model "$out/teacher" --ffn-keep 0.5 \
    --max-train-examples "$recovery_rows" --lr 3e-5 "${common[@]}" --output "$out/ffn-half"
  step ffn-half-gradient prune --model "$out/teacher" --ffn-keep 0.5 --importance gradient \
    --max-train-examples "$recovery_rows" --lr 3e-5 "${common[@]}" --output "$out/ffn-half-gradient"
  # the same with a longer recovery: the teacher's own rows, at the teacher's learning rate
  step ffn-half-gradient-long prune --model "$out/teacher" --ffn-keep 0.5 --importance gradient \
    --max-train-examples "$rows" --lr 1e-4 "${common[@]}" --output "$out/ffn-half-gradient-long"
  step student-ffn-half prune --model "$out/student-transfer-all" --ffn-keep 0.5 \
    --max-train-examples "$recovery_rows" --lr 3e-5 "${common[@]}" --output "$out/student-ffn-half"
  step student-ffn-half-q8_0 quantize --model "$out/student-ffn-half" --type q8_0 --json --output "$out/student-ffn-half-q8_0"
fi
models=(teacher student student-labels student-transfer student-transfer-all student-labels-all teacher-all student-all student-all-labels student-all-e2 student-all-labels-e2 student-all-e2-seed43 student-all-labels-e2-seed43 sweep/sparsity-0.5 sweep/sparsity-0.9 ffn-half ffn-half-gradient ffn-half-gradient-long student-ffn-half student-ffn-half-q8_0)
for m in "${models[@]}"; do
  name=predict-${m//\//-}
  rm -f "$out/$name.json"
  step "$name" predict --model "$out/$m" --input "$dev" --max-len 64 --batch-size 64 --json
done
python3 - "$out" "${models[@]}" <<'PY'
import json, os, sys
out, models = sys.argv[1], sys.argv[2:]
def size(folder):
    files = [f for f in ("model.safetensors", "model.gguf") if os.path.exists(os.path.join(out, folder, f))]
    return sum(os.path.getsize(os.path.join(out, folder, f)) for f in files) / 1e6
print(f"{'model':28} {'size MB':>8} {'dev acc':>8} {'seq/s':>7}")
for m in models:
    p = json.load(open(os.path.join(out, "predict-" + m.replace("/", "-") + ".json")))
    print(f"{m:28} {size(m):8.1f} {100 * p['accuracy']:7.2f}% {p['rows'] / p['seconds']:7.1f}")
sweep = json.load(open(os.path.join(out, "sweep.json")))
print("\nsparsity sweep (dev accuracy after pruning -> after recovery):")
for r in sweep["sweep"]:
    print(f"  {r['sparsity']:.1f}: {100 * r['eval_before_accuracy']:.2f}% -> {100 * r['eval_accuracy']:.2f}%")
PY
