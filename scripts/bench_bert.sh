#!/usr/bin/env bash
# BERT speed, wick vs transformers (BERT-base forward b8 s128 and train step b8 s128, MiniLM-L6
# train step b32 s64): scripts/bench_bert.sh [--threads N] [--device cpu|cuda] [--rounds R]
# [--save FILE] [-- --iters N --only NAME,...] (options: scripts/bench_vs_pytorch.sh)
exec "$(dirname "$0")/bench_vs_pytorch.sh" bert scripts/bench_bert.py "$@"
