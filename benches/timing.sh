#!/usr/bin/env bash
# Chooses Raft timing by measurement: for each timing multiplier, a local 3-replica cluster
# runs a 64-client write load (counting elections that happen anyway: spurious ones), then the
# leader is killed with SIGKILL several times and the time until a new leader answers is
# measured (the killed node is restarted between rounds).
#
#   benches/timing.sh [MULTIPLIERS] [LOAD_SECONDS] [KILLS]
set -u  # no -e: a failed probe is retried or reported, not fatal
cd "$(dirname "$0")/.."
multipliers=${1:-"0.3 1.0"}
load_s=${2:-30}
kills=${3:-5}
cargo build --release --quiet
bin=target/release/fleet
ports=(17401 17402 17403)
peers=$(printf '127.0.0.1:%s,' "${ports[@]}"); peers=${peers%,}
declare -A pid
start_node() { # id multiplier dir
    "$bin" join --node-id "$1" --listen 127.0.0.1:${ports[$(($1-1))]} --peers "$peers" \
        --bootstrap-expect 3 --http-listen 127.0.0.1:0 --data-dir "$3/node-$1" --raft-timing-multiplier "$2" 2>>"$3/node-$1.log" &
    pid[$1]=$!
}
status() { "$bin" cluster status --peers "$1" --output json --retry-for 500ms 2>/dev/null || true; }
field() { sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p" | head -1; }
for m in $multipliers; do
    dir=$(mktemp -d)
    for i in 1 2 3; do start_node $i "$m" "$dir"; done
    until status "$peers" | grep -q '"leader_view": true'; do sleep 0.1; done
    term0=$(status "$peers" | field term)
    load=$("$bin" bench --peers "$peers" --clients 64 --seconds "$load_s" --output json 2>&1 || true)
    wps=$(echo "$load" | sed -n 's/.*"writes_per_sec": \([0-9]*\).*/\1/p')
    [ -n "$wps" ] || wps="failed ($(echo "$load" | tail -1))"
    until status "$peers" | grep -q '"leader_view": true'; do sleep 0.1; done
    term1=$(status "$peers" | field term)
    times=()
    for k in $(seq 1 "$kills"); do
        leader=$(status "$peers" | field leader_id)
        others=$(for i in 1 2 3; do [ "$i" != "$leader" ] && printf '127.0.0.1:%s,' "${ports[$((i-1))]}"; done); others=${others%,}
        t0=$(date +%s%N)
        kill -9 "${pid[$leader]}"; wait "${pid[$leader]}" 2>/dev/null || true
        while :; do
            s=$(status "$others")
            l=$(echo "$s" | field leader_id || true)
            echo "$s" | grep -q '"leader_view": true' && [ -n "$l" ] && [ "$l" != "$leader" ] && break
            sleep 0.02
        done
        times+=($(( ($(date +%s%N) - t0) / 1000000 )))
        echo "  multiplier $m, kill $k: node $leader killed, new leader after ${times[-1]} ms" >&2
        start_node "$leader" "$m" "$dir"
        # Wait until the restarted node has caught up and the cluster has a leader again.
        until [ "$("$bin" cluster status --local --peers 127.0.0.1:${ports[$((leader-1))]} --output json --retry-for 500ms 2>/dev/null | field leader_id)" != "" ]; do sleep 0.1; done
    done
    sorted=$(printf '%s\n' "${times[@]}" | sort -n | paste -sd' ')
    echo "multiplier $m: writes/s under load: $wps; term changes during ${load_s}s of 64-client load: $((term1 - term0)); failover after kill -9 (ms, sorted): $sorted"
    for i in 1 2 3; do kill "${pid[$i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
done
