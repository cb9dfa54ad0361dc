//! The deterministic simulator (`chaos sim`), as the test suite runs it: determinism, the
//! regression seeds of what it found in fleet, and the bug classes it must find. CI also runs a
//! few hundred random seeds (`.ci/run`); these are the fixed ones.

use std::process::Command;

fn sim(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .arg("sim")
        .args(args)
        .output()
        .expect("run chaos sim");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("chaos sim {}:\n{text}", args.join(" "));
    (out.status.success(), text)
}

/// One seed twice: the same event trace, bit for bit (and the figures the note quotes).
#[test]
fn a_seed_replays_the_same_trace() {
    let (ok, text) = sim(&["--seed", "7", "--duration", "20s", "--twice"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("deterministic: a second run gave the same trace"),
        "{text}"
    );
}

/// What the simulator found in fleet, each kept as seeds that fail with the fix switched off
/// and pass with it:
/// - a worker whose heartbeats were lost (a lossy link) for longer than the visibility timeout
///   ran its attempt to the end while another worker ran the task (fixed: the worker kills an
///   attempt whose lease lapsed, `worker::heartbeat::lapse_after`; `--bug
///   worker-ignores-lapse` switches the simulated workers back);
/// - a heartbeat answered while the leader was proposing the expiry of one of the worker's
///   leases offered that lease for adoption (or extended it); the worker started it, the
///   expiry ended it moments later, the task went to another worker, and the short attempt ran
///   to its end before the next heartbeat could fence it (fixed: the scheduler core neither
///   extends nor offers a lease whose expiry is pending, `--bug
///   heartbeat-ignores-pending-expiry` switches it back).
#[test]
fn the_regression_seeds_pass() {
    for (seed, bug) in [
        ("5129", "worker-ignores-lapse"),
        ("92862", "heartbeat-ignores-pending-expiry"),
    ] {
        let (ok, text) = sim(&["--seed", seed]);
        assert!(ok, "seed {seed}: {text}");
        assert!(text.contains("invariants: OK"), "{text}");
        let (ok, text) = sim(&["--seed", seed, "--bug", bug]);
        assert!(
            !ok && text.contains("[overlap]"),
            "seed {seed} without the fix ({bug}): {text}"
        );
    }
}

/// The bug classes re-introduced behind test-only switches are found, and the failure prints
/// the command that replays it.
#[test]
fn the_simulator_finds_the_reintroduced_bugs() {
    for (bug, seed, violation) in [
        (
            "grant-skips-recheck",
            "5028",
            "[panic] state invariant broken",
        ),
        (
            "heartbeat-extends-expired",
            "5000",
            "[lease-extended-after-expiry]",
        ),
        // Found through the operator's `fleet task requeue`, sent with the token it read a
        // moment earlier, or sent twice.
        ("expire-ignores-token", "5000", "[requeue-of-another]"),
    ] {
        let (ok, text) = sim(&["--seed", seed, "--bug", bug]);
        assert!(!ok, "--bug {bug} seed {seed} passed: {text}");
        assert!(text.contains(violation), "{text}");
        assert!(
            text.contains(&format!("replay: chaos sim --seed {seed} --bug {bug}")),
            "{text}"
        );
    }
}
