#!/usr/bin/env bash
# The task lifecycle on a local fleet: 3 replicas and 2 workers (8 slots each), release build.
#
#   [CONCURRENCY=8] benches/lifecycle.sh [LATENCY_SAMPLES] [NOOP_TASKS]
#
# 1. Submit-to-start latency on an idle fleet: one task at a time, from just before
#    `fleet submit` runs to the moment the task's process starts (the task records its own
#    start time). The peer measured in the same run is the submit acknowledgement latency
#    (committed on a quorum of fsynced logs) of the same submissions.
# 2. End-to-end throughput of no-op tasks (`true`): NOOP_TASKS submitted at once with
#    `submit --file`, until every one has succeeded (submit -> lease -> run -> report, each
#    step committed through Raft). The peer is the acknowledged submit rate of the same batch.
set -euo pipefail
cd "$(dirname "$0")/.."
samples=${1:-200}
n=${2:-5000}
cargo build --release --quiet
bin=$PWD/target/release/fleet
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
ports=(17401 17402 17403)
peers=$(printf '127.0.0.1:%s,' "${ports[@]}"); peers=${peers%,}
for i in 1 2 3; do
    "$bin" join --node-id $i --listen 127.0.0.1:${ports[$((i-1))]} --peers "$peers" \
        --bootstrap-expect 3 --http-listen 127.0.0.1:0 --data-dir "$dir/node-$i" 2>"$dir/node-$i.log" &
done
for _ in $(seq 1 100); do
    "$bin" cluster status --peers "$peers" --output json 2>/dev/null | grep -q '"leader_view": true' && break
    sleep 0.2
done
for w in 1 2; do
    "$bin" worker --peers "$peers" --queues bench --concurrency "${CONCURRENCY:-8}" --name "w$w" 2>"$dir/w$w.log" &
done
for _ in $(seq 1 100); do
    [ "$("$bin" worker list --peers "$peers" --output json | grep -c '"active"')" = 2 ] && break
    sleep 0.1
done

echo "== submit-to-start latency, idle fleet, $samples tasks one at a time"
mkdir -p "$dir/starts"
for i in $(seq 1 "$samples"); do
    t0=$(date +%s%N)
    id=$("$bin" submit --peers "$peers" --queue bench -- sh -c "date +%s%N > $dir/starts/\$FLEET_TASK_ID")
    t1=$(date +%s%N)
    while [ ! -s "$dir/starts/$id" ]; do sleep 0.005; done
    echo "$id $t0 $t1 $(cat "$dir/starts/$id")" >> "$dir/latency"
done
python3 - "$dir/latency" <<'PY'
import sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1])]
ack = sorted((t1 - t0) / 1e6 for _, t0, t1, _ in rows)
start = sorted((s - t0) / 1e6 for _, t0, _, s in rows)
q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))]
print(f"submit acknowledged (peer): median {q(ack, .5):.1f} ms  p99 {q(ack, .99):.1f} ms")
print(f"submit to process start:    median {q(start, .5):.1f} ms  p99 {q(start, .99):.1f} ms")
print(f"ratio start/ack:            median {q(start, .5) / q(ack, .5):.2f}x")
PY
# Inside the cluster (leader clock, ms resolution): submission applied -> lease granted.
"$bin" task list --peers "$peers" --queue bench --limit 10000 --output json | python3 -c "
import json, sys
ts = json.load(sys.stdin)['value']
d = sorted(t['attempts'][0]['started_at_ms'] - t['submitted_at_ms'] for t in ts if t['attempts'])
q = lambda p: d[min(len(d) - 1, int(p * len(d)))]
print(f'submit applied -> lease granted (leader clock): median {q(.5)} ms  p99 {q(.99)} ms')
print('(the CLI process itself, start to exit, is most of the acknowledged latency above)')
"

echo "== end-to-end throughput of $n no-op tasks with 2 workers x ${CONCURRENCY:-8} slots"
python3 -c "
import json
with open('$dir/noop.jsonl', 'w') as f:
    for _ in range($n):
        f.write(json.dumps({'command': ['true'], 'queue': 'bench'}) + '\n')
"
t0=$(date +%s%N)
"$bin" submit --peers "$peers" --file "$dir/noop.jsonl" > /dev/null
t1=$(date +%s%N)
while :; do
    left=$("$bin" queue stats --peers "$peers" --output json | python3 -c "
import json, sys
q = json.load(sys.stdin)['value'].get('bench', {})
print(sum(q.get(k, 0) for k in ('ready', 'delayed', 'running', 'failed', 'dead')))")
    [ "$left" = 0 ] && break
    sleep 0.05
done
t2=$(date +%s%N)
python3 - "$n" "$t0" "$t1" "$t2" <<'PY'
import sys
n, t0, t1, t2 = map(int, sys.argv[1:])
sub = n / ((t1 - t0) / 1e9)
e2e = n / ((t2 - t0) / 1e9)
print(f"acknowledged submits (peer): {sub:,.0f} tasks/s")
print(f"submit -> run -> complete:   {e2e:,.0f} tasks/s ({(t2 - t0) / 1e9:.1f} s for {n})")
print(f"ratio end-to-end/submit:     {e2e / sub:.2f}")
PY
dead=$("$bin" task list --peers "$peers" --queue bench --state dead --output json | grep -c '"id"' || true)
echo "dead tasks: $dead"
