//! Configuration through the real binary: precedence (file < environment < flags), secrets
//! from files and commands (masked by `fleet config show`, enforced in the handshake), and
//! clear errors for unknown keys, wrong types and bad durations.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `fleet ARGS` with exactly the given `FLEET*` environment (everything else inherited).
fn fleet_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(fleet_bin());
    cmd.args(args).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("FLEET") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).output().expect("run fleet")
}

fn show(config: &Path, flags: &[&str], env: &[(&str, &str)]) -> Value {
    let mut args = vec!["--config", config.to_str().unwrap(), "config", "show"];
    args.extend(flags);
    args.extend(["--output", "json"]);
    let out = fleet_env(&args, env);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// `fleet --config PATH config show` (text) with the given environment.
fn config_show(config: &Path, env: &[(&str, &str)]) -> Output {
    fleet_env(
        &["--config", config.to_str().unwrap(), "config", "show"],
        env,
    )
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        "[node]\ncluster_name = \"from-file\"\nlisten = \"127.0.0.1:7001\"\n\
         http_listen = \"127.0.0.1:7081\"\n[raft]\ntiming_multiplier = 2.0\n\
         [scheduler]\ntick_ms = \"250ms\"\n[worker]\nconcurrency = 8\n",
    )
    .unwrap();
    // The file alone.
    let v = show(&config, &[], &[]);
    assert_eq!(v["node"]["cluster_name"], "from-file");
    assert_eq!(v["node"]["listen"], "127.0.0.1:7001");
    assert_eq!(v["raft"]["timing_multiplier"], 2.0);
    assert_eq!(v["scheduler"]["tick_ms"], 250, "a duration string, in ms");
    assert_eq!(v["worker"]["concurrency"], 8);
    assert_eq!(v["raft"]["heartbeat_interval_ms"], 125, "a default");
    // The environment over the file.
    let env = [
        ("FLEET__NODE__CLUSTER_NAME", "from-env"),
        ("FLEET__NODE__LISTEN", "127.0.0.1:7002"),
        ("FLEET__WORKER__CONCURRENCY", "16"),
        ("FLEET__NODE__PEERS", "127.0.0.1:7101,127.0.0.1:7102"),
    ];
    let v = show(&config, &[], &env);
    assert_eq!(v["node"]["cluster_name"], "from-env");
    assert_eq!(v["node"]["listen"], "127.0.0.1:7002");
    assert_eq!(v["worker"]["concurrency"], 16);
    assert_eq!(
        v["node"]["peers"],
        serde_json::json!(["127.0.0.1:7101", "127.0.0.1:7102"])
    );
    assert_eq!(v["raft"]["timing_multiplier"], 2.0, "untouched by env");
    // Flags over both.
    let v = show(
        &config,
        &[
            "--cluster-name",
            "from-flag",
            "--raft-timing-multiplier",
            "3",
        ],
        &env,
    );
    assert_eq!(v["node"]["cluster_name"], "from-flag");
    assert_eq!(v["raft"]["timing_multiplier"], 3.0);
    assert_eq!(v["node"]["listen"], "127.0.0.1:7002", "env still applies");
    // --defaults ignores all three.
    let v = show(&config, &["--defaults"], &env);
    assert_eq!(v["node"]["cluster_name"], "fleet");
    // The text form is TOML that fleet reads back as the same configuration.
    let out = config_show(&config, &env);
    let round = dir.path().join("round.toml");
    std::fs::write(&round, &out.stdout).unwrap();
    assert_eq!(show(&round, &[], &[]), show(&config, &[], &env));
}

#[test]
fn secrets_come_from_files_and_commands_and_are_masked() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "file-secret-1\n").unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!("[node]\nauth_token_file = \"{}\"\n", token.display()),
    )
    .unwrap();
    let out = config_show(&config, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(text.contains("auth_token = \"********\""), "{text}");
    assert!(!text.contains("file-secret-1"), "the secret leaked: {text}");
    // From a command, given in the environment; its output never appears.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = config_show(
        &empty,
        &[("FLEET__NODE__AUTH_TOKEN_CMD", "echo cmd-secret-2")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("auth_token = \"********\""), "{text}");
    assert!(!text.contains("cmd-secret-2"), "{text}");
    // A failing command is an error naming the key, not an empty secret.
    let out = config_show(
        &empty,
        &[(
            "FLEET__NODE__AUTH_TOKEN_CMD",
            "echo vault is sealed >&2; exit 2",
        )],
    );
    assert!(!out.status.success());
    let e = stderr_of(&out);
    assert!(
        e.contains("node.auth_token_cmd") && e.contains("vault is sealed"),
        "{e}"
    );
    // Only secret keys take _file / _cmd.
    let out = config_show(
        &empty,
        &[("FLEET__NODE__LISTEN_FILE", token.to_str().unwrap())],
    );
    let e = stderr_of(&out);
    assert!(
        !out.status.success() && e.contains("only secret keys"),
        "{e}"
    );
}

#[test]
fn unknown_keys_wrong_types_and_bad_durations_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "[raft]\nheartbeat_interval = 100\n",
            &[
                "raft.heartbeat_interval",
                "unknown field",
                "heartbeat_interval_ms",
            ],
        ),
        ("[metric]\nstatsd = true\n", &["metric", "unknown field"]),
        (
            "[worker]\nconcurrency = \"four\"\n",
            &["worker.concurrency", "\"four\"", "expected u32"],
        ),
        (
            "[node]\npeers = \"127.0.0.1:7101\"\n",
            &["node.peers", "expected a sequence"],
        ),
        (
            "[scheduler]\ntick_ms = \"5 parsecs\"\n",
            &["scheduler.tick_ms", "5 parsecs", "\"5s\""],
        ),
        (
            "[tasks]\nvisibility_timeout_ms = -5\n",
            &["tasks.visibility_timeout_ms", "-5", "not negative"],
        ),
        (
            "[metrics]\ninterval_ms = \"1ms\"\n",
            &["metrics.interval_ms = 1", "use 100 to 600000"],
        ),
        (
            "[log]\nformat = \"xml\"\n",
            &["log.format", "xml", "text", "json"],
        ),
        (
            "[worker]\ncontainment = \"jail\"\n",
            &[
                "worker.containment = \"jail\"",
                "\"cgroup\"",
                "\"subreaper\"",
            ],
        ),
        ("[node\nlisten = 1\n", &["not valid TOML"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = config_show(&path, &[]);
        let e = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{text}: {e}");
        for n in *needles {
            assert!(e.contains(n), "{text}: expected {n:?} in: {e}");
        }
        // Errors found while reading name the file; range checks (after flags are applied)
        // name the key, the value and the accepted range.
        if !e.contains(" is not valid: use ") {
            assert!(e.contains(path.to_str().unwrap()), "names the file: {e}");
        }
    }
    // The same through the environment names the variable.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = config_show(&empty, &[("FLEET__RAFT__ELECTION_TIMEOUT_MIN_MS", "soon")]);
    let e = stderr_of(&out);
    assert!(
        e.contains("raft.election_timeout_min_ms")
            && e.contains("FLEET__RAFT__ELECTION_TIMEOUT_MIN_MS")
            && e.contains("soon"),
        "{e}"
    );
    let out = config_show(&empty, &[("FLEET__RAFT__HEARTBEAT", "1")]);
    let e = stderr_of(&out);
    assert!(
        e.contains("heartbeat") && e.contains("unknown field"),
        "{e}"
    );
    // A bad filter is named too (validated once, at start, before anything runs).
    let out = config_show(&empty, &[("FLEET__LOG__LEVEL", "fleet=loud")]);
    let e = stderr_of(&out);
    assert!(
        !out.status.success() && e.contains("log.level") && e.contains("fleet=loud"),
        "{e}"
    );
}

#[test]
fn a_cluster_with_an_auth_token_refuses_callers_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let mut c = TestCluster::new(1, &[]);
    let config = test_config(
        c.dir.path(),
        &format!("[node]\nauth_token_file = \"{}\"\n", token.display()),
    );
    c.nodes[0]
        .args
        .extend(["--config".to_string(), config.display().to_string()]);
    c.nodes[0].start();
    let peers = c.peers();
    let cfg = config.to_str().unwrap();
    // With the token (from the same config file): works.
    wait_until("the replica to answer", Duration::from_secs(30), || {
        let out = fleet_env(
            &[
                "--config", cfg, "cluster", "status", "--peers", &peers, "--output", "json",
            ],
            &[],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(stderr_of(&out))
        }
    });
    // Without a token, and with a wrong one: refused, saying why, never echoing the token.
    let no_token: &[(&str, &str)] = &[];
    let wrong_token: &[(&str, &str)] = &[("FLEET__NODE__AUTH_TOKEN", "guess")];
    for (env, why) in [
        (no_token, "requires an auth token"),
        (wrong_token, "auth token does not match"),
    ] {
        let out = fleet_env(
            &[
                "cluster",
                "status",
                "--peers",
                &peers,
                "--retry-for",
                "2000ms",
            ],
            env,
        );
        let e = stderr_of(&out);
        assert!(!out.status.success() && e.contains(why), "{e}");
        assert!(!e.contains("s3cret"), "the token leaked: {e}");
    }
    // The replica logs the refusals without the token.
    let log = c.nodes[0].log_text();
    assert!(log.contains("refused connection"), "{}", tail(&log, 20));
    assert!(!log.contains("s3cret"), "the token leaked into the log");
}

#[test]
fn json_logs_carry_the_node_in_every_replica_line() {
    let mut c = TestCluster::new(1, &[]);
    let config = test_config(c.dir.path(), "[log]\nformat = \"json\"\n");
    c.nodes[0]
        .args
        .extend(["--config".to_string(), config.display().to_string()]);
    c.nodes[0].start();
    let peers = c.peers();
    c.wait_for_leader(&peers, 1, Duration::from_secs(30));
    let lines = wait_until("a leading line", Duration::from_secs(30), || {
        let log = c.nodes[0].log_text();
        if log.contains("leading: scheduling") {
            Ok(log)
        } else {
            Err(tail(&log, 5))
        }
    });
    let mut fleet_lines = 0;
    for line in lines.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["target"].as_str().is_some_and(|t| t.starts_with("fleet")) {
            fleet_lines += 1;
            assert_eq!(v["span"]["name"], "replica", "{line}");
            assert_eq!(v["span"]["node"], 1, "{line}");
        }
    }
    assert!(fleet_lines >= 2, "{lines}");
}
