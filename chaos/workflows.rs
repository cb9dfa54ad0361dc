//! The workflow workload (`chaos run --workflows`): runs of a diamond and of a fan-out of 50
//! started through every fault, their tasks recording executions like every other task.
//!
//! - `chaos-diamond`: `a -> (b, c) -> d`, then `e` after `d` with trigger `all_done`; `b` fails
//!   its first attempt (a retried task inside a run). A run starts every second.
//! - `chaos-fanout`: `root -> f00..f49 -> join`. A run starts every 6 s.
//!
//! At the end the harness waits for every started run to end and reads each with its tasks;
//! the checker's `workflow` invariant judges them with the execution log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet::rpc::workflows::{RunFilter, WorkflowDef, WorkflowOp, WorkflowOutcome, WorkflowTaskDef};
use fleet::rpc::{NewTask, ReadMode};
use fleet::state::workflows::TriggerRule;
use fleet::state::{RequestId, RunId};
use rand::{Rng, SeedableRng};

use crate::cluster::VISIBILITY_TIMEOUT_MS;
use crate::history::{NodeRecord, RunRecord};
use crate::run::{client, record_command, wait_for, Shared};

/// (workflow, interval between runs).
pub const WORKFLOWS: [(&str, Duration); 2] = [
    ("chaos-diamond", Duration::from_secs(1)),
    ("chaos-fanout", Duration::from_secs(6)),
];
/// How long every started run may take to end after the workload stops.
pub const RUNS_DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

fn task(shared: &Shared, key: &str, work_ms: u64, fail_attempts: u32) -> NewTask {
    NewTask {
        command: record_command(shared, key, work_ms, fail_attempts),
        max_attempts: Some(5),
        backoff_initial_ms: Some(200),
        backoff_max_ms: Some(1_000),
        visibility_timeout_ms: Some(VISIBILITY_TIMEOUT_MS),
        ..Default::default()
    }
}

fn node(task: NewTask, after: &[&str], trigger: TriggerRule) -> WorkflowTaskDef {
    WorkflowTaskDef {
        task,
        after: after.iter().map(|s| s.to_string()).collect(),
        trigger,
    }
}

/// The two workflows' definitions.
fn definitions(shared: &Shared) -> Vec<WorkflowDef> {
    use TriggerRule::{AllDone, AllSuccess};
    let mut diamond = std::collections::BTreeMap::new();
    let k = |n: &str| format!("wf-diamond-{n}");
    diamond.insert(
        "a".into(),
        node(task(shared, &k("a"), 100, 0), &[], AllSuccess),
    );
    diamond.insert(
        "b".into(),
        node(task(shared, &k("b"), 150, 1), &["a"], AllSuccess),
    );
    diamond.insert(
        "c".into(),
        node(task(shared, &k("c"), 200, 0), &["a"], AllSuccess),
    );
    diamond.insert(
        "d".into(),
        node(task(shared, &k("d"), 100, 0), &["b", "c"], AllSuccess),
    );
    diamond.insert(
        "e".into(),
        node(task(shared, &k("e"), 50, 0), &["d"], AllDone),
    );
    let mut fanout = std::collections::BTreeMap::new();
    let k = |n: &str| format!("wf-fanout-{n}");
    fanout.insert(
        "root".into(),
        node(task(shared, &k("root"), 100, 0), &[], AllSuccess),
    );
    let leaves: Vec<String> = (0..50).map(|i| format!("f{i:02}")).collect();
    for l in &leaves {
        fanout.insert(
            l.clone(),
            node(task(shared, &k(l), 60, 0), &["root"], AllSuccess),
        );
    }
    let refs: Vec<&str> = leaves.iter().map(String::as_str).collect();
    fanout.insert(
        "join".into(),
        node(task(shared, &k("join"), 100, 0), &refs, AllSuccess),
    );
    [("chaos-diamond", diamond), ("chaos-fanout", fanout)]
        .into_iter()
        .map(|(name, tasks)| WorkflowDef {
            name: name.into(),
            max_active_runs: Some(50),
            tasks,
            schedule: None,
        })
        .collect()
}

async fn ops(shared: &Shared, ops: Vec<WorkflowOp>) -> anyhow::Result<Vec<WorkflowOutcome>> {
    let mut c = client(shared.fronts(), Duration::from_secs(8))?;
    let results = c
        .call(|cl, ctx| {
            let ops = ops.clone();
            async move { cl.workflow_ops(ctx, ops, 0).await }
        })
        .await?;
    results
        .into_iter()
        .map(|r| r.map_err(anyhow::Error::from))
        .collect()
}

/// Applies the workflows.
pub async fn setup(shared: &Shared) -> anyhow::Result<()> {
    let defs = definitions(shared)
        .into_iter()
        .map(|d| WorkflowOp::Apply(Box::new(d)))
        .collect();
    ops(shared, defs).await?;
    Ok(())
}

/// Starts runs of each workflow at its interval until `stop`; records each acknowledged run.
pub async fn workload(shared: Arc<Shared>, seed: u64, stop: Arc<AtomicBool>) {
    let mut handles = Vec::new();
    for (i, (name, every)) in WORKFLOWS.into_iter().enumerate() {
        let shared = shared.clone();
        let stop = stop.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (0x3f10_0000 + i as u64));
        handles.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                // One request id per run: a call retried through a failover starts one run.
                let op = WorkflowOp::Run {
                    workflow: name.to_string(),
                    params: vec![],
                    request_id: RequestId(rng.random()),
                };
                if let Ok(out) = ops(&shared, vec![op]).await {
                    if let Some(WorkflowOutcome::Started { run, .. }) = out.first() {
                        shared.runs_started.lock().expect("runs").push(run.0);
                    }
                }
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
}

/// Waits until every started run ended; every run, with its tasks.
pub async fn finish(shared: &Shared) -> Result<Vec<RunRecord>, String> {
    let started: Vec<u64> = shared.runs_started.lock().expect("runs").clone();
    shared.say(format!(
        "{} workflow runs started; waiting for them to end",
        started.len()
    ));
    wait_for(RUNS_DRAIN_TIMEOUT, || async {
        let runs = read_runs(shared).await.map_err(|e| e.to_string())?;
        let open = runs
            .iter()
            .filter(|r| started.contains(&r.id) && !r.is_final())
            .count();
        if open == 0 {
            Ok(runs)
        } else {
            Err(format!("{open} workflow runs not final"))
        }
    })
    .await
}

/// Every run, with its tasks (linearizable reads).
pub async fn read_runs(shared: &Shared) -> anyhow::Result<Vec<RunRecord>> {
    let mut c = client(shared.fronts(), Duration::from_secs(10))?;
    let mut list = Vec::new();
    loop {
        let f = RunFilter {
            limit: fleet::rpc::workflows::MAX_RUN_LIST,
            before: list.last().map(|r: &fleet::rpc::workflows::RunView| r.id),
            ..Default::default()
        };
        let page = c
            .call(|cl, ctx| {
                let f = f.clone();
                async move { cl.get_runs(ctx, f, ReadMode::Linearizable, 0).await }
            })
            .await?
            .value;
        if page.is_empty() {
            break;
        }
        list.extend(page);
    }
    let mut out = Vec::new();
    for r in list {
        let f = RunFilter {
            run: Some(RunId(r.id.0)),
            ..Default::default()
        };
        let mut one = c
            .call(|cl, ctx| {
                let f = f.clone();
                async move { cl.get_runs(ctx, f, ReadMode::Linearizable, 0).await }
            })
            .await?
            .value;
        let v = one
            .pop()
            .ok_or_else(|| anyhow::anyhow!("run {} vanished", r.id))?;
        out.push(RunRecord {
            id: v.id.0,
            workflow: v.workflow,
            status: v.status.as_str().to_string(),
            nodes: v
                .nodes
                .into_iter()
                .map(|n| NodeRecord {
                    name: n.name,
                    after: n.after,
                    trigger: n.trigger.as_str().to_string(),
                    state: fleet::rpc::workflows::node_state_name(n.state).to_string(),
                    task: n.task.map(|t| t.0),
                })
                .collect(),
        });
    }
    Ok(out)
}
