#!/usr/bin/env bash
# Recovery times under every chaos scenario, over several seeds: median and worst per scenario.
#
#   benches/chaos.sh [SEEDS...]        (default: seeds 1 2 3 4 5)
#
# Each seed is one `chaos run --scenario all` (3 replicas, 3 workers x 4 slots, 8 tasks/s,
# --hold 4s, release build); the table comes from `chaos summarize` over their reports.
# Figures per scenario, from the moment of the fault (see chaos/README.md): new leader (when
# leadership moved), first lease (the first execution started after the fault, after the new
# leader when leadership moved), converged (heal to the end of the liveness phase), and tasks
# completed per second while the fault held (the workload submits 8 per second).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(1 2 3 4 5)
cargo build --release --quiet
out=${CHAOS_BENCH_OUT:-target/chaos-bench}
rm -rf "$out"; mkdir -p "$out"
reports=()
for s in "${seeds[@]}"; do
    echo "== seed $s" >&2
    if ! target/release/chaos run --scenario all --seed "$s" --out "$out/seed-$s" > "$out/seed-$s.log"; then
        echo "seed $s FAILED: see $out/seed-$s.log" >&2
        tail -30 "$out/seed-$s.log" >&2
        exit 1
    fi
    grep '^verdict' "$out/seed-$s.log" >&2
    reports+=("$out/seed-$s/report.json")
done
target/release/chaos summarize "${reports[@]}"
