//! Golden fixtures: the bytes of a fixed sample of every encoded format, committed as
//! `tests/fixtures/formats/<format>-v<version>.bin`.
//!
//! The fixture of the current version must match what this build encodes, byte for byte: a
//! change of an encoding (a field added to a command, an enum variant reordered, a dependency
//! that serializes differently) without a new version number fails here. Fixtures of earlier
//! versions stay committed and must still decode, for the formats this build still reads.
//! `UPDATE_FIXTURES=1 cargo test --lib formats` writes a missing fixture of the current
//! version (never overwrites one).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::raft::{Entry, LogId, Node, TypeConfig, Vote};
use crate::rpc::handshake::{Hello, HelloReply};
use crate::rpc::Role;
use crate::state::pools::PoolClaim;
use crate::state::runs::{NodeSpec, WorkflowSpec};
use crate::state::schedules::{
    MissedTicks, PlannedRun, PutMode, ScheduleId, ScheduleSpec, TickPlan, Trigger,
};
use crate::state::testing::Applier;
use crate::state::workflows::{Graph, TriggerRule};
use crate::state::{
    AttemptOutcome, CatchupPolicy, Command, OverlapPolicy, Request, RequestId, RunId, TaskId,
    TaskSpec, WorkerId,
};

fn fixture(name: &str, version: impl std::fmt::Display) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/formats")
        .join(format!("{name}-v{version}.bin"))
}

/// Several encoded items in one file: each as a `u32` LE length, then its bytes.
fn pack(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

fn unpack(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let n = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        out.push(bytes[4..4 + n].to_vec());
        bytes = &bytes[4 + n..];
    }
    out
}

/// Checks `bytes` against the fixture of `name` at `version` (`constant` names the version to
/// bump).
fn check(name: &str, constant: &str, version: impl std::fmt::Display + Copy, bytes: &[u8]) {
    let path = fixture(name, version);
    match std::fs::read(&path) {
        Ok(committed) => assert!(
            committed == bytes,
            "the encoding of {name} changed, but {constant} is still {version}: bump {constant}, \
             keep reading version {version} (its fixture {} stays), and write the new fixture \
             with UPDATE_FIXTURES=1 cargo test --lib formats",
            path.display()
        ),
        Err(_) if std::env::var_os("UPDATE_FIXTURES").is_some() => {
            std::fs::write(&path, bytes).unwrap();
            eprintln!("wrote {}", path.display());
        }
        Err(e) => panic!(
            "no golden fixture {} ({e}): write it with UPDATE_FIXTURES=1 cargo test --lib formats \
             and commit it",
            path.display()
        ),
    }
}

fn task_spec(cmd: &str, queue: &str) -> TaskSpec {
    let mut t = TaskSpec::new(vec![cmd.into(), "--flag".into(), "a b".into()], queue);
    t.priority = -3;
    t.env = vec![("KEY".into(), "value".into())];
    t.execution_timeout_ms = Some(60_000);
    t.not_before_ms = Some(1_700_000_000_000);
    t.idempotency_key = Some(format!("key-{cmd}"));
    t
}

fn schedule_spec() -> ScheduleSpec {
    ScheduleSpec {
        trigger: Trigger::Cron {
            expr: "*/5 * * * *".into(),
            timezone: "Europe/Paris".into(),
        },
        start_at_ms: Some(1_700_000_000_000),
        end_at_ms: None,
        catchup: CatchupPolicy::All,
        catchup_window_ms: 3_600_000,
        overlap: OverlapPolicy::Allow,
        jitter_ms: 250,
        task: task_spec("report", "default"),
        pool: Some(claim()),
    }
}

fn claim() -> PoolClaim {
    PoolClaim {
        pool: "db".into(),
        slots: 2,
    }
}

fn workflow_spec() -> WorkflowSpec {
    let after: BTreeMap<String, Vec<String>> = [
        ("a".to_string(), vec![]),
        ("b".to_string(), vec!["a".to_string()]),
        ("c".to_string(), vec!["a".to_string()]),
        ("d".to_string(), vec!["b".to_string(), "c".to_string()]),
    ]
    .into();
    let graph = Graph::new(&after).unwrap();
    let nodes = graph
        .names
        .iter()
        .map(|n| NodeSpec {
            task: TaskSpec::new(vec!["step".into(), n.clone()], "default"),
            pool: None,
            trigger: TriggerRule::AllSuccess,
        })
        .collect();
    WorkflowSpec {
        graph,
        nodes,
        max_active_runs: 4,
    }
}

/// One command of every kind, in the order of the enum, so that a new kind fails the fixture
/// until it is added here (and a version decision is made).
fn commands() -> Vec<Command> {
    let rid = |n: u128| RequestId(0x0123_4567_89ab_cdef_0000_0000_0000_0000 + n);
    vec![
        Command::SubmitTask {
            request_id: rid(1),
            spec: task_spec("echo", "default"),
        },
        Command::GrantLeases {
            worker: WorkerId(7),
            tasks: vec![TaskId(1)],
        },
        Command::Complete {
            task: TaskId(1),
            fencing_token: 1,
            outcome: AttemptOutcome::Failed {
                exit_code: Some(2),
                signal: None,
                error: Some("boom".into()),
            },
            output_tail: "last line\n".into(),
            retry_jitter_permille: 412,
        },
        Command::expire(TaskId(1), 2, "no heartbeat".into(), 99),
        Command::Cancel { task: TaskId(1) },
        Command::Retry { task: TaskId(1) },
        Command::PurgeFinished {
            finished_before_ms: 1_700_000_100_000,
            max: 100,
        },
        Command::GrantLeasesTo {
            worker: WorkerId(7),
            worker_name: "golden-worker".into(),
            tasks: vec![TaskId(1), TaskId(2)],
        },
        Command::PutSchedule {
            name: "nightly".into(),
            spec: schedule_spec(),
            paused: Some(false),
            mode: PutMode::Create,
        },
        Command::PauseSchedule {
            name: "nightly".into(),
            paused: true,
        },
        Command::DeleteSchedule {
            name: "nightly".into(),
        },
        Command::FireTicks {
            plans: vec![TickPlan {
                schedule: ScheduleId(1),
                after_ms: 1_700_000_000_000,
                through_ms: 1_700_000_600_000,
                runs: vec![PlannedRun {
                    fire_ms: 1_700_000_300_000,
                    jitter_ms: 12,
                    catch_up: true,
                }],
                missed: vec![MissedTicks {
                    count: 3,
                    first_ms: 1_700_000_000_000,
                    last_ms: 1_700_000_200_000,
                    reason: "catch-up window".into(),
                }],
            }],
        },
        Command::TriggerSchedule {
            name: "nightly".into(),
            key: 42,
        },
        Command::Backfill {
            name: "nightly".into(),
            fires: vec![1_699_000_000_000],
        },
        Command::SetPool {
            name: "db".into(),
            slots: 4,
        },
        Command::DeletePool { name: "db".into() },
        Command::SubmitPooled {
            request_id: rid(2),
            spec: task_spec("pooled", "default"),
            pool: claim(),
        },
        Command::PutWorkflow {
            name: "etl".into(),
            spec: workflow_spec(),
            schedule: Some(schedule_spec()),
        },
        Command::DeleteWorkflow { name: "etl".into() },
        Command::StartRun {
            workflow: "etl".into(),
            request_id: rid(3),
            params: vec![("day".into(), "2026-12-03".into())],
        },
        Command::CancelRun { run: RunId(1) },
        Command::RetryRun {
            run: RunId(1),
            failed_only: true,
        },
        Command::SubmitAfter {
            request_id: rid(4),
            spec: task_spec("after", "default"),
            pool: None,
            after: vec![TaskId(1)],
        },
        Command::BackfillWorkflow {
            name: "etl".into(),
            fires: vec![1_699_000_000_000],
        },
    ]
}

fn log_id(term: u64, index: u64) -> LogId {
    openraft::testing::log_id::<TypeConfig>(term, 1, index)
}

/// Raft log entries: a blank one, a membership change, and a batch of every command.
fn entries() -> Vec<Entry> {
    use openraft::entry::RaftEntry;
    let members: BTreeMap<u64, Node> = [
        (
            1,
            Node {
                addr: "10.0.0.1:7101".into(),
            },
        ),
        (
            2,
            Node {
                addr: "10.0.0.2:7101".into(),
            },
        ),
        (
            3,
            Node {
                addr: "10.0.0.3:7101".into(),
            },
        ),
    ]
    .into();
    let membership = openraft::Membership::new(vec![[1, 2, 3].into()], members).unwrap();
    vec![
        Entry::new_blank(log_id(1, 1)),
        Entry::new_membership(log_id(1, 2), membership),
        Entry::new_normal(
            log_id(2, 3),
            Request {
                proposed_at_ms: 1_700_000_000_000,
                commands: commands(),
            },
        ),
    ]
}

#[test]
fn raft_log_entries_and_markers_match_their_fixture() {
    use crate::raft::log_store::{decode, encode, Identity};
    let mut items: Vec<Vec<u8>> = entries().iter().map(|e| encode(e).unwrap()).collect();
    items.push(encode(&Vote::new_committed(2, 1)).unwrap());
    items.push(encode(&Some(log_id(2, 3))).unwrap());
    items.push(
        encode(&Identity {
            node_id: 1,
            cluster_name: "fleet".into(),
            cluster_id: Some(0xfeed_f00d),
        })
        .unwrap(),
    );
    check(
        "raft-log",
        "ENTRY_FORMAT",
        super::ENTRY_FORMAT,
        &pack(&items),
    );
    // And they read back as what was written.
    let back: Entry = decode("fixture", &items[2]).unwrap();
    assert_eq!(back, entries()[2]);
}

#[test]
fn the_state_bytes_and_the_snapshot_file_match_their_fixtures() {
    use crate::raft::state_machine_store::{decode_state, encode_state, snapshot_file_bytes};
    let mut a = Applier::default();
    let mut now = 1_700_000_000_000;
    for c in commands() {
        now += 1_000;
        let _ = a.one(now, c);
    }
    for i in 0..3 {
        let _ = a.one(
            now + i,
            Command::SubmitTask {
                request_id: RequestId(1_000 + u128::from(i)),
                spec: TaskSpec::new(vec!["more".into()], "other"),
            },
        );
    }
    let state = encode_state(&a.state).unwrap();
    check("state", "STATE_FORMAT", super::STATE_FORMAT, &state);
    assert_eq!(decode_state("fixture", &state).unwrap(), {
        let mut s = a.state.clone();
        s.rebuild_tally();
        s
    });
    let meta = crate::raft::SnapshotMeta {
        last_log_id: Some(log_id(2, 3)),
        last_membership: Default::default(),
    };
    let file = snapshot_file_bytes(&meta, &state).unwrap();
    check(
        "snapshot-file",
        "SNAPSHOT_FILE_FORMAT",
        super::SNAPSHOT_FILE_FORMAT,
        &file,
    );
}

#[test]
fn handshake_frames_match_their_fixture() {
    use crate::rpc::handshake::frame;
    let hello = Hello {
        cluster_name: "fleet".into(),
        cluster_id: Some(0xfeed_f00d),
        role: Role::Worker,
        from_node: None,
        expect_node: Some(2),
        auth_token: "secret".into(),
    };
    let reply = HelloReply::Accepted {
        node_id: 2,
        cluster_id: Some(0xfeed_f00d),
    };
    let items = vec![
        frame(&hello, super::PROTOCOL_VERSION).unwrap(),
        frame(&reply, super::PROTOCOL_VERSION).unwrap(),
    ];
    check(
        "handshake",
        "PROTOCOL_VERSION",
        super::PROTOCOL_VERSION,
        &pack(&items),
    );
}

#[test]
fn the_fixtures_of_earlier_versions_still_decode() {
    use crate::raft::state_machine_store::decode_state;
    // Every state format this build reads has a fixture (format 1 predates this module: its
    // snapshot is tests/fixtures/snapshot-state-format-1.bin, read by state_machine_store).
    for v in 2..super::STATE_FORMAT {
        if let Ok(bytes) = std::fs::read(fixture("state", v)) {
            decode_state(&format!("state format {v} fixture"), &bytes).unwrap();
        }
    }
    let packed = std::fs::read(fixture("raft-log", super::ENTRY_FORMAT)).unwrap();
    assert_eq!(unpack(&packed).len(), 6);
    // Every message of every protocol version this build speaks still decodes (new calls and
    // fields are appended, so older messages keep their bytes).
    use crate::rpc::{FleetServiceRequest, FleetServiceResponse};
    let cfg = bincode::config::standard();
    for v in crate::rpc::handshake::MIN_PROTOCOL_VERSION..super::PROTOCOL_VERSION {
        let packed = std::fs::read(fixture("rpc", v)).unwrap();
        for (i, item) in unpack(&packed).iter().enumerate() {
            let request =
                bincode::serde::decode_from_slice::<FleetServiceRequest, _>(item, cfg).is_ok();
            let response =
                bincode::serde::decode_from_slice::<FleetServiceResponse, _>(item, cfg).is_ok();
            assert!(
                request || response,
                "rpc-v{v} message {i} no longer decodes"
            );
        }
    }
}

#[test]
fn rpc_messages_match_their_fixture() {
    // The messages of the calls workers and replicas make of each other, encoded as the
    // transport encodes them (tarpc's envelope around them is tarpc's: its deadline is
    // relative to the sending instant, so it has no fixed bytes).
    use crate::rpc::{
        AppendReq, AttemptReport, FleetServiceRequest, FleetServiceResponse, HeartbeatReply,
        HeldLease, LeaseVerdict, LeasedTask, NewTask, SubmitTask, WorkerInfo,
    };
    let worker = WorkerInfo {
        id: WorkerId(7),
        name: "golden-worker".into(),
        queues: vec!["default".into(), "gpu".into()],
        slots: 4,
        running: 1,
        draining: false,
    };
    let lease = LeasedTask {
        task: TaskId(1),
        attempt: 1,
        fencing_token: 3,
        spec: task_spec("echo", "default"),
    };
    let requests = [
        FleetServiceRequest::LeaseTasks {
            worker: worker.clone(),
            max: 3,
            wait_ms: 20_000,
            hop: 0,
        },
        FleetServiceRequest::Heartbeat {
            worker: worker.clone(),
            leases: vec![HeldLease {
                task: TaskId(1),
                fencing_token: 3,
            }],
            hop: 0,
        },
        FleetServiceRequest::Report {
            worker: WorkerId(7),
            reports: vec![AttemptReport {
                task: TaskId(1),
                fencing_token: 3,
                outcome: AttemptOutcome::Succeeded,
                output_tail: "done\n".into(),
            }],
            hop: 0,
        },
        FleetServiceRequest::Submit {
            tasks: vec![SubmitTask {
                request_id: RequestId(9),
                task: NewTask {
                    command: vec!["echo".into(), "hi".into()],
                    queue: Some("default".into()),
                    max_attempts: Some(2),
                    ..Default::default()
                },
            }],
            hop: 1,
        },
        FleetServiceRequest::RaftAppend {
            req: AppendReq {
                vote: Vote::new_committed(2, 1),
                prev_log_id: Some(log_id(1, 2)),
                entries: entries(),
                leader_commit: Some(log_id(1, 2)),
            },
        },
        FleetServiceRequest::WorkerLeave {
            worker: WorkerId(7),
            hop: 0,
        },
        FleetServiceRequest::BackupChunk {
            session: 77,
            offset: 8 << 20,
            hop: 0,
        },
        FleetServiceRequest::AppendOutput {
            worker: WorkerId(7),
            chunks: vec![crate::rpc::OutputChunk {
                task: TaskId(1),
                fencing_token: 3,
                offset: 4096,
                tail_start: 1024,
                data: b"line 7\n".to_vec(),
                last: true,
            }],
        },
        FleetServiceRequest::ReadOutput {
            task: TaskId(1),
            fencing_token: 3,
            offset: 100,
            hop: 0,
        },
        FleetServiceRequest::RequeueTask {
            id: TaskId(1),
            fencing_token: 3,
            hop: 1,
        },
    ];
    let responses = [
        FleetServiceResponse::LeaseTasks(Ok(vec![lease.clone()])),
        FleetServiceResponse::Heartbeat(Ok(HeartbeatReply {
            verdicts: vec![LeaseVerdict::Extended, LeaseVerdict::Fenced],
            adopt: vec![lease],
        })),
        FleetServiceResponse::WorkerLeave(Err(crate::error::Error::NotLeader {
            leader_id: Some(2),
            leader_addr: Some("10.0.0.2:7101".into()),
        })),
        FleetServiceResponse::BackupChunk(Ok(crate::rpc::BackupChunk {
            session: 77,
            total: 10,
            offset: 0,
            data: b"FLEETSNP\x01\x00".to_vec(),
        })),
        FleetServiceResponse::AppendOutput(Ok(vec![
            Ok(4103),
            Err(crate::error::Error::StaleToken("task 1".into())),
        ])),
        FleetServiceResponse::ReadOutput(Ok(Some(crate::rpc::OutputRead {
            start: 1024,
            from: 1024,
            end: 4103,
            data: b"line 1\n".to_vec(),
            complete: false,
        }))),
        FleetServiceResponse::RequeueTask(Ok(crate::state::TaskState::Failed)),
    ];
    let cfg = bincode::config::standard();
    let mut items: Vec<Vec<u8>> = requests
        .iter()
        .map(|r| bincode::serde::encode_to_vec(r, cfg).unwrap())
        .collect();
    items.extend(
        responses
            .iter()
            .map(|r| bincode::serde::encode_to_vec(r, cfg).unwrap()),
    );
    check(
        "rpc",
        "PROTOCOL_VERSION",
        super::PROTOCOL_VERSION,
        &pack(&items),
    );
}
