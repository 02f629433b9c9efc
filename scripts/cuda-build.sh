#!/usr/bin/env bash
# Builds wick with `--features cuda` on any x86-64 Linux machine, GPU or not: installs a CUDA 13.0
# build toolchain from PyPI into .cuda/ (about 680 MB download, 1.2 GB on disk; skipped when
# present) and runs `cargo build --release --features cuda` with the arguments given, e.g.
#
#   scripts/cuda-build.sh --examples --benches
#
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200); set it for other GPUs. On a 2-core machine the
# first build takes about 5 minutes. To run the binaries on a machine without a GPU (where
# `--device cuda` then ends with a clear error), put .cuda/nvidia/cu13/lib on LD_LIBRARY_PATH and
# a libcuda.so.1 link to the stub in lib/stubs; never put the stub on a GPU machine's path.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WICK_CUDA_TOOLCHAIN:-$PWD/.cuda}
cargo fetch
bash scripts/install_cuda_toolchain.sh "$dest"
# shellcheck disable=SC1091
source "$dest/cuda_env.sh"
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
cargo build --release --features cuda "$@"
