#!/usr/bin/env python3
"""The worker's own CPU per no-op task, and no-op tasks/s end to end.

    benches/worker_cost.py [TASKS] [PERF_DATA]

A local fleet (3 replicas, release build) and 4 workers x 32 slots on queue `bench`; after a
2,000-task warm-up, TASKS (default 20,000) tasks running `true` are submitted at once and
timed until every one succeeded. The workers' CPU (user + system time of their own threads,
from /proc/PID/stat, not counting the tasks' processes) is divided by TASKS. With PERF_DATA,
`perf record -g` samples the workers meanwhile (`perf report -i PERF_DATA --children
--comm tokio-rt-worker` shows where the time goes).
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from fleetbench import ROOT, Fleet, tasks_per_second  # noqa: E402


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    perf_data = sys.argv[2] if len(sys.argv) > 2 else None
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    with Fleet() as f:
        f.start()
        workers = [f.start_worker(f"w{i}", 32, ["--queues", "bench"]) for i in range(4)]
        print(f"warm-up: {tasks_per_second(f, 2000):,.0f} tasks/s")
        perf = None
        if perf_data:
            perf = subprocess.Popen(
                ["perf", "record", "-F", "999", "-g", "-o", perf_data, "-p",
                 ",".join(str(w.pid) for w in workers)], stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # perf attaches (tooling start-up, not synchronization)
        before = sum(cpu_seconds(w.pid) for w in workers)
        rate = tasks_per_second(f, n)
        cpu = sum(cpu_seconds(w.pid) for w in workers) - before
        print(f"{n:,} no-op tasks: {rate:,.0f} tasks/s; workers' own CPU {cpu:.1f} s = "
              f"{cpu * 1000 / n:.3f} ms per task")
        if perf:
            perf.send_signal(2)
            perf.wait()


if __name__ == "__main__":
    main()
