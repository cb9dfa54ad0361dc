//! One simulated replica: fleet's own Raft glue, state machine store, proposer and scheduler
//! (its sans-IO core and the loops around it), on a simulated disk, network and clock. What a
//! replica serves to workers and clients is here as plain methods (the simulator's RPC layer
//! is [`super::net::Fabric::call`]): each does what `server::worker_calls` does on the leader,
//! through the same scheduler core.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet::clock::Clock;
use fleet::error::Error;
use fleet::raft::log_store::LogStore;
use fleet::raft::proposer::Proposer;
use fleet::raft::state_machine_store::StateMachineStore;
use fleet::raft::{NodeId, Raft};
use fleet::random::Random;
use fleet::rpc::{AttemptReport, HeartbeatReply, HeldLease, LeasedTask, WorkerInfo};
use fleet::scheduler::core::{Bugs as CoreBugs, CoreConfig};
use fleet::scheduler::scheduling_loop::LoopContext;
use fleet::scheduler::Scheduler;
use fleet::shutdown::{self, Trigger};
use fleet::state::{Bugs as StateBugs, Command, CommandOutput, State, TaskId, TaskState, WorkerId};
use openraft::async_runtime::WatchReceiver;
use tokio::task::JoinHandle;

use super::disk::Disk;
use super::net::{Fabric, SimNetworkFactory};

/// The bug switches a run turns on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimBugs {
    pub state: StateBugs,
    pub core: CoreBugs,
    /// The simulated workers do not kill an attempt whose lease lapsed (the worker as it was
    /// before the simulator's first finding).
    pub worker_ignores_lapse: bool,
}

/// The replica configuration the simulator runs (fleet's defaults, with snapshots frequent
/// enough to be exercised in a minute).
pub fn config() -> fleet::config::Config {
    let mut c = fleet::config::Config::default();
    c.raft.snapshot_every_entries = 300;
    c.raft.keep_log_entries_after_snapshot = 50;
    c
}

pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub cx: LoopContext,
    trigger: Trigger,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Violations of the simulator's protocol assertions, for the run's verdict.
    violations: Violations,
}

/// Where nodes put what their protocol assertions found.
pub type Violations = Arc<Mutex<Vec<String>>>;

impl Node {
    /// Starts (or restarts, from its disk) replica `id`.
    pub async fn start(
        id: NodeId,
        disk: &Disk,
        fabric: &Arc<Fabric>,
        clock: Clock,
        seed: u64,
        bugs: SimBugs,
        violations: Violations,
    ) -> Arc<Node> {
        let config = config();
        let (backend, flusher) = disk.backend();
        let sm = StateMachineStore::in_memory(disk.snapshot.clone(), bugs.state)
            .expect("the simulated snapshot decodes");
        let raft_config =
            fleet::raft::openraft_config("sim", &config.raft).expect("a valid raft config");
        let network = SimNetworkFactory {
            from: id,
            fabric: fabric.clone(),
        };
        let raft = Raft::new(id, raft_config, network, LogStore::on(backend), sm.clone())
            .await
            .expect("raft starts");
        let random = Random::seeded(seed);
        let proposer = Proposer::start(raft.clone(), clock.clone());
        let mut core = CoreConfig::from_config(&config);
        core.bugs = bugs.core;
        let (trigger, shutdown) = shutdown::channel();
        let cx = LoopContext {
            node: id,
            raft: raft.clone(),
            sm,
            proposer,
            scheduler: Arc::new(Scheduler::new(core)),
            clock,
            random,
            stall: Default::default(),
            shutdown,
        };
        let tasks = vec![
            flusher,
            tokio::spawn(fleet::scheduler::scheduling_loop::run(cx.clone())),
            tokio::spawn(fleet::scheduler::ticker::run(cx.clone())),
        ];
        let node = Arc::new(Node {
            id,
            raft,
            cx,
            trigger,
            tasks: Mutex::new(tasks),
            violations,
        });
        fabric.up(node.clone());
        node
    }

    /// Stops this incarnation at once (a crash: nothing is handed over).
    pub async fn crash(&self) {
        self.trigger.fire();
        let _ = self.raft.shutdown().await;
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }

    /// (term, leader) as this replica knows them.
    pub fn leadership(&self) -> (u64, Option<NodeId>) {
        let m = self.raft.metrics().borrow_watched().clone();
        (m.current_term, m.current_leader)
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            leader_id: self.leadership().1,
            leader_addr: None,
        }
    }

    /// Ok when this replica leads and its scheduling loop caught up with the term.
    fn ready(&self) -> Result<(), Error> {
        let (term, leader) = self.leadership();
        if leader != Some(self.id) {
            return Err(self.not_leader());
        }
        if self.cx.scheduler.ready_term() != Some(term) {
            return Err(Error::Unavailable("catching up".into()));
        }
        Ok(())
    }

    pub async fn lease(
        &self,
        worker: WorkerInfo,
        max: u32,
        wait_ms: u64,
    ) -> Result<Vec<LeasedTask>, Error> {
        self.ready()?;
        let deadline = self.cx.clock.mono_ms() + wait_ms;
        match tokio::time::timeout(
            Duration::from_millis(wait_ms + 500),
            self.cx.scheduler.lease(worker, max, deadline),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable("the loop did not answer".into())),
        }
    }

    pub async fn heartbeat(
        &self,
        worker: WorkerInfo,
        leases: Vec<HeldLease>,
    ) -> Result<HeartbeatReply, Error> {
        self.ready()?;
        let now = self.cx.clock.now();
        let sched = &self.cx.scheduler;
        let (reply, wrong) = self
            .cx
            .sm
            .read(|s| {
                let reply = sched.core().heartbeat(now, s, &worker, &leases);
                // Assertion: a lease is extended only while the state holds it, under that
                // token, for that worker.
                let wrong: Vec<String> = leases
                    .iter()
                    .zip(&reply.verdicts)
                    .filter(|(l, v)| {
                        **v == fleet::rpc::LeaseVerdict::Extended
                            && !s.task(l.task).is_some_and(|t| {
                                t.lease.as_ref().is_some_and(|x| {
                                    x.fencing_token == l.fencing_token && x.worker == worker.id
                                })
                            })
                    })
                    .map(|(l, _)| {
                        format!(
                            "[lease-extended-after-expiry] task {}: replica {} extended token {} \
                             for worker {} although the state no longer holds that lease",
                            l.task, self.id, l.fencing_token, worker.id.0
                        )
                    })
                    .collect();
                (reply, wrong)
            })
            .await;
        self.violations.lock().expect("violations").extend(wrong);
        Ok(reply)
    }

    pub async fn report(
        &self,
        reports: Vec<AttemptReport>,
    ) -> Result<Vec<Result<TaskState, Error>>, Error> {
        self.ready()?;
        let commands = reports
            .iter()
            .map(|r| Command::Complete {
                task: r.task,
                fencing_token: r.fencing_token,
                outcome: r.outcome.clone(),
                output_tail: r.output_tail.clone(),
                retry_jitter_permille: self.cx.random.range(0..=1000),
            })
            .collect();
        let outputs = self.cx.proposer.propose_many(commands).await;
        if let Some(Err(e)) = outputs
            .iter()
            .find(|r| matches!(r, Err(e) if e.is_retryable()))
        {
            return Err(e.clone());
        }
        fleet::scheduler::scheduling_loop::sync_tracker(
            &self.cx.sm,
            &self.cx.scheduler,
            &self.cx.clock,
        )
        .await;
        Ok(outputs
            .into_iter()
            .map(|o| match o {
                Ok(CommandOutput::TaskUpdated { state, .. }) => Ok(state),
                Ok(other) => Err(Error::Internal(format!("{other:?}"))),
                Err(e) => Err(e),
            })
            .collect())
    }

    /// A worker leaving: every lease the state holds for it is handed back (expired), as
    /// `server::worker_calls::worker_leave` does. Returns how many were handed back.
    pub async fn leave(&self, worker: WorkerId) -> Result<u32, Error> {
        self.ready()?;
        let commands = self
            .cx
            .sm
            .read(|s| {
                self.cx
                    .random
                    .with(|r| fleet::scheduler::core::hand_back(s, worker, r))
            })
            .await;
        let outputs = self.cx.proposer.propose_many(commands).await;
        if let Some(Err(e)) = outputs.iter().find(|r| r.is_err()) {
            if e.is_retryable() {
                return Err(e.clone());
            }
        }
        let now = self.cx.clock.now();
        self.cx
            .sm
            .read(|s| self.cx.scheduler.core().worker_left(worker, now, s))
            .await;
        Ok(outputs.iter().filter(|r| r.is_ok()).count() as u32)
    }

    /// `fleet task requeue` at the leader, as `server::service`'s `requeue_task` does: an
    /// expiry of the attempt the operator named by its fencing token, then the tracker sync
    /// that makes the worker's next heartbeat "fenced".
    pub async fn requeue(&self, task: TaskId, fencing_token: u64) -> Result<TaskState, Error> {
        let (_, leader) = self.leadership();
        if leader != Some(self.id) {
            return Err(self.not_leader());
        }
        let command = self
            .cx
            .random
            .with(|r| fleet::scheduler::core::requeue(task, fencing_token, r));
        let output = self.cx.proposer.propose(command).await;
        fleet::scheduler::scheduling_loop::sync_tracker(
            &self.cx.sm,
            &self.cx.scheduler,
            &self.cx.clock,
        )
        .await;
        match output? {
            CommandOutput::TaskUpdated { state, .. } => Ok(state),
            other => Err(Error::Internal(format!("{other:?}"))),
        }
    }

    /// A client's command, at the leader (no forwarding: the client follows the hint).
    pub async fn propose(&self, command: Command) -> Result<CommandOutput, Error> {
        let (_, leader) = self.leadership();
        if leader != Some(self.id) {
            return Err(self.not_leader());
        }
        self.cx.proposer.propose(command).await
    }

    /// A linearizable read of the state, at the leader.
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, Error> {
        self.raft
            .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        Ok(self.cx.sm.read(f).await)
    }

    /// The applied index and the state's bytes (to compare replicas after the run).
    pub async fn applied(&self) -> (u64, Vec<u8>) {
        let index = self.cx.sm.applied_index().await;
        let bytes = self
            .cx
            .sm
            .read(|s| fleet::raft::state_machine_store::encode_state(s).expect("encodes"))
            .await;
        (index, bytes)
    }
}

/// The members of a fresh cluster of `n` replicas.
pub fn members(n: u64) -> BTreeMap<NodeId, fleet::raft::Node> {
    (1..=n)
        .map(|id| {
            (
                id,
                fleet::raft::Node {
                    addr: format!("sim-{id}"),
                },
            )
        })
        .collect()
}
