#!/usr/bin/env bash
# Data-parallel training on MPI (src/dist), on this machine with 2 ranks:
#  1. installs OpenMPI (and libclang, which the `mpi` crate's bindings are generated with) from
#     Debian's packages when missing;
#  2. builds with `--features mpi` and runs tests/distributed.rs under `mpirun -np 2`: 2 ranks
#     with global batch B train as one process with batch B (losses, evaluations, weights),
#     with accumulation and with uneven shares; rank 0 alone writes; resume with as many ranks
#     continues, with another number is refused;
#  3. `wick train char-rnn` under `mpirun -np 2`: one rank prints, one model folder;
#  4. an error on the ranks, and a rank killed in the middle of training, end the whole job
#     with an error within seconds (not a hang).
# The CARGO_TARGET_DIR in the environment is used when set.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
missing=()
command -v mpirun >/dev/null || missing+=(openmpi-bin)
for pkg in libopenmpi-dev libclang-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} from Debian"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

mpirun=(mpirun -np 2 --oversubscribe)
[ "$(id -u)" = 0 ] && mpirun+=(--allow-run-as-root)

echo "== building with --features mpi"
cargo build --features mpi --bin wick
test_bin=$(cargo test --features mpi --test distributed --no-run --message-format=json \
    | grep -o '"executable":"[^"]*distributed[^"]*"' | tail -n 1 | cut -d'"' -f4)
wick_bin=$(cargo build --features mpi --bin wick --message-format=json \
    | grep -o '"executable":"[^"]*wick"' | tail -n 1 | cut -d'"' -f4)
[ -x "$test_bin" ] && [ -x "$wick_bin" ] || { echo "could not find the built test or wick binary"; exit 1; }

echo "== tests/distributed.rs on 2 ranks"
timeout 900 "${mpirun[@]}" "$test_bin" --test-threads=1 --nocapture

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for i in $(seq 1 60); do
    echo "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
done >"$work/text.txt"
char_rnn=(train char-rnn --data "$work/text.txt" --batch-size 8 --seq-len 32 --hidden 32 --embedding 16
    --eval-every 10 --sample-len 20)

echo "== wick train char-rnn on 2 ranks"
timeout 600 "${mpirun[@]}" "$wick_bin" "${char_rnn[@]}" --steps 20 --output "$work/run" --json >"$work/out.json" 2>"$work/err.txt"
# rank 0 alone prints: one JSON summary, one progress line set, one model folder
[ "$(grep -c '"val_loss"' "$work/out.json")" = 1 ] || { echo "expected one summary from rank 0:"; cat "$work/out.json" "$work/err.txt"; exit 1; }
[ -f "$work/run/model.safetensors" ] && [ -f "$work/run/metrics.jsonl" ] || { echo "no model folder / metrics"; exit 1; }
grep -q '"world_size": 2' "$work"/run/checkpoints/step-*/trainer_state.json || { echo "the checkpoint does not record 2 ranks"; exit 1; }

echo "== resuming that run with 1 process is refused"
if "$wick_bin" "${char_rnn[@]}" --steps 30 --output "$work/run" --resume 2>"$work/err.txt"; then
    echo "a resume with another number of processes must fail"; exit 1
fi
grep -q "number of processes (mpirun -np) was 2" "$work/err.txt" || { cat "$work/err.txt"; exit 1; }

echo "== an error on the ranks ends the job with its message (MPI_Abort), not a hang"
mkdir "$work/empty"
if timeout 120 "${mpirun[@]}" "$wick_bin" "${char_rnn[@]}" --steps 5 --output "$work/empty" --resume >"$work/err.txt" 2>&1; then
    echo "resuming from nothing must fail"; exit 1
fi
grep -q "error (rank 0 of 2): nothing to resume" "$work/err.txt" || { cat "$work/err.txt"; exit 1; }

echo "== a rank killed while training ends the job"
t0=$(date +%s)
set +e
timeout 300 "${mpirun[@]}" sh -c '
    if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then
        "$0" "$@" & pid=$!; sleep 5; kill -9 $pid; wait $pid
    else
        exec "$0" "$@"
    fi' "$wick_bin" "${char_rnn[@]}" --steps 100000 --output "$work/killed" >"$work/killed.txt" 2>&1
code=$?
set -e
waited=$(($(date +%s) - t0))
if [ $code = 0 ] || [ $code = 124 ]; then
    echo "mpirun exited $code after ${waited}s: the job should have failed at once"; cat "$work/killed.txt"; exit 1
fi
echo "mpirun exited $code ${waited}s after the start (the rank was killed at 5 s); it said:"
grep -v '^\s*$' "$work/killed.txt" | grep -iE "rank|signal|exit|abort" | head -n 5

echo "test-distributed: all passed in $(($(date +%s) - started)) s"
