#!/usr/bin/env bash
# Write throughput of a local 3-replica cluster, 1 vs 64 concurrent clients, measured in one
# run (so the ratio carries across machines even when absolute figures do not), followed by a
# long write run that samples the data directories' size while snapshots and purges happen.
#
#   benches/write_throughput.sh [SECONDS_PER_LEVEL] [SOAK_SECONDS]
#
# Every counted write was acknowledged, i.e. committed on a quorum of fsynced logs.
set -euo pipefail
cd "$(dirname "$0")/.."
level_s=${1:-10}
soak_s=${2:-120}
cargo build --release --quiet
bin=target/release/fleet
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
ports=(17301 17302 17303)
peers=$(printf '127.0.0.1:%s,' "${ports[@]}"); peers=${peers%,}
# Compaction tuned so the soak crosses many snapshot/purge cycles.
cat > "$dir/fleet.toml" <<CONF
[raft]
snapshot_every_entries = 2000
keep_log_entries_after_snapshot = 500
CONF
for i in 1 2 3; do
    "$bin" --config "$dir/fleet.toml" join --node-id $i --listen 127.0.0.1:${ports[$((i-1))]} \
        --peers "$peers" --bootstrap-expect 3 --http-listen 127.0.0.1:0 --data-dir "$dir/node-$i" 2>"$dir/node-$i.log" &
done
for _ in $(seq 1 100); do
    "$bin" cluster status --peers "$peers" --output json 2>/dev/null | grep -q '"leader_view": true' && break
    sleep 0.2
done
echo "== write throughput (3 replicas on one machine, ${level_s}s per level)"
"$bin" bench --peers "$peers" --clients 1,64 --seconds "$level_s"

echo "== data directory size during a ${soak_s}s write run (64 clients)"
"$bin" bench --peers "$peers" --clients 64 --seconds "$soak_s" --output json > "$dir/soak.json" &
bench_pid=$!
start=$(date +%s)
while kill -0 $bench_pid 2>/dev/null; do
    now=$(( $(date +%s) - start ))
    # The database (Raft log, vote, markers) must stay bounded; the snapshot is the task state
    # itself and grows with the number of retained tasks.
    sizes=$(for n in 1 2 3; do
        db=$(du -sm "$dir/node-$n/db" | cut -f1)
        snap=$(du -sm "$dir/node-$n/snapshot.bin" 2>/dev/null | cut -f1)
        printf 'node-%s db=%sMiB snapshot=%sMiB  ' "$n" "$db" "${snap:-0}"
    done)
    status=$("$bin" cluster status --peers "$peers" --output json 2>/dev/null || true)
    applied=$(echo "$status" | sed -n 's/.*"applied_index": \([0-9]*\).*/\1/p' | head -1)
    purged=$(echo "$status" | sed -n 's/.*"purged_index": \([0-9]*\).*/\1/p' | head -1)
    echo "t=${now}s  $sizes applied=$applied purged=$purged"
    sleep 10
done
wait $bench_pid
sed -n 's/.*"writes": \([0-9]*\).*/soak writes acknowledged: \1/p; s/.*"writes_per_sec": \([0-9.]*\).*/soak writes\/s: \1/p' "$dir/soak.json"
du -sm "$dir"/node-1/db "$dir"/node-1/snapshot.bin | awk '{print "node-1 " $2 ": " $1 " MiB"}'
