#!/usr/bin/env bash
# Schedules at scale on a local fleet: 3 replicas, release build.
#
#   [SCHEDULES=1000] [SECONDS_RUN=60] [WORKERS=4] [CONCURRENCY=32] benches/schedules.sh
#
# 1. The cost of the ticks alone: SCHEDULES schedules firing every second for SECONDS_RUN/2
#    seconds with no worker (the runs only queue up): Raft entries per second and the leader's
#    CPU, against the same cluster idle for 10 s before (the peer in the same run).
# 2. Lateness on a fresh cluster with WORKERS workers x CONCURRENCY slots running `true`:
#    SCHEDULES schedules firing every second for SECONDS_RUN seconds (start and end times
#    fixed, so SCHEDULES x SECONDS_RUN ticks). For every run, from the task records: fire
#    time -> run created (the scheduler's part) and fire time -> lease granted (what the
#    metric fleet.schedule.tick_lateness measures; includes waiting for a free worker slot).
#    Also: the leader's CPU and Raft entries per second over the firing window, and whether
#    every tick ran exactly once.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${SCHEDULES:-1000}
secs=${SECONDS_RUN:-60}
cargo build --release --quiet
bin=$PWD/target/release/fleet
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
ports=(17501 17502 17503)
peers=$(printf '127.0.0.1:%s,' "${ports[@]}"); peers=${peers%,}
declare -A pids

start_cluster() { # $1: data dir suffix
    for i in 1 2 3; do
        "$bin" join --node-id $i --listen 127.0.0.1:${ports[$((i-1))]} --peers "$peers" \
            --bootstrap-expect 3 --http-listen 127.0.0.1:0 --data-dir "$dir/$1-node-$i" 2>"$dir/$1-node-$i.log" &
        pids[$i]=$!
    done
    for _ in $(seq 1 100); do
        "$bin" cluster status --peers "$peers" --output json 2>/dev/null | grep -q '"leader_view": true' && return
        sleep 0.2
    done
    echo "no leader" >&2; exit 1
}
stop_cluster() {
    kill "${pids[@]}" $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
}
status() { "$bin" cluster status --peers "$peers" --output json; }
leader_pid() { local l; l=$(status | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_id"])'); echo "${pids[$l]}"; }
last_index() { status | python3 -c 'import json,sys; print(json.load(sys.stdin)["last_log_index"])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
schedule_file() { # $1: file, $2: start (s), $3: end (s)
    python3 - "$1" "$n" "$2" "$3" <<'PY'
import sys, datetime
path, n, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
iso = lambda s: datetime.datetime.fromtimestamp(s, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')
with open(path, 'w') as f:
    for i in range(n):
        f.write(f'[[schedule]]\nname = "s{i:04d}"\nevery = "1s"\nstart_at = "{iso(start)}"\n'
                f'end_at = "{iso(end)}"\nqueue = "bench"\ncommand = ["true"]\n\n')
PY
}
hz=$(getconf CLK_TCK)

echo "== 1. the cost of $n schedules' ticks, no workers"
start_cluster a
lp=$(leader_pid)
i0=$(last_index); c0=$(cpu_ticks "$lp"); sleep 10; i1=$(last_index); c1=$(cpu_ticks "$lp")
rate() { awk -v a="$1" -v b="$2" -v s="$3" 'BEGIN { printf "%.1f", (b - a) / s }'; }
cpu() { awk -v a="$1" -v b="$2" -v s="$3" -v hz="$hz" 'BEGIN { printf "%.1f", (b - a) * 100 / hz / s }'; }
echo "idle (peer): $(rate "$i0" "$i1" 10) entries/s, leader CPU $(cpu "$c0" "$c1" 10)%"
now=$(date +%s); half=$((secs / 2))
schedule_file "$dir/a.toml" $((now + 5)) $((now + 5 + half - 1))
"$bin" schedule apply --peers "$peers" "$dir/a.toml" > /dev/null
sleep $(( now + 5 - $(date +%s) ))
i0=$(last_index); c0=$(cpu_ticks "$lp"); sleep "$half"; i1=$(last_index); c1=$(cpu_ticks "$lp")
echo "$n schedules every second: $(rate "$i0" "$i1" "$half") entries/s, leader CPU $(cpu "$c0" "$c1" "$half")% (of one core)"
"$bin" schedule show s0000 --peers "$peers" | grep '^ticks:'
echo "(runs wait in the queue: $("$bin" queue stats --peers "$peers" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["value"]["bench"]["ready"])') ready tasks)"
stop_cluster

echo "== 2. lateness: $n schedules every second for $secs s, ${WORKERS:-4} workers x ${CONCURRENCY:-32} slots"
start_cluster b
for w in $(seq 1 "${WORKERS:-4}"); do
    "$bin" worker --peers "$peers" --queues bench --concurrency "${CONCURRENCY:-32}" --name "w$w" 2>"$dir/w$w.log" &
done
lp=$(leader_pid)
now=$(date +%s)
start=$((now + 8)); end=$((start + secs - 1))
schedule_file "$dir/b.toml" "$start" "$end"
"$bin" schedule apply --peers "$peers" "$dir/b.toml" > /dev/null
sleep $(( start - $(date +%s) ))
i0=$(last_index); c0=$(cpu_ticks "$lp")
sleep "$secs"
i1=$(last_index); c1=$(cpu_ticks "$lp")
echo "firing window: $(rate "$i0" "$i1" "$secs") entries/s, leader CPU $(cpu "$c0" "$c1" "$secs")% (of one core)"
want=$((n * secs))
for _ in $(seq 1 600); do
    left=$("$bin" queue stats --peers "$peers" --output json | python3 -c "
import json, sys
q = json.load(sys.stdin)['value'].get('bench', {})
print(sum(q.get(k, 0) for k in ('ready', 'delayed', 'running', 'failed')))")
    [ "$left" = 0 ] && break
    sleep 1
done
done_at=$(date +%s)
echo "last run finished $((done_at - end)) s after the last tick"
: > "$dir/tasks.jsonl"
after=0
while :; do
    "$bin" task list --peers "$peers" --queue bench --limit 10000 --after "$after" --output json > "$dir/page.json"
    after=$(python3 - "$dir/page.json" "$dir/tasks.jsonl" <<'PY'
import json, sys
ts = json.load(open(sys.argv[1]))['value']
with open(sys.argv[2], 'a') as f:
    for t in ts:
        f.write(json.dumps(t) + '\n')
print(ts[-1]['id'] if ts else 'end')
PY
)
    [ "$after" = end ] && break
done
python3 - "$dir/tasks.jsonl" "$want" <<'PY'
import json, sys, datetime, collections
want = int(sys.argv[2])
created, granted, per_tick = [], [], collections.Counter()
for line in open(sys.argv[1]):
    t = json.loads(line)
    env = dict(t['spec']['env'])
    fire = datetime.datetime.fromisoformat(env['FLEET_FIRE_TIME'].replace('Z', '+00:00')).timestamp() * 1000
    per_tick[(env['FLEET_SCHEDULE'], env['FLEET_FIRE_TIME'])] += 1
    created.append(t['submitted_at_ms'] - fire)
    if t['attempts']:
        granted.append(t['attempts'][0]['started_at_ms'] - fire)
q = lambda v, p: sorted(v)[min(len(v) - 1, int(p * len(v)))]
doubled = sum(1 for c in per_tick.values() if c > 1)
print(f"ticks with a run: {len(per_tick)} of {want}; doubled: {doubled}")
print(f"fire -> run created:   p50 {q(created, .5):.0f} ms  p99 {q(created, .99):.0f} ms  max {max(created):.0f} ms")
print(f"fire -> lease granted: p50 {q(granted, .5):.0f} ms  p99 {q(granted, .99):.0f} ms  max {max(granted):.0f} ms")
PY
