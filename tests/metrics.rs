//! Metrics against the real components an operator runs: Etsy's StatsD daemon (npm `statsd`)
//! receiving fleet's counters, gauges and timers, and a real Prometheus (Debian's
//! `prometheus`) scraping replicas' `/metrics` and answering every query of
//! config/grafana-dashboard.json.
//!
//! Both are installed by `.ci/install-tools` (which these tests run when a component is
//! missing). Without them, and without root to install them, the tests say so and skip, except
//! under `CI=true`, where they fail.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use fleet::metrics::names::{Kind, CATALOG};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn statsd_script() -> PathBuf {
    Path::new(ROOT).join("target/tools/node_modules/statsd/stats.js")
}

fn on_path(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn have_tools() -> bool {
    statsd_script().exists() && on_path("node") && on_path("prometheus") && on_path("promtool")
}

/// Installs the tools once per test binary; false (after saying why) when they are missing
/// and this is not CI.
fn tools() -> bool {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !have_tools() {
        let status = Command::new(Path::new(ROOT).join(".ci/install-tools")).status();
        eprintln!(".ci/install-tools: {status:?}");
    }
    if have_tools() {
        return true;
    }
    let msg = "statsd (npm), node, prometheus or promtool missing and .ci/install-tools could not \
               install them (it needs root for apt-get)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// A small fleet writing every metric the catalog lists: 3 replicas (replication lag), a
/// worker, tasks that succeed, fail to dead and time out, and snapshots every few entries.
fn fleet_with_workload(metrics: &str) -> (TestCluster, TestWorker, String) {
    let extra = format!(
        "[metrics]\ninterval_ms = 200\n{metrics}\n[raft]\nsnapshot_every_entries = 10\n\
         keep_log_entries_after_snapshot = 10\n"
    );
    let (c, config, peers) = start_fleet_with(3, 1000, &extra);
    let worker = TestWorker::start(c.dir.path(), "w1", &peers, &config, &["--concurrency", "4"]);
    let mut lines = Vec::new();
    for i in 0..20 {
        lines.push(serde_json::json!({"command": ["true"], "idempotency_key": format!("ok-{i}")}));
    }
    for _ in 0..4 {
        lines.push(serde_json::json!({"command": ["sh", "-c", "sleep 0.3"]}));
    }
    for _ in 0..3 {
        lines.push(serde_json::json!({"command": ["false"], "max_attempts": 1}));
    }
    for _ in 0..2 {
        lines.push(
            serde_json::json!({"command": ["sleep", "5"], "max_attempts": 1, "timeout_ms": 300}),
        );
    }
    // A pool and tasks in it, and a schedule, so the pool gauges, the tick counter and the
    // tick lateness exist.
    fleet_json(&["pool", "set", "p", "--slots", "2", "--peers", &peers]).unwrap();
    for _ in 0..3 {
        lines.push(serde_json::json!({"command": ["true"], "pool": "p"}));
    }
    let file = c.dir.path().join("tasks.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&file, text.join("\n")).unwrap();
    submit_file(&peers, &file, lines.len());
    fleet_json(&[
        "schedule", "create", "tick", "--every", "1s", "--peers", &peers, "--", "true",
    ])
    .unwrap();
    wait_until("two ticks fired", Duration::from_secs(30), || {
        let s = fleet_json(&["schedule", "show", "tick", "--peers", &peers])?;
        if s["schedule"]["counts"]["fired"].as_u64() >= Some(2) {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    fleet_json(&["schedule", "pause", "tick", "--peers", &peers]).unwrap();
    // A workflow run, so the run counters and the run duration exist.
    let wf = c.dir.path().join("wf.toml");
    std::fs::write(
        &wf,
        "name = \"wf\"\n[tasks.a]\ncommand = [\"true\"]\n[tasks.b]\ncommand = [\"true\"]\n\
         after = [\"a\"]\n",
    )
    .unwrap();
    fleet_json(&["workflow", "apply", wf.to_str().unwrap(), "--peers", &peers]).unwrap();
    fleet_json(&["workflow", "run", "wf", "--wait", "--peers", &peers]).unwrap();
    wait_until("every task final", Duration::from_secs(60), || {
        let open: usize = ["queued", "running", "failed"]
            .iter()
            .map(|s| task_ids_in(&peers, s).map(|v| v.len()))
            .sum::<Result<usize, String>>()?;
        if open == 0 {
            Ok(())
        } else {
            Err(format!("{open} tasks not final"))
        }
    });
    (c, worker, peers)
}

// ---------------------------------------------------------------------------------------------
// StatsD

struct Statsd {
    _process: Proc,
    udp_port: u16,
    admin: String,
}

fn start_statsd(dir: &Path) -> Statsd {
    let ports = free_ports(2);
    let (udp_port, admin_port) = (ports[0], ports[1]);
    let config = dir.join("statsd-config.js");
    // No backend and an hour between flushes: everything received stays visible to the admin
    // interface for the whole test.
    std::fs::write(
        &config,
        serde_json::json!({
            "address": "127.0.0.1",
            "port": udp_port,
            "mgmt_address": "127.0.0.1",
            "mgmt_port": admin_port,
            "flushInterval": 3_600_000,
            "backends": [],
        })
        .to_string(),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("statsd.log")).unwrap();
    let child = Command::new("node")
        .arg(statsd_script())
        .arg(&config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start statsd");
    let admin = format!("127.0.0.1:{admin_port}");
    let s = Statsd {
        _process: Proc::new("statsd", Some(child)),
        udp_port,
        admin,
    };
    wait_until("statsd's admin interface", Duration::from_secs(20), || {
        let out = statsd_admin(&s.admin, "health")?;
        if out.contains("up") {
            Ok(())
        } else {
            Err(out)
        }
    });
    s
}

/// One admin command (`counters`, `gauges`, `timers`, `health`): the text before `END`.
fn statsd_admin(addr: &str, command: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(s, "{command}").map_err(|e| e.to_string())?;
    let mut out = String::new();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).map_err(|e| e.to_string())?;
        if n == 0 || line.trim() == "END" || (command == "health" && !out.is_empty()) {
            break;
        }
        out.push_str(&line);
        if command == "health" {
            break;
        }
    }
    Ok(out)
}

/// `'name': value` pairs of statsd's admin dump (node's util.inspect of an object). Values are
/// numbers (counters, gauges) or arrays of numbers (timers).
fn statsd_values(dump: &str) -> Vec<(String, Vec<f64>)> {
    let mut out = Vec::new();
    let mut rest = dump;
    while let Some(start) = rest.find('\'') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('\'') else { break };
        let name = after[..end].to_string();
        let tail = after[end + 1..].trim_start();
        let Some(tail) = tail.strip_prefix(':') else {
            rest = &after[end + 1..];
            continue;
        };
        let tail = tail.trim_start();
        let (values, used) = if let Some(arr) = tail.strip_prefix('[') {
            let close = arr.find(']').unwrap_or(arr.len());
            let v = arr[..close]
                .split(',')
                .filter_map(|x| x.trim().parse::<f64>().ok())
                .collect();
            (v, close + 1)
        } else {
            let stop = tail.find([',', '\n', '}']).unwrap_or(tail.len());
            (
                tail[..stop].trim().parse::<f64>().into_iter().collect(),
                stop,
            )
        };
        out.push((name, values));
        let consumed = tail.len() - tail[used.min(tail.len())..].len();
        rest = &tail[consumed..];
    }
    out
}

/// The `match:` patterns of config/statsd-mapping.yml with the Prometheus name each maps to.
fn mapping_patterns() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("config/statsd-mapping.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if let Some(p) = l.trim().strip_prefix("- match: ") {
            let name = lines
                .next()
                .and_then(|n| n.trim().strip_prefix("name: "))
                .expect("a name after each match");
            out.push((p.trim_matches('"').into(), name.trim_matches('"').into()));
        }
    }
    out
}

fn glob_matches(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), name.split('.').collect());
    p.len() == n.len() && p.iter().zip(&n).all(|(a, b)| *a == "*" || a == b)
}

#[test]
fn a_statsd_daemon_receives_counters_gauges_and_timers_that_the_mapping_covers() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let statsd = start_statsd(dir.path());
    let (c, _worker, _peers) = fleet_with_workload(&format!(
        "statsd = true\nstatsd_host = \"127.0.0.1\"\nstatsd_port = {}\n",
        statsd.udp_port
    ));
    // Gauges are sampled every 200 ms; the counters of the workload were sent when it ran.
    let (counters, gauges, timers) =
        wait_until("fleet's metrics at statsd", Duration::from_secs(30), || {
            let counters = statsd_values(&statsd_admin(&statsd.admin, "counters")?);
            let gauges = statsd_values(&statsd_admin(&statsd.admin, "gauges")?);
            let timers = statsd_values(&statsd_admin(&statsd.admin, "timers")?);
            let get = |set: &[(String, Vec<f64>)], name: &str| {
                set.iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            let succeeded = get(&counters, "fleet.attempts.succeeded.default");
            // Every counter the assertions below read exactly, not only some of them: the
            // exporter sends in batches, and the dead tasks' increments were once still on
            // their way when the others had arrived.
            let dead = get(&counters, "fleet.task.dead.default");
            let kept = get(&gauges, "fleet.tasks.default.succeeded");
            let durations = get(&timers, "fleet.task.duration.default");
            let term_gauges = gauges
                .iter()
                .filter(|(n, _)| n.starts_with("fleet.raft.term."))
                .count();
            if succeeded.first().copied().unwrap_or(0.0) >= 24.0
                && dead.first().copied().unwrap_or(0.0) >= 5.0
                && kept.first().copied().unwrap_or(0.0) >= 24.0
                && durations.len() >= 24
                && term_gauges == 3
            {
                Ok((counters, gauges, timers))
            } else {
                Err(format!(
                    "succeeded {succeeded:?}, dead {dead:?}, tasks.default.succeeded {kept:?}, \
                     {} durations, {term_gauges} raft.term gauges",
                    durations.len()
                ))
            }
        });
    let get = |set: &[(String, Vec<f64>)], name: &str| -> Vec<f64> {
        set.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} not received; got {set:?}"))
    };
    // Counters: the workload's outcomes, exactly.
    // 29 tasks and 3 in the pool (the schedule's runs are not submissions).
    assert_eq!(get(&counters, "fleet.task.submitted.default"), vec![32.0]);
    assert!(get(&counters, "fleet.schedule.ticks.tick.fired")[0] >= 2.0);
    assert_eq!(get(&gauges, "fleet.pool.open_slots.p"), vec![2.0]);
    assert_eq!(get(&counters, "fleet.attempts.failed.default"), vec![3.0]);
    assert_eq!(
        get(&counters, "fleet.attempts.timed_out.default"),
        vec![2.0]
    );
    assert_eq!(get(&counters, "fleet.task.dead.default"), vec![5.0]);
    assert!(get(&counters, "fleet.scheduler_heartbeat")[0] >= 1.0);
    // Gauges: the final state of the queue.
    assert_eq!(get(&gauges, "fleet.tasks.default.dead"), vec![5.0]);
    assert_eq!(get(&gauges, "fleet.tasks.default.ready"), vec![0.0]);
    assert_eq!(get(&gauges, "fleet.workers.active"), vec![1.0]);
    // Timers arrive in milliseconds: four tasks slept 0.3 s, two were killed at 0.3 s.
    let durations = get(&timers, "fleet.task.duration.default");
    let long = durations.iter().filter(|d| **d >= 290.0).count();
    assert!(long >= 6, "durations (ms): {durations:?}");
    assert!(durations.iter().all(|d| *d < 5_000.0), "{durations:?}");
    assert!(!get(&timers, "fleet.storage.fsync_duration.1").is_empty());

    // Every name fleet sent is covered by exactly one mapping of config/statsd-mapping.yml.
    let patterns = mapping_patterns();
    let sent: Vec<&String> = counters
        .iter()
        .chain(&gauges)
        .chain(&timers)
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("fleet."))
        .collect();
    assert!(sent.len() > 40, "{sent:?}");
    for name in &sent {
        let matching: Vec<&(String, String)> = patterns
            .iter()
            .filter(|(p, _)| glob_matches(p, name))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{name}: matched by {matching:?} in config/statsd-mapping.yml"
        );
    }
    // And every metric of the catalog arrived (snapshots included).
    for d in CATALOG {
        let prefix = format!("fleet.{}", d.name);
        assert!(
            sent.iter().any(|n| glob_matches(
                &std::iter::once(prefix.clone())
                    .chain(d.labels.iter().map(|_| "*".to_string()))
                    .collect::<Vec<_>>()
                    .join("."),
                n
            )),
            "{} ({:?}) never reached statsd; sent: {sent:?}\n{}",
            d.name,
            d.kind,
            c.logs()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A PromQL instant query through Prometheus's HTTP API: the result vector.
fn promql(prometheus: &str, query: &str) -> Result<Vec<Value>, String> {
    let (code, body) = http_get_text(
        prometheus,
        &format!("/api/v1/query?query={}", urlencode(query)),
    )?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if code != 200 || v["status"] != "success" {
        return Err(format!("HTTP {code}: {body}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The queries of config/grafana-dashboard.json, with its variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("config/grafana-dashboard.json")).unwrap();
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "30s")
                .replace("$job", "fleet");
            out.push((p["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

#[test]
fn prometheus_scrapes_replicas_and_answers_every_dashboard_query() {
    if !tools() {
        return;
    }
    // The shipped scrape config is valid.
    let check = Command::new("promtool")
        .args(["check", "config"])
        .arg(Path::new(ROOT).join("config/prometheus.yml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check config config/prometheus.yml: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let (c, _worker, _peers) = fleet_with_workload("");
    let targets: Vec<String> = c
        .nodes
        .iter()
        .map(|n| {
            health_of(&n.addr).1["http_addr"]
                .as_str()
                .expect("http_addr")
                .to_string()
        })
        .collect();
    // A replica serves the text format itself.
    let (code, text) = http_get_text(&targets[0], "/metrics").unwrap();
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("# TYPE fleet_raft_term gauge"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let web = format!("127.0.0.1:{port}");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: fleet\n    static_configs:\n      - targets: [{}]\n",
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let _prometheus = Proc::new("prometheus", Some(child));
    let plog = || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();

    wait_until(
        "Prometheus scraping all three replicas",
        Duration::from_secs(60),
        || {
            let up = promql(&web, "up{job=\"fleet\"} == 1")?;
            if up.len() == 3 {
                Ok(())
            } else {
                Err(format!("up: {up:?}\n{}", tail(&plog(), 10)))
            }
        },
    );

    // Every metric of the catalog is a series in Prometheus, under its documented name.
    for d in CATALOG {
        let name = d.prometheus_name("fleet");
        let series = if d.kind == Kind::Histogram {
            format!("{name}_bucket")
        } else {
            name.clone()
        };
        wait_until(
            &format!("{series} in Prometheus"),
            Duration::from_secs(30),
            || {
                let r = promql(&web, &format!("count({series}{{job=\"fleet\"}})"))?;
                if r.is_empty() {
                    Err("no series".into())
                } else {
                    Ok(())
                }
            },
        );
    }

    // Every query of the dashboard runs and returns series (rates need two scrapes).
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    for (panel, expr) in &queries {
        wait_until(
            &format!("dashboard panel {panel:?}: {expr}"),
            Duration::from_secs(30),
            || {
                let r = promql(&web, expr)?;
                if r.is_empty() {
                    Err("empty result".into())
                } else {
                    Ok(())
                }
            },
        );
    }
    // Values are right, not just present: the leader reports the queue's final state.
    let dead = promql(
        &web,
        "max(fleet_tasks{job=\"fleet\",queue=\"default\",state=\"dead\"})",
    )
    .unwrap();
    assert_eq!(dead[0]["value"][1], "5", "{dead:?}");
    let leaders = promql(&web, "sum(fleet_raft_is_leader{job=\"fleet\"})").unwrap();
    assert_eq!(leaders[0]["value"][1], "1", "{leaders:?}");
}
