"""Shared helpers of fleet's benchmark scripts: a local 3-replica fleet of real processes.

Used by benches/kill_leader.py and benches/compare.py. Every wait here is a condition polled
against a deadline; a benchmark that cannot reach its condition fails with what it saw.
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLEET = os.path.join(ROOT, "target", "release", "fleet")


def wait_for(what, check, timeout=30.0, every=0.02):
    """Polls `check` until it returns a true value; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:  # a probe that fails is retried until the deadline
            last = e
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def read_ns(path):
    """The first field of every line of a timeline file (`UNIX_NANOS ...`), sorted; empty when
    the file does not exist yet."""
    try:
        with open(path) as f:
            return sorted(int(line.split()[0]) for line in f if line.strip())
    except FileNotFoundError:
        return []


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    i = min(len(s) - 1, max(0, int(round(p * len(s) + 0.5)) - 1))
    return s[i]


def median(values):
    return statistics.median(values) if values else float("nan")


class Fleet:
    """A local fleet: 3 replicas (fsync on, default configuration) and optional workers."""

    def __init__(self, base_port=17501, replicas=3, config_text="", keep=False):
        self.dir = tempfile.mkdtemp(prefix="fleet-bench-")
        self.ports = [base_port + i for i in range(replicas)]
        self.peers = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.procs = {}
        self.workers = []
        # FLEET_BENCH_KEEP=1 keeps the data directories and logs (printed at the end).
        self.keep = keep or os.environ.get("FLEET_BENCH_KEEP") == "1"
        self.config = os.path.join(self.dir, "fleet.toml")
        with open(self.config, "w") as f:
            f.write(config_text)

    def addr(self, node):
        return f"127.0.0.1:{self.ports[node - 1]}"

    def start_node(self, node):
        log = open(os.path.join(self.dir, f"node-{node}.log"), "ab")
        self.procs[node] = subprocess.Popen(
            [FLEET, "--config", self.config, "join", "--node-id", str(node),
             "--listen", self.addr(node), "--http-listen", "127.0.0.1:0",
             "--peers", self.peers, "--bootstrap-expect", str(len(self.ports)),
             "--data-dir", os.path.join(self.dir, f"node-{node}")],
            stdout=subprocess.DEVNULL, stderr=log)

    def start(self):
        for node in range(1, len(self.ports) + 1):
            self.start_node(node)
        wait_for("a leader", self.leader, timeout=60)
        return self

    def start_worker(self, name, concurrency, extra=()):
        log = open(os.path.join(self.dir, f"worker-{name}.log"), "ab")
        p = subprocess.Popen(
            [FLEET, "--config", self.config, "worker", "--peers", self.peers,
             "--concurrency", str(concurrency), "--name", name, *extra],
            stdout=subprocess.DEVNULL, stderr=log)
        self.workers.append(p)
        return p

    def cli(self, *args, peers=None, timeout=30):
        out = subprocess.run(
            [FLEET, "--config", self.config, *args, "--peers", peers or self.peers],
            capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"fleet {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def status(self, peers=None, local=False):
        args = ["cluster", "status", "--output", "json", "--retry-for", "500ms"]
        if local:
            args.append("--local")
        return json.loads(self.cli(*args, peers=peers))

    def leader(self, peers=None):
        """The leader's node id as seen by a replica that is the leader, else None."""
        try:
            s = self.status(peers)
        except Exception:
            return None
        return s["leader_id"] if s.get("leader_view") else None

    def others(self, node):
        return ",".join(self.addr(n) for n in self.procs if n != node)

    def kill(self, node, sig=signal.SIGKILL):
        self.procs[node].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[node].wait()

    def caught_up(self, node):
        """True when `node` is a member whose match index equals the leader's last log index."""
        s = self.status()
        if not s.get("leader_view"):
            return False
        last = s.get("last_log_index") or 0
        return any(m["id"] == node and (m.get("match_index") or 0) >= last
                   for m in s["members"])

    def term(self):
        return self.status()["term"]

    def stop(self):
        for p in self.workers + list(self.procs.values()):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers + list(self.procs.values()):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.keep:
            print(f"kept: {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def queue_counts(fleet, queue):
    stats = json.loads(fleet.cli("queue", "stats", "--output", "json"))["value"]
    return stats.get(queue, {})


def noop_batch(path, n, queue="bench", command=("true",)):
    with open(path, "w") as f:
        line = json.dumps({"command": list(command), "queue": queue}) + "\n"
        f.write(line * n)


def tasks_per_second(fleet, n, queue="bench", command=("true",)):
    """Submits `n` tasks at once (`submit --file`) and times them until every one succeeded:
    submit, lease, run, report, each step committed through Raft. Tasks per second."""
    batch = os.path.join(fleet.dir, f"batch-{queue}.jsonl")
    noop_batch(batch, n, queue, command)
    before = queue_counts(fleet, queue).get("succeeded", 0)
    t0 = time.monotonic()
    fleet.cli("submit", "--file", batch, timeout=300)
    wait_for(f"{n} tasks to succeed",
             lambda: queue_counts(fleet, queue).get("succeeded", 0) - before >= n,
             timeout=600, every=0.05)
    return n / (time.monotonic() - t0)
