# Sourced by the bench scripts. `bench_bin BENCH [CARGO FLAGS...]` builds the `[[bench]]` BENCH
# (release, `cargo bench --no-run`) and prints its executable's path as cargo reports it: tests/
# holds tests named like some benches (bert, attention), whose binaries sit beside the benches'
# in target/release/deps, so the newest `deps/BENCH-*` can be the test.
bench_bin() {
  local out
  out=$(cargo bench --bench "$1" --no-run "${@:2}" 2>&1) || { echo "$out" >&2; return 1; }
  sed -n 's/^ *Executable .*(\(.*\))$/\1/p' <<< "$out" | tail -1
}
