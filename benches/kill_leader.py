#!/usr/bin/env python3
"""Failover after `kill -9` of the leader, under load, on a local fleet of real processes.

    benches/kill_leader.py [--rounds N] [--clients C] [--load-seconds S]

A 3-replica fleet (release build, default configuration, fsync on) and two workers (16 slots
each, queue `marked`) run under two loads at once:
  - C write clients (`fleet bench`, default 16), each with its own connection, every
    acknowledgement stamped in a timeline file;
  - a stream of marked tasks: a batch of 3,000 tasks of 20 ms each, kept topped up, every task
    appending its start time (ns) to a file.
Then, N times (default 10): `kill -9` of the leader at t0, and
  - first write: the first acknowledgement at or after t0 + 5 ms (no write the dead leader had
    committed can be acknowledged later than a few microseconds after its death: replies already
    in the kernel's socket buffers are delivered at once);
  - new leader: a surviving replica answering `cluster status` as leader (polled every 20 ms);
  - first lease: the first marked task started after t0 + 50 ms (the tasks leased by the old
    leader just before its death start within a few ms of t0).
The killed replica is restarted and caught up before the next round.

Before the kills, the same fleet takes a 64-client write load for --load-seconds (default 30)
and the term is read before and after: any change is a spurious election.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from fleetbench import FLEET, ROOT, Fleet, median, percentile, read_ns, wait_for  # noqa: E402


def first_after(values, t):
    for v in values:
        if v >= t:
            return v
    return None


def marked_batch(path, starts, n):
    with open(path, "w") as f:
        for _ in range(n):
            cmd = f"date +%s%N >> {starts}; sleep 0.02"
            f.write(json.dumps({"command": ["sh", "-c", cmd], "queue": "marked"}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--load-seconds", type=int, default=30)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)

    with Fleet() as fleet:
        fleet.start()
        d = fleet.dir
        # Spurious elections under a 64-client write load.
        term0 = fleet.term()
        load = subprocess.run(
            [FLEET, "bench", "--peers", fleet.peers, "--clients", "64",
             "--seconds", str(a.load_seconds), "--output", "json"],
            capture_output=True, text=True)
        if load.returncode != 0:
            raise SystemExit(f"64-client load failed: {load.stderr}")
        wps = json.loads(load.stdout)[0]["writes_per_sec"]
        term1 = wait_for("a leader after the load", lambda: fleet.leader() and fleet.term())
        print(f"64-client load: {wps:,.0f} writes/s for {a.load_seconds} s; "
              f"term changes (spurious elections): {term1 - term0}")

        for w in ("w1", "w2"):
            fleet.start_worker(w, 16, ["--queues", "marked"])
        starts = os.path.join(d, "starts")
        batch = os.path.join(d, "batch.jsonl")
        marked_batch(batch, starts, 3000)
        timeline = os.path.join(d, "timeline")
        rounds = []
        for r in range(1, a.rounds + 1):
            wait_for("a healthy fleet", lambda: fleet.leader() and all(
                fleet.caught_up(n) for n in fleet.procs), timeout=60)
            fleet.cli("submit", "--file", batch)
            old = fleet.leader()
            writer = subprocess.Popen(
                [FLEET, "bench", "--peers", fleet.peers, "--clients", str(a.clients),
                 "--seconds", "4", "--timeline", timeline, "--output", "json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            # Both loads running before the fault (pacing of the workload, not a sync point).
            wait_for("marked tasks running", lambda: len(read_ns(starts)) > 50)
            time.sleep(1.0)
            t0 = time.time_ns()
            fleet.kill(old)
            print(f"round {r}: kill -9 of node {old} at {t0}", flush=True)
            others = fleet.others(old)
            new = wait_for("a new leader", lambda: (lambda l: l if l and l != old else None)(
                fleet.leader(others)), timeout=30, every=0.02)
            t_leader = time.time_ns()
            _, err = writer.communicate(timeout=60)
            if writer.returncode != 0:
                raise SystemExit(f"the write load failed: {err}")
            wait_for("a task started by the new leader",
                     lambda: first_after(read_ns(starts), t0 + 50_000_000), timeout=30)
            acks = read_ns(timeline)
            first_write = first_after(acks, t0 + 5_000_000)
            first_lease = first_after(read_ns(starts), t0 + 50_000_000)
            row = {
                "round": r, "old": old, "new": new,
                "first_write_ms": (first_write - t0) / 1e6 if first_write else None,
                "new_leader_ms": (t_leader - t0) / 1e6,
                "first_lease_ms": (first_lease - t0) / 1e6,
            }
            rounds.append(row)
            print(f"round {r}: leader {old} -> {new}: first write {row['first_write_ms']:.0f} ms, "
                  f"new leader answers {row['new_leader_ms']:.0f} ms, "
                  f"first lease {row['first_lease_ms']:.0f} ms", flush=True)
            os.remove(timeline)
            fleet.start_node(old)
            # Let the batch drain before the next round.
            wait_for("the marked batch to drain", lambda: json.loads(fleet.cli(
                "queue", "stats", "--output", "json"))["value"].get("marked", {}).get(
                "ready", 0) == 0, timeout=120, every=0.2)

        def col(k):
            return [x[k] for x in rounds if x[k] is not None]
        summary = {k: {"median": median(col(k)), "p90": percentile(col(k), 0.9),
                       "max": max(col(k))}
                   for k in ("first_write_ms", "new_leader_ms", "first_lease_ms")}
        summary["spurious_elections"] = term1 - term0
        summary["load_writes_per_sec"] = wps
        print()
        for k in ("first_write_ms", "new_leader_ms", "first_lease_ms"):
            v = summary[k]
            print(f"{k:16} median {v['median']:6.0f} ms  p90 {v['p90']:6.0f} ms  "
                  f"max {v['max']:6.0f} ms")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"rounds": rounds, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
