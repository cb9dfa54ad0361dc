#!/usr/bin/env bash
# The cost of metrics on write throughput: the same local 3-replica cluster (release build,
# fresh data directories each time) measured with `fleet bench` under three settings, in
# alternating rounds of one run:
#   off         [metrics] prometheus = false, statsd = false (no recorder installed)
#   prometheus  the default: /metrics served, and scraped by this script every second
#   both        prometheus as above, plus StatsD to a real statsd daemon (npm statsd)
#
#   benches/metrics.sh [SECONDS] [ROUNDS] [CLIENTS]     (default: 10 s, 2 rounds, 1,64 clients)
#
# Gauges are sampled every metrics.interval_ms (1 s); at 10,000 writes/s the leader's sample
# scans every retained task, so the figure includes that cost.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-2}
clients=${3:-1,64}
cargo build --release --quiet
.ci/install-tools >/dev/null
bin=$PWD/target/release/fleet
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/statsd.js" <<'JS'
{ address: "127.0.0.1", port: 18125, mgmt_address: "127.0.0.1", mgmt_port: 18126,
  flushInterval: 10000, backends: [] }
JS
node target/tools/node_modules/statsd/stats.js "$dir/statsd.js" > "$dir/statsd.log" 2>&1 &
ports=(17601 17602 17603)
peers=$(printf '127.0.0.1:%s,' "${ports[@]}"); peers=${peers%,}

run() {
    local mode=$1 round=$2 prom=false statsd=false
    case $mode in prometheus) prom=true ;; both) prom=true; statsd=true ;; esac
    local d="$dir/$mode-$round"
    mkdir -p "$d"
    printf '[metrics]\nprometheus = %s\nstatsd = %s\nstatsd_port = 18125\n' "$prom" "$statsd" > "$d/fleet.toml"
    local pids=()
    for i in 1 2 3; do
        "$bin" --config "$d/fleet.toml" join --node-id $i --listen 127.0.0.1:${ports[$((i-1))]} \
            --http-listen 127.0.0.1:1768$i --peers "$peers" --bootstrap-expect 3 \
            --data-dir "$d/node-$i" 2>"$d/node-$i.log" &
        pids+=($!)
    done
    for _ in $(seq 1 100); do
        "$bin" cluster status --peers "$peers" --output json 2>/dev/null | grep -q '"leader_view": true' && break
        sleep 0.2
    done
    local scraper=
    if [ "$prom" = true ]; then
        ( while true; do for i in 1 2 3; do curl -s -o /dev/null 127.0.0.1:1768$i/metrics || true; done; sleep 1; done ) &
        scraper=$!
    fi
    "$bin" bench --peers "$peers" --clients "$clients" --seconds "$secs" --output json > "$d/bench.json"
    [ -n "$scraper" ] && kill "$scraper" 2>/dev/null
    kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
    python3 - "$mode" "$round" "$d/bench.json" <<'PY'
import json, sys
mode, rnd, path = sys.argv[1:]
for lv in json.load(open(path)):
    print(f"{mode:<11} round {rnd}  clients {lv['clients']:>3}  writes/s {lv['writes_per_sec']:>9.0f}  "
          f"p50 {lv['p50_ms']:.2f} ms  p99 {lv['p99_ms']:.2f} ms")
PY
}

for r in $(seq 1 "$rounds"); do
    for mode in off prometheus both; do run "$mode" "$r"; done
done | tee "$dir/all.txt"
python3 - "$dir/all.txt" <<'PY'
import sys, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    rows[(f[0], int(f[4]))].append(float(f[6]))
print("\nmean writes/s over rounds, and ratio to off:")
for (mode, c), v in sorted(rows.items(), key=lambda x: (x[0][1], ["off","prometheus","both"].index(x[0][0]))):
    base = sum(rows[("off", c)]) / len(rows[("off", c)])
    m = sum(v) / len(v)
    print(f"  clients {c:>3}  {mode:<11} {m:>9.0f}  {m / base:.3f}x")
PY
