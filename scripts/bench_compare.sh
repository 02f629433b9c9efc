#!/usr/bin/env bash
# Training-step throughput of the MLP, LeNet-5 and char-LSTM workloads, wick vs PyTorch:
#   scripts/bench_compare.sh [--threads N] [--device cpu|cuda] [--rounds R] [--save FILE] [-- --seconds S]
exec "$(dirname "$0")/bench_vs_pytorch.sh" train_step scripts/bench_pytorch.py "$@"
