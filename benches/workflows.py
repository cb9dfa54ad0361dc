#!/usr/bin/env python3
"""Workflow scheduling figures on a local fleet of real processes.

    benches/workflows.py [--chain-tasks N] [--chain-runs R] [--fanout N]

A 3-replica fleet (release build, default configuration, fsync on) and two workers of 16 slots.

1. Dependency latency: R runs at once (default 5) of a chain of N tasks (default 41: 40 edges
   per run), each task `sh -c` appending its start and end time (ns) to a file. Per edge:
   - replicated: the upstream task's end as the state machine recorded it to the downstream
     task's lease grant (its attempt's start): both are the leader's clock when it proposed
     the entry (the worker's report; the grant), in ms. It covers the report's commit, the
     apply that creates the downstream task, and the scheduling loop's pick;
   - process: the upstream process's last line to the downstream process's first line (the
     worker's report, its commit, the downstream task's creation in that apply, the lease
     poll, the grant's commit, and the spawn of `sh` and `date`).
2. Fan-out throughput: one run of `root -> N leaves -> join` (default 1,000 leaves running
   `true`): leaves per second from the first leaf's start to the last leaf's end; and, as the
   peer measured in the same run, N independent `true` tasks submitted at once with
   `fleet submit --file` (the same workers, the same queue).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from fleetbench import Fleet, median, percentile, wait_for  # noqa: E402


def toml_list(items):
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def apply(fleet, name, text):
    path = os.path.join(fleet.dir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    fleet.cli("workflow", "apply", path)


def start_run(fleet, name):
    out = json.loads(fleet.cli("workflow", "run", name, "--output", "json"))
    return out["Started"]["run"]


def runs_done(fleet, ids):
    runs = json.loads(fleet.cli("run", "list", "--limit", "1000", "--output", "json"))
    by_id = {r["id"]: r for r in runs}
    if all(by_id.get(i, {}).get("status") in ("succeeded", "failed", "cancelled") for i in ids):
        return [by_id[i] for i in ids]
    return None


def all_tasks(fleet):
    out = []
    after = None
    while True:
        args = ["task", "list", "--limit", "10000", "--output", "json"]
        if after:
            args += ["--after", str(after)]
        page = json.loads(fleet.cli(*args, timeout=120))
        page = page.get("value", page) if isinstance(page, dict) else page
        if not page:
            return out
        out.extend(page)
        after = page[-1]["id"]


def env(task, key):
    for k, v in task["spec"]["env"]:
        if k == key:
            return v
    return None


def chain(fleet, n, runs):
    log = os.path.join(fleet.dir, "chain.log")
    cmd = ["sh", "-c",
           f'echo "$FLEET_RUN_ID $FLEET_TASK_NAME s $(date +%s%N)" >> {log}; '
           f'echo "$FLEET_RUN_ID $FLEET_TASK_NAME e $(date +%s%N)" >> {log}']
    text = f'name = "chain"\nmax_active_runs = {runs}\n'
    for i in range(n):
        text += f"[tasks.t{i:03}]\ncommand = {toml_list(cmd)}\n"
        if i:
            text += f'after = ["t{i - 1:03}"]\n'
    apply(fleet, "chain", text)
    ids = [start_run(fleet, "chain") for _ in range(runs)]
    views = wait_for("the chain runs", lambda: runs_done(fleet, ids), timeout=600, every=0.5)
    assert all(v["status"] == "succeeded" for v in views), views
    tasks = [t for t in all_tasks(fleet) if env(t, "FLEET_WORKFLOW") == "chain"]
    by_node = {(env(t, "FLEET_RUN_ID"), env(t, "FLEET_TASK_NAME")): t for t in tasks}
    replicated = []
    for (run, name), t in by_node.items():
        i = int(name[1:])
        if i == 0:
            continue
        up = by_node[(run, f"t{i - 1:03}")]
        replicated.append(t["attempts"][0]["started_at_ms"] - up["finished_at_ms"])
    marks = {}
    with open(log) as f:
        for line in f:
            run, name, what, ns = line.split()
            marks[(run, name, what)] = int(ns)
    process = []
    # The process latency in three parts (same machine, one clock): the upstream's last line
    # to its end's commit (exit, reap, report, Raft), that commit to the downstream's grant
    # (replicated, above), the grant to the downstream's first line (lease reply, spawn).
    report, spawn = [], []
    for (run, name, what), ns in marks.items():
        i = int(name[1:])
        if what == "s" and i > 0:
            up_e = marks[(run, f"t{i - 1:03}", "e")]
            process.append((ns - up_e) / 1e6)
            up = by_node[(run, f"t{i - 1:03}")]
            report.append(up["finished_at_ms"] - up_e / 1e6)
            spawn.append(ns / 1e6 - by_node[(run, name)]["attempts"][0]["started_at_ms"])
    return replicated, process, report, spawn


def fanout(fleet, n):
    text = 'name = "fan"\n[tasks.root]\ncommand = ["true"]\n'
    leaves = [f"l{i:04}" for i in range(n)]
    for leaf in leaves:
        text += f'[tasks.{leaf}]\ncommand = ["true"]\nafter = ["root"]\n'
    text += f'[tasks.join]\ncommand = ["true"]\nafter = {toml_list(leaves)}\n'
    apply(fleet, "fan", text)
    run = start_run(fleet, "fan")
    t0 = time.monotonic()
    views = wait_for("the fan-out run", lambda: runs_done(fleet, [run]), timeout=600, every=0.2)
    wall = time.monotonic() - t0
    assert views[0]["status"] == "succeeded", views
    tasks = [t for t in all_tasks(fleet) if env(t, "FLEET_WORKFLOW") == "fan"]
    leaf = [t for t in tasks if env(t, "FLEET_TASK_NAME").startswith("l")]
    join = [t for t in tasks if env(t, "FLEET_TASK_NAME") == "join"][0]
    root = [t for t in tasks if env(t, "FLEET_TASK_NAME") == "root"][0]
    first = min(t["attempts"][0]["started_at_ms"] for t in leaf)
    last = max(t["finished_at_ms"] for t in leaf)
    return {
        "leaves_per_s": n / ((last - first) / 1000),
        "root_end_to_first_leaf_ms": first - root["finished_at_ms"],
        "last_leaf_to_join_ms": join["attempts"][0]["started_at_ms"] - last,
        "run_wall_s": wall,
    }


def plain(fleet, n):
    path = os.path.join(fleet.dir, "plain.jsonl")
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"command": ["true"], "env": {"PLAIN": "1"}}) + "\n")
    ids = [int(x) for x in fleet.cli("submit", "--file", path, timeout=120).split()]

    def done():
        tasks = [t for t in all_tasks(fleet) if t["id"] in set(ids)]
        return tasks if all(t["state"] == "succeeded" for t in tasks) and len(tasks) == n else None

    tasks = wait_for("the plain tasks", done, timeout=600, every=0.5)
    first = min(t["attempts"][0]["started_at_ms"] for t in tasks)
    last = max(t["finished_at_ms"] for t in tasks)
    return n / ((last - first) / 1000)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--chain-tasks", type=int, default=41)
    p.add_argument("--chain-runs", type=int, default=5)
    p.add_argument("--fanout", type=int, default=1000)
    a = p.parse_args()
    with Fleet(base_port=17601).start() as fleet:
        fleet.start_worker("w1", 16)
        fleet.start_worker("w2", 16)
        replicated, process, report, spawn = chain(fleet, a.chain_tasks, a.chain_runs)
        print(f"dependency latency over {len(replicated)} edges "
              f"({a.chain_runs} runs of a {a.chain_tasks}-task chain at once):")
        print(f"  replicated (upstream report proposed -> downstream grant proposed, leader clock): "
              f"p50 {median(replicated):.0f} ms, p99 {percentile(replicated, 0.99):.0f} ms, "
              f"max {max(replicated):.0f} ms")
        print(f"  process (upstream's last line -> downstream's first line): "
              f"p50 {median(process):.1f} ms, p99 {percentile(process, 0.99):.1f} ms, "
              f"max {max(process):.1f} ms")
        print(f"    of which upstream's last line -> its report proposed: p50 {median(report):.1f} ms, "
              f"p99 {percentile(report, 0.99):.1f} ms; grant -> downstream's first line: "
              f"p50 {median(spawn):.1f} ms, p99 {percentile(spawn, 0.99):.1f} ms")
        f = fanout(fleet, a.fanout)
        peer = plain(fleet, a.fanout)
        print(f"fan-out of {a.fanout}: {f['leaves_per_s']:.0f} leaves/s "
              f"(root end -> first leaf {f['root_end_to_first_leaf_ms']} ms, last leaf -> join "
              f"{f['last_leaf_to_join_ms']} ms, whole run {f['run_wall_s']:.1f} s)")
        print(f"peer, {a.fanout} independent tasks submitted at once: {peer:.0f} tasks/s; "
              f"ratio fan-out / independent: {f['leaves_per_s'] / peer:.2f}x")


if __name__ == "__main__":
    main()
