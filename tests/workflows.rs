//! Workflows with real processes: a 12-task DAG run 20 times through a leader kill and a
//! worker kill, a failed run retried after its input was fixed, a scheduled workflow ticking
//! exactly once through a leader kill, `submit --after`, and the size limit.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A task command that records `RUN NODE TOKEN start|end NANOS` lines in `log`, with `work`
/// (shell) between them; it fails, without its end line, when `work` fails.
fn recorded(log: &Path, work: &str) -> String {
    let line = |what: &str| {
        format!(
            "echo \\\"$FLEET_RUN_ID $FLEET_TASK_NAME $FLEET_FENCING_TOKEN {what} $(date +%s%N)\\\" >> {}",
            log.display()
        )
    };
    format!(
        "[\"sh\", \"-c\", \"{}; {work} && {}\"]",
        line("start"),
        line("end")
    )
}

/// One recorded execution line.
#[derive(Debug, Clone)]
struct Exec {
    token: u64,
    start: bool,
    at_ns: u128,
}

/// (run, node) -> its recorded lines.
fn read_log(log: &Path) -> BTreeMap<(u64, String), Vec<Exec>> {
    let mut out: BTreeMap<(u64, String), Vec<Exec>> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [run, node, token, what, at] = f[..] else {
            panic!("bad log line {line:?}")
        };
        out.entry((run.parse().unwrap(), node.to_string()))
            .or_default()
            .push(Exec {
                token: token.parse().unwrap(),
                start: what == "start",
                at_ns: at.parse().unwrap(),
            });
    }
    out
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn runs(peers: &str) -> Vec<Value> {
    fleet_json(&["run", "list", "--limit", "1000", "--peers", peers])
        .unwrap()
        .as_array()
        .unwrap()
        .to_vec()
}

fn run_show(peers: &str, run: u64) -> Value {
    fleet_json(&["run", "show", &run.to_string(), "--peers", peers]).unwrap()
}

fn start_run(peers: &str, workflow: &str) -> u64 {
    fleet_json(&["workflow", "run", workflow, "--peers", peers]).unwrap()["Started"]["run"]
        .as_u64()
        .unwrap()
}

/// Waits until every run in `ids` is final; their views.
fn wait_runs_final(peers: &str, ids: &[u64], timeout: Duration) -> Vec<Value> {
    wait_until("every run to end", timeout, || {
        let all = runs(peers);
        let mine: Vec<Value> = all
            .into_iter()
            .filter(|r| ids.contains(&r["id"].as_u64().unwrap()))
            .collect();
        let open = mine
            .iter()
            .filter(|r| {
                !matches!(
                    r["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
            })
            .count();
        if mine.len() == ids.len() && open == 0 {
            Ok(mine)
        } else {
            Err(format!("{open} of {} runs not final", ids.len()))
        }
    })
}

/// Every retained task, by id.
fn all_tasks(peers: &str) -> BTreeMap<u64, Value> {
    let v = fleet_json(&["task", "list", "--limit", "10000", "--peers", peers]).unwrap();
    let list = v.get("value").cloned().unwrap_or(v);
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t.clone()))
        .collect()
}

/// The 12-task DAG: two diamonds (start -> a1, a2 -> mid; mid -> f1..f6 -> end) and a
/// report after the end.
fn dag_file(log: &Path) -> String {
    let cmd = recorded(log, "sleep 0.3");
    let mut t = String::from(
        "name = \"dag\"\nmax_active_runs = 6\n[defaults]\nmax_attempts = 5\nbackoff_initial = \"100ms\"\n",
    );
    let mut task = |name: &str, after: &[String]| {
        let after: Vec<String> = after.iter().map(|a| format!("\"{a}\"")).collect();
        t.push_str(&format!(
            "[tasks.{name}]\ncommand = {cmd}\nafter = [{}]\n",
            after.join(", ")
        ));
    };
    task("start", &[]);
    task("a1", &["start".into()]);
    task("a2", &["start".into()]);
    task("mid", &["a1".into(), "a2".into()]);
    let fan: Vec<String> = (1..=6).map(|i| format!("f{i}")).collect();
    for f in &fan {
        task(f, &["mid".into()]);
    }
    task("end", &fan);
    task("report", &["end".into()]);
    t
}

/// The end-to-end check: 20 runs of a 12-task DAG on 3 replicas and 2 workers, the
/// leader killed once and a worker killed once while they run. Every run succeeded; from the
/// tasks' own records, no task started before each of its upstream tasks' successful
/// execution ended; each task of each run succeeded exactly once in fleet's records, and an
/// execution other than the successful one is only ever an attempt fleet recorded as lost.
#[test]
fn a_twelve_task_dag_runs_twenty_times_through_a_leader_kill_and_a_worker_kill() {
    let (mut c, config, peers) = start_fleet(3, 3000);
    let dir = c.dir.path().to_path_buf();
    let mut wa = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "8"]);
    let _wb = TestWorker::start(&dir, "b", &peers, &config, &["--concurrency", "8"]);
    let log = dir.join("exec.log");
    let file = write(&dir, "dag.toml", &dag_file(&log));
    let out = fleet(&["workflow", "apply", &file, "--peers", &peers]);
    assert!(out.status.success(), "{out:?}");
    let ids: Vec<u64> = (0..20).map(|_| start_run(&peers, "dag")).collect();

    // Kill the leader once some tasks have run, then a worker while it runs tasks.
    wait_until("tasks to run", Duration::from_secs(60), || {
        let n = read_log(&log).len();
        if n >= 20 {
            Ok(())
        } else {
            Err(format!("{n} tasks ran"))
        }
    });
    let leader = c.wait_for_leader(&peers, 3, Duration::from_secs(30))["leader_id"]
        .as_u64()
        .unwrap();
    c.node(leader).kill9();
    eprintln!("killed leader {leader}");
    let rest = c.peers_except(leader);
    c.wait_for_leader(&rest, 3, Duration::from_secs(30));
    c.node(leader).start();
    wait_until("more tasks to run", Duration::from_secs(60), || {
        let n = read_log(&log).len();
        if n >= 100 {
            Ok(())
        } else {
            Err(format!("{n} tasks ran"))
        }
    });
    wa.kill9();
    eprintln!("killed worker a");
    let _wc = TestWorker::start(&dir, "c", &peers, &config, &["--concurrency", "8"]);

    let views = wait_runs_final(&peers, &ids, Duration::from_secs(240));
    for v in &views {
        assert_eq!(v["status"], "succeeded", "{v}");
    }
    let tasks = all_tasks(&peers);
    let execs = read_log(&log);
    let mut lost_runs = 0;
    for id in &ids {
        let run = run_show(&peers, *id);
        let nodes = run["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 12);
        // The successful execution of each node: its token and end time.
        let mut done: BTreeMap<String, (u64, u128)> = BTreeMap::new();
        for n in nodes {
            let name = n["name"].as_str().unwrap().to_string();
            let task = &tasks[&n["task"].as_u64().unwrap()];
            assert_eq!(task["state"], "succeeded", "{task}");
            let attempts = task["attempts"].as_array().unwrap();
            let ok: Vec<&Value> = attempts
                .iter()
                .filter(|a| a["outcome"] == "succeeded")
                .collect();
            assert_eq!(ok.len(), 1, "run {id} task {name} succeeded once: {task}");
            for a in attempts.iter().filter(|a| a["outcome"] != "succeeded") {
                assert!(a["outcome"].get("lost").is_some(), "{a}");
                lost_runs += 1;
            }
            let token = ok[0]["fencing_token"].as_u64().unwrap();
            let lines = &execs[&(*id, name.clone())];
            let end = lines
                .iter()
                .find(|e| e.token == token && !e.start)
                .unwrap_or_else(|| panic!("run {id} task {name}: no end for token {token}"));
            // Every other execution is a lost attempt's.
            for e in lines.iter().filter(|e| e.token != token) {
                assert!(
                    attempts.iter().any(
                        |a| a["fencing_token"] == e.token && a["outcome"].get("lost").is_some()
                    ),
                    "run {id} task {name}: execution with token {} is not a lost attempt",
                    e.token
                );
            }
            done.insert(name, (token, end.at_ns));
        }
        for n in nodes {
            let name = n["name"].as_str().unwrap();
            for up in n["after"].as_array().unwrap() {
                let (_, up_end) = done[up.as_str().unwrap()];
                for e in execs[&(*id, name.to_string())].iter().filter(|e| e.start) {
                    assert!(
                        e.at_ns > up_end,
                        "run {id}: {name} started before its upstream {up} ended"
                    );
                }
            }
        }
    }
    eprintln!("20 runs, 240 tasks checked; {lost_runs} lost attempts retried");
}

/// A failing task fails its downstream (`upstream_failed`) and the run; after its input is
/// fixed, `run retry --failed-only` runs only it and its downstream again, and the run
/// succeeds. `run cancel` stops a running run.
#[test]
fn a_failed_run_is_retried_failed_only_after_its_input_is_fixed() {
    let (c, config, peers) = start_fleet(1, 3000);
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "4"]);
    let log = dir.join("exec.log");
    let input = dir.join("input");
    let cmd = recorded(&log, "true");
    let check = recorded(&log, &format!("test -f {}", input.display()));
    let file = write(
        &dir,
        "w.toml",
        &format!(
            "name = \"w\"\n[defaults]\nmax_attempts = 1\n\
             [tasks.extract]\ncommand = {cmd}\n\
             [tasks.transform]\ncommand = {check}\nafter = [\"extract\"]\n\
             [tasks.side]\ncommand = {cmd}\nafter = [\"extract\"]\n\
             [tasks.load]\ncommand = {cmd}\nafter = [\"transform\", \"side\"]\n\
             [tasks.alert]\ncommand = {cmd}\nafter = [\"transform\"]\ntrigger = \"one_failed\"\n"
        ),
    );
    assert!(fleet(&["workflow", "apply", &file, "--peers", &peers])
        .status
        .success());
    let run = start_run(&peers, "w");
    let v = &wait_runs_final(&peers, &[run], Duration::from_secs(60))[0];
    assert_eq!(v["status"], "failed", "{v}");
    let show = run_show(&peers, run);
    let state = |show: &Value, n: &str| {
        show["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(state(&show, "transform")["state"], "failed");
    assert_eq!(state(&show, "load")["state"], "upstream_failed");
    assert!(
        state(&show, "load")["task"].is_null(),
        "load never got a task"
    );
    assert_eq!(
        state(&show, "alert")["state"],
        "succeeded",
        "one_failed ran"
    );
    let kept = |n: &str| state(&show, n)["task"].as_u64().unwrap();
    let (extract, side) = (kept("extract"), kept("side"));

    std::fs::write(&input, "fixed").unwrap();
    let out = fleet(&[
        "run",
        "retry",
        &run.to_string(),
        "--failed-only",
        "--peers",
        &peers,
    ]);
    assert!(out.status.success(), "{out:?}");
    let v = &wait_runs_final(&peers, &[run], Duration::from_secs(60))[0];
    assert_eq!(v["status"], "succeeded", "{v}");
    let after = run_show(&peers, run);
    assert_eq!(state(&after, "extract")["task"], extract, "kept");
    assert_eq!(state(&after, "side")["task"], side, "kept");
    // The alert ran after transform: a retry of transform re-decides it (now skipped).
    assert_eq!(state(&after, "alert")["state"], "skipped");
    let execs = read_log(&log);
    let count = |n: &str| {
        execs[&(run, n.to_string())]
            .iter()
            .filter(|e| e.start)
            .count()
    };
    assert_eq!(
        (
            count("extract"),
            count("side"),
            count("transform"),
            count("load")
        ),
        (1, 1, 2, 1),
        "only the failed task and its downstream ran again"
    );

    // A running run is cancelled: its running task is killed, the rest never starts.
    let slow = write(
        &dir,
        "slow.toml",
        "name = \"slow\"\n[tasks.one]\ncommand = [\"sleep\", \"600\"]\n\
         [tasks.two]\ncommand = [\"true\"]\nafter = [\"one\"]\n",
    );
    assert!(fleet(&["workflow", "apply", &slow, "--peers", &peers])
        .status
        .success());
    let run = start_run(&peers, "slow");
    wait_until("the first task to run", Duration::from_secs(30), || {
        let s = run_show(&peers, run);
        let t = state(&s, "one")["task_state"].clone();
        if t == "running" {
            Ok(())
        } else {
            Err(t.to_string())
        }
    });
    let out = fleet(&["run", "cancel", &run.to_string(), "--peers", &peers]);
    assert!(out.status.success(), "{out:?}");
    let s = run_show(&peers, run);
    assert_eq!(s["status"], "cancelled");
    assert_eq!(state(&s, "two")["state"], "cancelled");
    let one = state(&s, "one")["task"].as_u64().unwrap();
    wait_until("the attempt to be killed", Duration::from_secs(30), || {
        let t = show_task(&peers, one)?;
        let ended = t["attempts"][0]["ended_at_ms"].is_u64();
        if ended {
            Ok(())
        } else {
            Err(t.to_string())
        }
    });
}

/// A workflow with `[schedule] every = "1s"` over a 14 s window, its leader killed with
/// SIGKILL in the middle: every fire time of the window has exactly one run, and each run's
/// first task ran once.
#[test]
fn a_scheduled_workflow_runs_once_per_tick_through_a_leader_kill() {
    let (mut c, config, peers) = start_fleet(3, 3000);
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "16"]);
    let log = dir.join("ticks.log");
    let start = (now_ms() / 1000 + 3) * 1000;
    let end = start + 13_000;
    let file = write(
        &dir,
        "hourly.toml",
        &format!(
            "name = \"ticking\"\nmax_active_runs = 100\n\
             [schedule]\nevery = \"1s\"\nstart_at = \"{}\"\nend_at = \"{}\"\n\
             [tasks.first]\ncommand = [\"sh\", \"-c\", \"echo $FLEET_FIRE_TIME $FLEET_RUN_ID >> {}\"]\n\
             [tasks.second]\ncommand = [\"true\"]\nafter = [\"first\"]\n",
            rfc3339(start),
            rfc3339(end),
            log.display()
        ),
    );
    let out = fleet(&["workflow", "apply", &file, "--peers", &peers]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(
        (start + 5_500).saturating_sub(now_ms()),
    ));
    let leader = c.wait_for_leader(&peers, 3, Duration::from_secs(30))["leader_id"]
        .as_u64()
        .unwrap();
    c.node(leader).kill9();
    eprintln!("killed leader {leader}");
    std::thread::sleep(Duration::from_secs(2));
    c.node(leader).start();
    let expected: BTreeSet<u64> = (0..14).map(|i| start + i * 1000).collect();
    let all = wait_until("every tick's run to end", Duration::from_secs(90), || {
        let rs: Vec<Value> = runs(&peers)
            .into_iter()
            .filter(|r| r["workflow"] == "ticking")
            .collect();
        let done = rs.iter().filter(|r| r["status"] == "succeeded").count();
        if done >= expected.len() && now_ms() > end + 2_000 {
            Ok(rs)
        } else {
            Err(format!("{done} runs succeeded"))
        }
    });
    let fires: Vec<u64> = all.iter().map(|r| r["fire_ms"].as_u64().unwrap()).collect();
    let unique: BTreeSet<u64> = fires.iter().copied().collect();
    assert_eq!(fires.len(), unique.len(), "one run per tick: {fires:?}");
    assert_eq!(unique, expected, "every tick of the window ran");
    let lines = std::fs::read_to_string(&log).unwrap();
    let mut per_fire: BTreeMap<&str, usize> = BTreeMap::new();
    for l in lines.lines() {
        *per_fire
            .entry(l.split_whitespace().next().unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_fire.len(), 14, "{lines}");
    assert!(per_fire.values().all(|n| *n == 1), "{per_fire:?}");
    // The schedule belongs to the workflow: deleting it as a schedule is refused.
    let out = fleet(&["schedule", "delete", "ticking", "--peers", &peers]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to workflow"));

    // A backfill of a daily workflow's last three days: one run per past tick, each with its
    // fire time; a second backfill of the same range creates none.
    let daily_log = dir.join("daily.log");
    let daily = write(
        &dir,
        "daily.toml",
        &format!(
            "name = \"daily\"\n[schedule]\ncron = \"0 3 * * *\"\n\
             [tasks.only]\ncommand = [\"sh\", \"-c\", \"echo $FLEET_FIRE_TIME >> {}\"]\n",
            daily_log.display()
        ),
    );
    assert!(fleet(&["workflow", "apply", &daily, "--peers", &peers])
        .status
        .success());
    let from = rfc3339(now_ms() - 3 * 86_400_000);
    let backfill = |peers: &str| {
        fleet_json(&[
            "workflow", "backfill", "daily", "--from", &from, "--to", "now", "--peers", peers,
        ])
        .unwrap()["Backfilled"]
            .clone()
    };
    let first = backfill(&peers);
    let created = first["created"].as_array().unwrap().len();
    assert_eq!(created, 3, "{first}");
    let again = backfill(&peers);
    assert_eq!(again["created"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["existing"], 3, "{again}");
    wait_until("the backfilled runs", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&daily_log).unwrap_or_default();
        let fires: BTreeSet<&str> = text.lines().collect();
        if fires.len() == 3 && fires.iter().all(|f| f.ends_with("T03:00:00Z")) {
            Ok(())
        } else {
            Err(text.clone())
        }
    });
}

/// `submit --after` holds a task until its upstream tasks succeed, and cancels it when one
/// fails; a 10,000-task workflow is accepted and stored, one more task is refused naming the
/// limit.
#[test]
fn submit_after_and_the_workflow_size_limit() {
    let (c, config, peers) = start_fleet(1, 3000);
    let dir = c.dir.path().to_path_buf();
    let _w = TestWorker::start(&dir, "a", &peers, &config, &["--concurrency", "4"]);
    let up = submit_task(&peers, &[], &["sleep".into(), "1".into()]);
    let down = submit_task(&peers, &["--after", &up.to_string()], &["true".into()]);
    assert_eq!(show_task(&peers, down).unwrap()["state"], "queued");
    let done = wait_for_state(&peers, down, "succeeded", Duration::from_secs(30));
    let up_task = show_task(&peers, up).unwrap();
    assert!(
        done["attempts"][0]["started_at_ms"].as_u64() >= up_task["finished_at_ms"].as_u64(),
        "{done} {up_task}"
    );
    // Fails after a second, so the task after it is submitted while it still runs (an upstream
    // dead already is refused, as the next lines check).
    let bad = submit_task(
        &peers,
        &["--max-attempts", "1"],
        &["sh".into(), "-c".into(), "sleep 1; false".into()],
    );
    let held = submit_task(&peers, &["--after", &bad.to_string()], &["true".into()]);
    wait_for_state(&peers, held, "cancelled", Duration::from_secs(30));
    let out = fleet(&[
        "submit", "--after", "99999", "--peers", &peers, "--", "true",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("task 99999 not found"));
    let dead = bad.to_string();
    let out = fleet(&["submit", "--after", &dead, "--peers", &peers, "--", "true"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("task {dead} is dead")),
        "{out:?}"
    );

    let mut big = String::from("name = \"big\"\n");
    for i in 0..10_000 {
        big.push_str(&format!("[tasks.t{i}]\ncommand = [\"true\"]\n"));
        if i > 0 {
            big.push_str("after = [\"t0\"]\n");
        }
    }
    let path = write(&dir, "big.toml", &big);
    let started = std::time::Instant::now();
    let out = fleet(&["workflow", "apply", &path, "--peers", &peers]);
    assert!(out.status.success(), "{out:?}");
    eprintln!("10,000-task workflow applied in {:?}", started.elapsed());
    let show = fleet(&["workflow", "list", "--peers", &peers]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("big"));
    big.push_str("[tasks.extra]\ncommand = [\"true\"]\n");
    let path = write(&dir, "bigger.toml", &big);
    let out = fleet(&["workflow", "apply", &path, "--peers", &peers]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 10000 tasks"));
}
