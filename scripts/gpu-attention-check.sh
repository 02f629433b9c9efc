#!/usr/bin/env bash
# Checks and benchmarks wick's fused attention on an NVIDIA GPU, on a machine that has the GPU
# driver, PyTorch (with CUDA) and safetensors but no Rust: the binaries are built elsewhere.
#
# 1. On the build machine (CUDA toolkit, no GPU needed):
#      source /work/cuda-tc/cuda_env.sh   # or scripts/cuda-build.sh's toolchain
#      export CUDA_COMPUTE_CAP=90 CUDAFORGE_THREADS=2
#      CARGO_TARGET_DIR=/work/target-cuda cargo build --release --features cuda --tests --benches
#      scripts/gpu-attention-check.sh --collect /work/target-cuda
#    which puts the attention test and bench binaries, stripped and gzipped (~13 MB each), in
#    gpu-bin/ (git-ignored: carry that folder with the repository).
# 2. On the GPU machine, from anywhere:
#      scripts/gpu-attention-check.sh [--quick]
#    a)-c) run for both CUDA kernels (WICK_ATTENTION_CUDA_KERNEL=simt, the default, and wmma,
#       the tensor-core one for f16/bf16):
#    a) the Rust tests of tests/attention.rs on CUDA (WICK_TEST_DEVICE=cuda): fused vs the
#       candle-ops reference (f32 1e-5, gradients 1e-4; f16/bf16 1e-2) and both vs the PyTorch
#       fixture;
#    b) scripts/attention_check.py: wick vs torch SDPA on larger random cases (f32 < 1e-5,
#       bf16 < 1e-2);
#    c) the TFLOP/s table: our kernel vs candle unfused vs torch SDPA, bf16, head_dim 64 and 128,
#       seq 512..8192, causal and not, batch 4, 16 heads (scripts/bench_attention.sh; candle
#       unfused only up to seq 4096, where its (4, 16, seq, seq) f32 scores take 4 GiB each).
#    --quick: smaller bench (seq 512..2048, 0.5 s per point).
# PYTHON=/path/to/python picks the Python (default python3). Exit status: nonzero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=gpu-bin

if [ "${1:-}" = "--collect" ]; then
  target=${2:?usage: --collect CARGO_TARGET_DIR}
  mkdir -p "$bin"
  test_bin="" bench_bin=""
  # tests/attention.rs and benches/attention.rs both build to deps/attention-<hash>: tell them
  # apart by the source their .d file names; newest first.
  for f in $(ls -t "$target"/release/deps/attention-* | grep -v '\.d$'); do
    if grep -q 'tests/attention.rs' "$f.d" 2>/dev/null; then
      [ -z "$test_bin" ] && test_bin=$f
    elif grep -q 'benches/attention.rs' "$f.d" 2>/dev/null; then
      [ -z "$bench_bin" ] && bench_bin=$f
    fi
  done
  [ -n "$test_bin" ] && [ -n "$bench_bin" ] || { echo "no attention test/bench binaries under $target/release/deps" >&2; exit 1; }
  # ~120 MB each with candle's kernels: stripped and gzipped they are ~13 MB (carry limit 64 MiB)
  for pair in "$test_bin:attention-test" "$bench_bin:attention-bench"; do
    objcopy --strip-all "${pair%%:*}" "$bin/${pair##*:}"
    gzip -f "$bin/${pair##*:}"
  done
  ls -la "$bin"
  exit 0
fi

quick=""
[ "${1:-}" = "--quick" ] && quick=1
python=${PYTHON:-python3}
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
for name in attention-test attention-bench; do
  [ -f "$bin/$name.gz" ] || { echo "missing $bin/$name.gz: build and --collect first (see the top of this script)" >&2; exit 1; }
  gunzip -c "$bin/$name.gz" > "$run/$name"
  chmod +x "$run/$name"
  if ldd "$run/$name" | grep -q 'not found'; then
    echo "$name lacks libraries:" >&2; ldd "$run/$name" | grep 'not found' >&2; exit 1
  fi
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

status=0
# Both CUDA kernels: the CUDA-core one (default) and the tensor-core one for f16/bf16 (opt-in).
for kernel in simt wmma; do
  export WICK_ATTENTION_CUDA_KERNEL=$kernel
  echo "== a) Rust attention tests on CUDA (kernel $kernel)"
  WICK_TEST_DEVICE=cuda "$run/attention-test" --test-threads 1 || status=1
  echo "== b) wick vs torch SDPA (kernel $kernel)"
  "$python" scripts/attention_check.py --bench-bin "$run/attention-bench" --device cuda || status=1
done

if [ -n "$quick" ]; then seqs=512,1024,2048 seconds=0.5; else seqs=512,1024,2048,4096,8192 seconds=1; fi
for kernel in simt wmma; do
  export WICK_ATTENTION_CUDA_KERNEL=$kernel
  echo "== c) TFLOP/s, bf16 (our kernel: $kernel)"
  BENCH_BIN="$run/attention-bench" PYTHON="$python" scripts/bench_attention.sh --device cuda --dtype bf16 \
    --head-dims 64,128 --seqs "$seqs" --batch 4 --heads 16 --seconds "$seconds" || status=1
done
echo "== c') f32, head_dim 64 (CUDA-core kernel)"
WICK_ATTENTION_CUDA_KERNEL=simt BENCH_BIN="$run/attention-bench" PYTHON="$python" scripts/bench_attention.sh --device cuda \
  --dtype f32 --head-dims 64 --seqs 1024,4096 --batch 4 --heads 16 --seconds "$seconds" || status=1
exit $status
