#!/usr/bin/env bash
# Failover of a hung leader on a local fleet: 3 replicas and 2 workers (4 slots each), release
# build, default timing ([health] stall_threshold_ms = 3000, election timeout 500-1000 ms).
#
#   benches/failover.sh [RUNS]
#
# Each run keeps the workers busy (a batch of 1000 tasks of 100 ms, each recording its start
# time), hangs the leader, and measures from the moment of the fault:
#   - detection: for a stalled loop, the stalled replica's own log line declaring the stall;
#     for SIGSTOP, the new leader's log line taking over (the followers' election timeout is
#     the detector);
#   - new leader: the new leader's log line "leading: scheduling";
#   - first lease: the first task process started after the fault (no lease is granted while
#     the old leader hangs, so it was leased by the new one).
# Two kinds, RUNS runs each (default 5): `stall` (fleet fault stall --component scheduler) and
# `sigstop` (kill -STOP, then -CONT once the new leader leads). The peer in the same run is a
# plain kill -9 of the leader (`kill`), the failover Raft alone gives.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --quiet
bin=$PWD/target/release/fleet
dir=$(mktemp -d)
trap 'kill -CONT $(jobs -p) 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
printf '[fault_injection]\nenabled = true\n' > "$dir/fleet.toml"
ports=(17501 17502 17503)
peers=$(printf '127.0.0.1:%s,' "${ports[@]}"); peers=${peers%,}
declare -A pid
start_node() {
    local i=$1
    "$bin" --config "$dir/fleet.toml" join --node-id "$i" --listen 127.0.0.1:${ports[$((i-1))]} \
        --http-listen 127.0.0.1:0 --peers "$peers" --bootstrap-expect 3 \
        --data-dir "$dir/node-$i" 2>>"$dir/node-$i.log" &
    pid[$i]=$!
}
for i in 1 2 3; do start_node "$i"; done
leader() {
    "$bin" cluster status --peers "$1" --retry-for 2s --output json 2>/dev/null |
        python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["leader_id"] if s["leader_view"] else "")' 2>/dev/null || true
}
healthy() { "$bin" health --cluster --peers "$peers" >/dev/null 2>&1; }
for _ in $(seq 1 100); do [ -n "$(leader "$peers")" ] && break; sleep 0.2; done
for w in 1 2; do
    "$bin" worker --peers "$peers" --concurrency 4 --name "w$w" 2>"$dir/w$w.log" &
done
python3 - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
with open(f"{d}/tasks.jsonl", "w") as f:
    for _ in range(1000):
        f.write(json.dumps({"command": ["sh", "-c", f"date +%s%N >> {d}/starts; sleep 0.1"]}) + "\n")
PY

for kind in stall sigstop kill; do
    for run in $(seq 1 "$runs"); do
        for _ in $(seq 1 150); do healthy && break; sleep 0.2; done
        old=$(leader "$peers")
        others=$(for i in 1 2 3; do [ "$i" = "$old" ] || printf '127.0.0.1:%s,' "${ports[$((i-1))]}"; done)
        others=${others%,}
        "$bin" submit --peers "$peers" --file "$dir/tasks.jsonl" >/dev/null
        sleep 1 # let the workers fill their slots (workload pacing)
        t0=$(date +%s%N)
        case $kind in
            stall) "$bin" fault stall --component scheduler --for 8s --peers "127.0.0.1:${ports[$((old-1))]}" >/dev/null ;;
            sigstop) kill -STOP "${pid[$old]}" ;;
            kill) kill -9 "${pid[$old]}" ;;
        esac
        new=""
        for _ in $(seq 1 400); do
            new=$(leader "$others")
            [ -n "$new" ] && [ "$new" != "$old" ] && break
            sleep 0.05
        done
        # Give the new leader's first grants time to start, then read the records.
        sleep 2
        echo "$kind $run $old $new $t0" >> "$dir/runs"
        case $kind in
            stall) sleep 6 ;;  # the stall ends by itself
            sigstop) kill -CONT "${pid[$old]}" ;;
            kill) start_node "$old" ;;
        esac
        # Let the batch drain before the next run (pacing of the workload).
        for _ in $(seq 1 300); do
            [ "$("$bin" queue stats --peers "$peers" --output json 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin)["value"]; print(sum(q["ready"]+q["running"] for q in v.values()))' 2>/dev/null)" = 0 ] && break
            sleep 0.2
        done
    done
done

python3 - "$dir" <<'PY'
import re, sys, datetime, statistics
d = sys.argv[1]
starts = sorted(int(l) for l in open(f"{d}/starts") if l.strip())
def stamps(node, pattern):
    out = []
    for line in open(f"{d}/node-{node}.log", errors="replace"):
        if pattern in line:
            m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
            if m:
                t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
                out.append(int(t.timestamp() * 1e9))
    return out
def first_after(ts, t0):
    later = [t for t in ts if t > t0]
    return (later[0] - t0) / 1e6 if later else float("nan")
results = {}
for line in open(f"{d}/runs"):
    kind, run, old, new, t0 = line.split(); t0 = int(t0)
    lead = first_after(stamps(new, "leading: scheduling"), t0)
    detect = first_after(stamps(old, "made no progress past the stall threshold"), t0) if kind == "stall" else lead
    # Tasks leased just before the fault start within milliseconds of it.
    lease = first_after([s for s in starts if s > t0 + 50_000_000], t0)
    results.setdefault(kind, []).append((detect, lead, lease))
    print(f"{kind:8} run {run}: leader {old} -> {new}: detected {detect:7.0f} ms, new leader {lead:7.0f} ms, first lease {lease:7.0f} ms")
print()
print(f"{'fault':8} {'runs':>4} {'detection (median)':>19} {'new leader (median)':>20} {'first lease (median, worst)':>28}")
for kind, rows in results.items():
    med = lambda i: statistics.median(r[i] for r in rows)
    worst = max(r[2] for r in rows)
    print(f"{kind:8} {len(rows):4} {med(0):16.0f} ms {med(1):17.0f} ms {med(2):17.0f} ms, {worst:5.0f} ms")
PY
