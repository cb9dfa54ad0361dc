#!/usr/bin/env python3
"""Queue depth: does a deep queue slow fleet down, and what does a queued task cost?

    python3 benches/queue_depth.py [--queued N] [--tasks N] [--rounds N]

A local fleet (3 replicas, defaults, fsync on; 4 workers x 32 slots on queue `bench`):

  1. end-to-end no-op tasks/s with nothing else queued (`--tasks` tasks, `true` each);
  2. `--queued` tasks of a typical size submitted to queue `parked`, which no worker serves
     (they stay queued and retained);
  3. the same tasks/s again, with those queued;
  4. each replica's RSS before and after (bytes per queued task), the data directories
     against the bytes submitted, and the time a killed follower takes from restart to
     serving (caught up with the leader).

Steps 1 and 3 alternate `--rounds` times once the queue is full (empty queue measured on a
second fleet started the same way), and the medians are compared. Prints a Markdown table
and writes JSON to queue-depth.json (or --out).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from fleetbench import Fleet, queue_counts, tasks_per_second, wait_for  # noqa: E402


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def typical_task(i):
    """A task as an ETL user would submit it: a script with a few arguments."""
    return {"command": ["python3", "/srv/etl/load_partition.py", "--date", "2026-12-01",
                        "--partition", str(i)], "queue": "parked"}


def fill(f, n):
    """Submits `n` typical tasks to `parked`; the bytes submitted and the submit rate."""
    path = os.path.join(f.dir, "parked.jsonl")
    size = 0
    with open(path, "w") as out:
        for i in range(n):
            line = json.dumps(typical_task(i)) + "\n"
            size += len(line)
            out.write(line)
    t0 = time.monotonic()
    f.cli("submit", "--file", path, timeout=3600)
    took = time.monotonic() - t0
    wait_for(f"{n} tasks queued",
             lambda: queue_counts(f, "parked").get("ready", 0) >= n, timeout=300)
    os.remove(path)
    return size, n / took


def restart_to_serving(f):
    """Kills a follower with SIGKILL, restarts it, and times it until it answers a local
    status call having applied everything the leader had committed when it was killed."""
    leader = f.leader()
    node = next(n for n in f.procs if n != leader)
    committed = f.status()["commit_index"]
    f.kill(node)
    t0 = time.monotonic()
    f.start_node(node)

    def serving():
        try:
            s = f.status(peers=f.addr(node), local=True)
        except Exception:
            return False
        return (s.get("applied_index") or 0) >= committed

    wait_for(f"node {node} to serve again", serving, timeout=600, every=0.05)
    return time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queued", type=int, default=200_000)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="queue-depth.json")
    cfg = ap.parse_args()
    res = {"queued": cfg.queued, "tasks": cfg.tasks, "empty": [], "deep": []}
    with Fleet(base_port=17601) as empty, Fleet(base_port=17611) as deep:
        for f in (empty, deep):
            f.start()
        rss0 = {n: rss_bytes(p.pid) for n, p in deep.procs.items()}
        submitted, rate = fill(deep, cfg.queued)
        res["submit_per_sec"] = rate
        # Let a snapshot settle the data directories before measuring them.
        time.sleep(2)  # pacing: background snapshot and sled flush, not synchronization
        rss1 = {n: rss_bytes(p.pid) for n, p in deep.procs.items()}
        res["rss_per_queued_task"] = {
            n: (rss1[n] - rss0[n]) / cfg.queued for n in rss0}
        res["submitted_bytes"] = submitted
        res["data_dir_bytes"] = {
            n: dir_bytes(os.path.join(deep.dir, f"node-{n}")) for n in deep.procs}
        for f, name in ((empty, "empty"), (deep, "deep")):
            for i in range(4):
                f.start_worker(f"{name}{i}", 32, ["--queues", "bench"])
        for r in range(cfg.rounds):
            for f, name in ((empty, "empty"), (deep, "deep")):
                # Only one fleet's workers find work at a time: the other's are idle.
                res[name].append(tasks_per_second(f, cfg.tasks))
                print(f"round {r + 1}: {name} {res[name][-1]:.0f} tasks/s", flush=True)
        res["restart_s"] = restart_to_serving(deep)
    e, d = statistics.median(res["empty"]), statistics.median(res["deep"])
    res["ratio"] = d / e
    rss = statistics.median(res["rss_per_queued_task"].values())
    disk = statistics.median(res["data_dir_bytes"].values())
    lines = [
        f"| line | value |",
        f"|---|---|",
        f"| no-op tasks/s, empty queue | {e:.0f} ({', '.join(f'{v:.0f}' for v in res['empty'])}) |",
        f"| no-op tasks/s, {cfg.queued:,} queued | {d:.0f} ({', '.join(f'{v:.0f}' for v in res['deep'])}) |",
        f"| deep / empty | {res['ratio']:.2f} |",
        f"| submit --file rate | {rate:.0f} tasks/s |",
        f"| RSS per queued task (median replica) | {rss:.0f} bytes |",
        f"| data directory / bytes submitted | {disk / submitted:.2f} ({disk / 1e6:.0f} MB / {submitted / 1e6:.0f} MB) |",
        f"| follower kill -9 -> restarted and caught up | {res['restart_s']:.1f} s |",
    ]
    print("\n".join(lines))
    with open(cfg.out, "w") as out:
        json.dump(res, out, indent=2)


if __name__ == "__main__":
    main()
