#!/usr/bin/env python3
"""fleet side by side with the systems its users would pick instead, in one run.

    benches/compare.sh [--quick] [--rounds N] [--out DIR]

Run through benches/compare.sh, which installs the peers and builds the load generators.
Each round runs every system in turn, one at a time, on the same machine, each freshly
started with its defaults and fsync on:

  - fleet: 3 replicas (`fleet join`), `fleet bench` writers, 4 workers x 32 slots running
    `true` per task, and the same on persistent executors (benches/noop_handler.py);
  - etcd 3.4 (Debian's etcd-server): 3 members, writers from benches/peers (etcd-client);
  - PostgreSQL 15 (Debian's): one server, `synchronous_commit = on`, a SKIP LOCKED queue
    from benches/peers with batched claims and completions, jobs in-process or spawning `true`.

Lines: replicated writes/s at each client count (the plot), no-op tasks/s end to end, and
failover (`kill -9` of the leader under a 1-client write stream, to the first write
acknowledged after it). Medians of the rounds go to DIR/report.md with every ratio, every
value to DIR/report.json, and writes/s against clients to DIR/writes.svg.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from fleetbench import FLEET, ROOT, Fleet, read_ns, tasks_per_second, wait_for  # noqa: E402

PEERS = os.path.join(ROOT, "benches", "peers", "target", "release", "fleet-peers")


def run_json(cmd, timeout=900):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout)


def first_ack_after(path, t0_ns):
    """The first acknowledgement after the outage the kill at t0 caused: the first gap of over
    50 ms between consecutive acknowledgements of the 1-client stream (about 1 ms apart
    otherwise) that starts within 100 ms of t0 and ends after t0 (a pause of the writer just
    before the kill is not the outage); the failover is from t0 to the acknowledgement that
    ends it. Writes the dead leader had committed may still be acknowledged a few
    milliseconds after its death (etcd: through the follower that forwarded them), so "the
    first acknowledgement after t0" would measure nothing. Without such a gap: the first
    acknowledgement 5 ms after t0."""
    acks = read_ns(path)
    for a, b in zip(acks, acks[1:]):
        if t0_ns - 100_000_000 <= a <= t0_ns + 100_000_000 and b - a > 50_000_000 and b > t0_ns:
            return (b - t0_ns) / 1e6
    for a in acks:
        if a >= t0_ns + 5_000_000:
            return (a - t0_ns) / 1e6
    return None


# --- etcd -----------------------------------------------------------------------------------

class Etcd:
    def __init__(self, base=23790):
        self.dir = tempfile.mkdtemp(prefix="compare-etcd-")
        self.names = ["n1", "n2", "n3"]
        self.client = {n: f"http://127.0.0.1:{base + 10 * i}" for i, n in enumerate(self.names)}
        self.peer = {n: f"http://127.0.0.1:{base + 10 * i + 1}" for i, n in enumerate(self.names)}
        self.procs = {}

    @property
    def endpoints(self):
        return ",".join(self.client.values())

    def start_member(self, n, state="new"):
        cluster = ",".join(f"{m}={self.peer[m]}" for m in self.names)
        log = open(os.path.join(self.dir, f"{n}.log"), "ab")
        self.procs[n] = subprocess.Popen(
            ["etcd", "--name", n, "--data-dir", os.path.join(self.dir, n),
             "--listen-client-urls", self.client[n], "--advertise-client-urls", self.client[n],
             "--listen-peer-urls", self.peer[n], "--initial-advertise-peer-urls", self.peer[n],
             "--initial-cluster", cluster, "--initial-cluster-state", state,
             "--initial-cluster-token", "compare"],
            stdout=log, stderr=log)

    def start(self):
        for n in self.names:
            self.start_member(n)
        wait_for("an etcd leader", self.leader, timeout=60)
        return self

    def statuses(self):
        out = subprocess.run(["etcdctl", "--endpoints", self.endpoints, "endpoint", "status",
                              "--write-out", "json"], capture_output=True, text=True,
                             timeout=10, env={**os.environ, "ETCDCTL_API": "3"})
        return json.loads(out.stdout) if out.stdout.strip() else []

    def leader(self):
        """The name of the member that leads, as the members report it."""
        for s in self.statuses():
            st = s["Status"]
            if st["header"]["member_id"] == st["leader"]:
                return next(n for n in self.names if self.client[n] == s["Endpoint"])
        return None

    def kill(self, n):
        self.procs[n].send_signal(signal.SIGKILL)
        self.procs[n].wait()

    def healthy(self):
        return len(self.statuses()) == len(self.names) and self.leader() is not None

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- PostgreSQL -----------------------------------------------------------------------------

def pg_bin(name):
    for d in ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/local/bin"):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise RuntimeError(f"PostgreSQL's {name} was not found (apt-get install postgresql)")


class Postgres:
    """One server in a temporary directory, as the `postgres` user (it refuses root)."""

    def __init__(self, port=25432):
        self.dir = tempfile.mkdtemp(prefix="compare-pg-")
        os.chmod(self.dir, 0o755)
        self.port = port
        self.data = os.path.join(self.dir, "data")

    def as_postgres(self, *cmd):
        user = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        return subprocess.run(user + list(cmd), capture_output=True, text=True, timeout=120)

    def start(self):
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        r = self.as_postgres(pg_bin("initdb"), "-D", self.data, "-U", "postgres",
                             "--auth=trust", "-E", "UTF8")
        if r.returncode != 0:
            raise RuntimeError(f"initdb: {r.stderr}")
        opts = (f"-k {self.dir} -p {self.port} -c listen_addresses='' -c fsync=on "
                "-c synchronous_commit=on -c max_connections=200 -c shared_buffers=256MB")
        r = self.as_postgres(pg_bin("pg_ctl"), "-D", self.data, "-o", opts, "-w", "-l",
                             os.path.join(self.dir, "pg.log"), "start")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start: {r.stderr} {r.stdout}")
        return self

    @property
    def url(self):
        return f"host={self.dir} port={self.port} user=postgres dbname=postgres"

    def stop(self):
        self.as_postgres(pg_bin("pg_ctl"), "-D", self.data, "-m", "fast", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the lines ------------------------------------------------------------------------------

# Queue `pbench` runs its attempts on persistent executors (docs/tasks.md): a no-op handler.
PERSISTENT = ('[queues.pbench]\nexecutor = "persistent"\n'
              f'executor_command = ["python3", "{ROOT}/benches/noop_handler.py"]\n')


def fleet_round(cfg, res):
    with Fleet(config_text=PERSISTENT) as f:
        f.start()
        # Tasks first, on an empty cluster: the write lines leave their tasks queued (in a
        # queue no worker serves), and queue depth has its own benchmark (queue_depth.py).
        for i in range(4):
            f.start_worker(f"w{i}", 32, ["--queues", "bench,pbench"])
        res.setdefault(("tasks", "fleet", "one-shot"), []).append(
            tasks_per_second(f, cfg.tasks))
        # The executors start on the first attempts of each slot: warm them up first.
        tasks_per_second(f, 1000, queue="pbench", command=("noop",))
        res.setdefault(("tasks", "fleet", "persistent"), []).append(
            tasks_per_second(f, cfg.tasks, queue="pbench", command=("noop",)))
        levels = run_json([FLEET, "bench", "--peers", f.peers, "--clients", cfg.levels,
                           "--seconds", str(cfg.seconds), "--output", "json"])
        for lv in levels:
            res.setdefault(("writes", "fleet", lv["clients"]), []).append(lv["writes_per_sec"])
            res.setdefault(("p50_ms", "fleet", lv["clients"]), []).append(lv["p50_ms"])
        for k in range(cfg.kills):
            wait_for("a healthy fleet", lambda: f.leader() and all(
                f.caught_up(n) for n in f.procs), timeout=60)
            timeline = os.path.join(f.dir, f"timeline-{k}")
            writer = subprocess.Popen(
                [FLEET, "bench", "--peers", f.peers, "--clients", "1", "--seconds", "3",
                 "--timeline", timeline, "--output", "json"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # the stream runs before the fault (workload pacing)
            old = f.leader()
            t0 = time.time_ns()
            f.kill(old)
            writer.wait(timeout=60)
            ms = first_ack_after(timeline, t0)
            res.setdefault(("failover_ms", "fleet", ""), []).append(ms)
            f.start_node(old)


def etcd_round(cfg, res):
    e = Etcd().start()
    try:
        levels = run_json([PEERS, "etcd-writes", "--endpoints", e.endpoints, "--clients",
                           cfg.levels, "--seconds", str(cfg.seconds)])
        for lv in levels:
            res.setdefault(("writes", "etcd", lv["clients"]), []).append(lv["writes_per_sec"])
            res.setdefault(("p50_ms", "etcd", lv["clients"]), []).append(lv["p50_ms"])
        for k in range(cfg.kills):
            wait_for("a healthy etcd", e.healthy, timeout=60)
            timeline = os.path.join(e.dir, f"timeline-{k}")
            writer = subprocess.Popen(
                [PEERS, "etcd-writes", "--endpoints", e.endpoints, "--clients", "1",
                 "--seconds", "4", "--timeline", timeline],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # the stream runs before the fault (workload pacing)
            old = e.leader()
            t0 = time.time_ns()
            e.kill(old)
            writer.wait(timeout=60)
            res.setdefault(("failover_ms", "etcd", ""), []).append(first_ack_after(timeline, t0))
            e.start_member(old, state="existing")
    finally:
        e.stop()


def postgres_round(cfg, res):
    pg = Postgres().start()
    try:
        for job in ("inproc", "spawn"):
            r = run_json([PEERS, "pg-queue", "--url", pg.url, "--jobs", str(cfg.tasks),
                          "--workers", "4", "--slots", "32", "--job", job])
            res.setdefault(("tasks", "postgres", job), []).append(r["jobs_per_sec"])
    finally:
        pg.stop()


# --- the report -----------------------------------------------------------------------------

def med(res, *key):
    v = [x for x in res.get(key, []) if x is not None]
    return statistics.median(v) if v else None


def fmt(v, unit=""):
    if v is None:
        return "-"
    return f"{v:,.0f}{unit}" if v >= 10 else f"{v:.2f}{unit}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def report(cfg, machine, res, out):
    levels = [int(c) for c in cfg.levels.split(",")]
    rows = []
    for c in levels:
        fw, ew = med(res, "writes", "fleet", c), med(res, "writes", "etcd", c)
        rows.append((f"replicated writes/s, {c} client{'s' if c > 1 else ''}",
                     f"{fmt(fw)} (p50 {fmt(med(res, 'p50_ms', 'fleet', c), ' ms')})",
                     f"etcd: {fmt(ew)} (p50 {fmt(med(res, 'p50_ms', 'etcd', c), ' ms')})",
                     ratio(fw, ew)))
    ft = med(res, "tasks", "fleet", "one-shot")
    for job, what in (("inproc", "job in-process"), ("spawn", "job spawns `true`")):
        pt = med(res, "tasks", "postgres", job)
        rows.append(("no-op tasks/s end to end, 4 workers x 32 slots", fmt(ft),
                     f"Postgres SKIP LOCKED queue, {what}: {fmt(pt)}", ratio(ft, pt)))
    fp = med(res, "tasks", "fleet", "persistent")
    pt = med(res, "tasks", "postgres", "inproc")
    rows.append(("no-op tasks/s, persistent executors (Python handler), 4 workers x 32 slots",
                 fmt(fp), f"Postgres SKIP LOCKED queue, job in-process: {fmt(pt)}",
                 ratio(fp, pt)))
    ff, ef = med(res, "failover_ms", "fleet", ""), med(res, "failover_ms", "etcd", "")
    rows.append(("`kill -9` leader -> first acknowledged write", fmt(ff, " ms"),
                 f"etcd: {fmt(ef, ' ms')}", ratio(ff, ef) + " (lower is better)"))
    lines = [
        "# fleet compared (benches/compare.sh)",
        "",
        f"Command: `benches/compare.sh {' '.join(sys.argv[1:])}`; {cfg.rounds} round(s), "
        f"medians; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Machine: {os.cpu_count()} cores; fsync {fmt(machine['fsyncs_per_sec'])}/s on the "
        f"data disk, loopback round trip {machine['loopback_round_trip_us']:.0f} us, "
        f"{fmt(machine['spawns_per_sec'])} process spawns/s.",
        "",
        "| line | fleet | peer | fleet / peer |",
        "|---|---|---|---|",
    ] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows] + [
        "",
        "Every value of every round: report.json. Writes/s against clients: writes.svg.",
    ]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"machine": machine, "rounds": cfg.rounds,
                   "values": [{"line": k[0], "system": k[1], "variant": k[2], "values": v}
                              for k, v in sorted(res.items(), key=str)]}, f, indent=2)
    plot(levels, res, os.path.join(out, "writes.svg"))
    print("\n".join(lines))


def plot(levels, res, path):
    """Writes/s against client count, one line per system (log-scaled x)."""
    import math
    w, h, m = 640, 400, 60
    series = {s: [(c, med(res, "writes", s, c)) for c in levels] for s in ("fleet", "etcd")}
    top = max([v for pts in series.values() for _, v in pts if v] + [1]) * 1.1
    xs = [math.log2(c) for c in levels]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(c):
        return m + (math.log2(c) - x0) / (x1 - x0) * (w - 2 * m)

    def py(v):
        return h - m - v / top * (h - 2 * m)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">concurrent clients</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" '
           'text-anchor="middle">acknowledged writes/s</text>']
    for c in levels:
        out.append(f'<text x="{px(c)}" y="{h - m + 15}" text-anchor="middle">{c}</text>')
    for i in range(5):
        v = top * i / 4
        out.append(f'<text x="{m - 5}" y="{py(v) + 4}" text-anchor="end">{v:,.0f}</text>')
    for (s, pts), colour in zip(series.items(), ("#1f77b4", "#d62728")):
        pts = [(px(c), py(v)) for c, v in pts if v]
        if pts:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            x, y = pts[-1]
            out.append(f'<text x="{x - 5}" y="{y - 8}" text-anchor="end" fill="{colour}">{s}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one round, short levels (under 3 minutes; asserts nothing)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "compare-out"))
    cfg = ap.parse_args()
    if cfg.quick:
        cfg.rounds, cfg.levels, cfg.seconds, cfg.tasks, cfg.kills = 1, "1,64", 3, 2000, 1
    else:
        cfg.levels, cfg.seconds, cfg.tasks, cfg.kills = "1,4,16,64,256", 8, 20000, 3
    os.makedirs(cfg.out, exist_ok=True)
    probe = tempfile.mkdtemp(prefix="compare-machine-")
    machine = run_json([PEERS, "machine", "--dir", probe])
    shutil.rmtree(probe, ignore_errors=True)
    res = {}
    for r in range(1, cfg.rounds + 1):
        for name, fn in (("fleet", fleet_round), ("etcd", etcd_round),
                         ("postgres", postgres_round)):
            t = time.monotonic()
            fn(cfg, res)
            print(f"round {r}: {name} done in {time.monotonic() - t:.0f} s", flush=True)
    report(cfg, machine, res, cfg.out)


if __name__ == "__main__":
    main()
