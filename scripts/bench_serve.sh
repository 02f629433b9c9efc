#!/usr/bin/env bash
# `wick serve` under load with OpenAI's Python client: completions (GPT-2-small-shaped random
# weights, 64 new tokens) and embeddings (all-MiniLM-L6-v2) at concurrency 1, 4, 16, 64, a
# sentence-transformers loop beside them, then a soak at twice capacity with malformed requests
# (scripts/bench_serve.py says what each part measures).
#
#   scripts/bench_serve.sh [--threads 2] [--soak-seconds 120] [--skip soak] ...
#
# Needs a Python with torch, transformers, sentence-transformers and openai:
# PYTHON=/path/to/venv/bin/python (default python3). MiniLM and the GPT-2 tokenizer are read
# from ../shared/data (MINILM=..., GPT2_TOKENIZER=... to change). Run it on an idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
minilm=${MINILM:-../shared/data/all-MiniLM-L6-v2}
tokenizer=${GPT2_TOKENIZER:-../shared/data/gpt2-tokenizer}
cargo build --release --bin wick >&2
wick="${CARGO_TARGET_DIR:-target}/release/wick"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
exec "$python" scripts/bench_serve.py --wick "$wick" --minilm "$minilm" --gpt2-tokenizer "$tokenizer" "$@"
