//! The scheduler core driven directly: no runtime, no process, a real [`State`] applying the
//! commands the core decides. Scripted scenarios print a trace compared with a golden text
//! (`UPDATE_EXPECT=1 cargo test --lib scheduler::core` rewrites them after a deliberate change).

use std::fmt::Write as _;

use expect_test::{expect, Expect};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::state::testing::Applier;
use crate::state::{RequestId, TaskSpec};

const GRACE: u64 = 5_000;
const VISIBILITY: u64 = 3_000;
const LIVENESS: u64 = 10_000;

fn cfg() -> CoreConfig {
    CoreConfig {
        tick_ms: 100,
        liveness_ms: LIVENESS,
        failover_grace_ms: GRACE,
        retention_ms: 60_000,
        forget_after_ms: 600_000,
        max_per_request: 4,
        queue_limits: BTreeMap::new(),
        bugs: Bugs::default(),
    }
}

fn worker(id: u64) -> WorkerInfo {
    WorkerInfo {
        id: WorkerId(id),
        name: format!("w{id}"),
        queues: vec!["default".into()],
        slots: 4,
        running: 0,
        draining: false,
    }
}

/// One leader: the core, its state, its clocks, and a trace of what it decided.
struct Leader {
    core: SchedulerCore,
    sm: Applier,
    mono: u64,
    wall: u64,
    rng: StdRng,
    next_poll: PollId,
    next_request: u128,
    trace: String,
}

impl Leader {
    /// A leader that started term 1 at mono 0 (its grace period ends at `GRACE`).
    fn new(cfg: CoreConfig) -> Leader {
        let mut l = Leader {
            core: SchedulerCore::new(cfg),
            sm: Applier::default(),
            mono: 0,
            wall: 1_000_000,
            rng: StdRng::seed_from_u64(7),
            next_poll: 1,
            next_request: 1,
            trace: String::new(),
        };
        let now = l.now();
        l.core.start_term(1, now, &l.sm.state);
        l
    }

    fn now(&self) -> Now {
        Now::at(self.mono, self.wall)
    }

    fn advance(&mut self, ms: u64) {
        self.mono += ms;
        self.wall += ms;
    }

    fn submit(&mut self, queue: &str) -> TaskId {
        let mut spec = TaskSpec::new(vec!["true".into()], queue);
        spec.visibility_timeout_ms = VISIBILITY;
        let rid = self.next_request;
        self.next_request += 1;
        match self.sm.one(
            self.wall,
            Command::SubmitTask {
                request_id: RequestId(rid),
                spec,
            },
        ) {
            Ok(CommandOutput::TaskSubmitted { id, .. }) => id,
            other => panic!("submit: {other:?}"),
        }
    }

    /// Applies commands as the proposer would (one entry each), returning their outputs.
    fn apply(&mut self, commands: Vec<Command>) -> Vec<Result<CommandOutput, Error>> {
        commands
            .into_iter()
            .map(|c| self.sm.one(self.wall, c).map_err(Error::from))
            .collect()
    }

    fn poll(&mut self, w: WorkerInfo, max: u32, wait_ms: u64) -> PollId {
        let id = self.next_poll;
        self.next_poll += 1;
        let now = self.now();
        self.core.poll(
            PollRequest {
                id,
                worker: w,
                max,
                deadline_ms: now.mono_ms + wait_ms,
            },
            now,
        );
        id
    }

    fn heartbeat(&mut self, w: &WorkerInfo, held: &[(TaskId, u64)]) -> HeartbeatReply {
        let leases: Vec<HeldLease> = held
            .iter()
            .map(|(task, fencing_token)| HeldLease {
                task: *task,
                fencing_token: *fencing_token,
            })
            .collect();
        let now = self.now();
        let reply = self.core.heartbeat(now, &self.sm.state, w, &leases);
        let _ = writeln!(
            self.trace,
            "{:06} heartbeat w{} {:?} -> {:?} adopt {:?}",
            self.mono,
            w.id.0,
            held.iter().map(|(t, k)| (t.0, *k)).collect::<Vec<_>>(),
            reply.verdicts,
            reply
                .adopt
                .iter()
                .map(|a| (a.task.0, a.fencing_token))
                .collect::<Vec<_>>()
        );
        reply
    }

    /// One iteration of the loop, as the shell runs it: the tick (expiries and purge, proposed
    /// and handed back), then the grants. Returns the replies, in the order sent.
    fn iterate(&mut self) -> Vec<Reply> {
        let now = self.now();
        let mut replies = Vec::new();
        if let Some(work) = self.core.tick(now, &self.sm.state, &mut self.rng) {
            for (e, c) in work.expiries.iter().zip(&work.expire) {
                let Command::ExpireLease { fencing_token, .. } = c else {
                    panic!("{c:?}")
                };
                let _ = writeln!(
                    self.trace,
                    "{:06} expire task {} token {fencing_token} ({}: {})",
                    self.mono, e.task.0, e.cause, e.reason
                );
            }
            let outputs = self.apply(work.expire);
            let (r, silenced) =
                self.core
                    .expiries_applied(now, &self.sm.state, &work.expiries, &outputs);
            if !silenced.is_empty() {
                let _ = writeln!(
                    self.trace,
                    "{:06} silenced {:?}",
                    self.mono,
                    silenced.iter().map(|w| w.0).collect::<Vec<_>>()
                );
            }
            replies.extend(r);
            if let Some(p) = work.purge {
                let out = self.apply(vec![p]);
                let _ = writeln!(self.trace, "{:06} purge -> {:?}", self.mono, out[0]);
            }
        }
        let (plan, r) = self.core.plan_grants(now, &self.sm.state);
        replies.extend(r);
        for c in &plan.commands {
            if let Command::GrantLeasesTo { worker, tasks, .. } = c {
                let _ = writeln!(
                    self.trace,
                    "{:06} grant w{} {:?}",
                    self.mono,
                    worker.0,
                    tasks.iter().map(|t| t.0).collect::<Vec<_>>()
                );
            }
        }
        let outputs = self.apply(plan.commands.clone());
        let outcome = self.core.grants_applied(now, &self.sm.state, plan, outputs);
        replies.extend(outcome.replies);
        for r in &replies {
            let _ = writeln!(self.trace, "{:06} reply {}", self.mono, show(r));
        }
        replies
    }
}

fn show(r: &Reply) -> String {
    match &r.result {
        Ok(leased) => format!(
            "poll {} <- {:?}",
            r.poll,
            leased
                .iter()
                .map(|l| (l.task.0, l.attempt, l.fencing_token))
                .collect::<Vec<_>>()
        ),
        Err(e) => format!("poll {} <- error: {e}", r.poll),
    }
}

fn check(trace: &str, golden: Expect) {
    golden.assert_eq(trace);
}

/// The life of a lease in one golden trace: a request waits for work, gets a task when one is
/// submitted, the lease is extended by heartbeats, expires when they stop (first the visibility
/// timeout, then the worker's liveness), the silent worker gets nothing until it heartbeats
/// again, and its stale heartbeat is fenced.
#[test]
fn a_lease_from_request_to_expiry_golden() {
    let mut l = Leader::new(cfg());
    let w1 = worker(1);
    l.poll(w1.clone(), 1, 30_000);
    l.iterate(); // nothing ready: waits
    let t = l.submit("default");
    l.advance(10);
    let replies = l.iterate();
    let token = replies[0].result.as_ref().unwrap()[0].fencing_token;
    // Heartbeats through the grace period and past it keep it alive.
    for _ in 0..3 {
        l.advance(2_000);
        l.heartbeat(&w1, &[(t, token)]);
        l.iterate();
    }
    // Silence: after the visibility timeout (the grace period is over) it expires.
    l.advance(3_000);
    l.iterate();
    // The silenced worker's new request waits; it is answered empty at its deadline.
    l.poll(w1.clone(), 1, 500);
    l.iterate();
    l.advance(500);
    l.iterate();
    // Its late heartbeat for the old token is fenced, and unsilences it: it gets the retry.
    l.heartbeat(&w1, &[(t, token)]);
    l.advance(5_000); // the retry's backoff
    l.poll(w1.clone(), 1, 30_000);
    l.iterate();
    check(
        &l.trace,
        expect![[r#"
            000010 grant w1 [1]
            000010 reply poll 1 <- [(1, 1, 1)]
            002010 heartbeat w1 [(1, 1)] -> [Extended] adopt []
            004010 heartbeat w1 [(1, 1)] -> [Extended] adopt []
            006010 heartbeat w1 [(1, 1)] -> [Extended] adopt []
            009010 expire task 1 token 1 (visibility_timeout: no heartbeat for 3000 ms (visibility timeout 3000 ms))
            009010 silenced [1]
            009510 reply poll 2 <- []
            009510 heartbeat w1 [(1, 1)] -> [Fenced] adopt []
            014510 grant w1 [1]
            014510 reply poll 3 <- [(1, 2, 2)]
        "#]],
    );
}

/// After a leader change the new leader's core honours every lease for the grace period, then
/// expires the leases of a worker that never heartbeated, for worker loss (the liveness timeout
/// is the shorter here), counted from the end of the grace period.
#[test]
fn a_new_term_honours_leases_for_the_grace_period_golden() {
    let mut c = cfg();
    c.liveness_ms = 2_000;
    let mut l = Leader::new(c);
    let w1 = worker(1);
    let a = l.submit("default");
    let b = l.submit("default");
    l.poll(w1.clone(), 2, 30_000);
    l.iterate();
    // A new term at mono 20,000 (another replica's core, the same state).
    l.advance(20_000);
    let now = l.now();
    l.core.start_term(2, now, &l.sm.state);
    // Every lease's window starts when the grace period ends: the worker is lost 2 s later.
    l.advance(GRACE + 2_000 - 1);
    l.iterate();
    assert!(l.sm.state.task(a).unwrap().lease.is_some(), "not yet");
    l.advance(cfg().tick_ms); // the next tick
    l.iterate();
    assert!(l.sm.state.task(a).unwrap().lease.is_none());
    assert!(l.sm.state.task(b).unwrap().lease.is_none());
    check(
        &l.trace,
        expect![[r#"
            000000 grant w1 [1, 2]
            000000 reply poll 1 <- [(1, 1, 1), (2, 1, 2)]
            027099 expire task 1 token 1 (worker_lost: worker 1 lost: no heartbeat for 2099 ms)
            027099 expire task 2 token 2 (worker_lost: worker 1 lost: no heartbeat for 2099 ms)
            027099 silenced [1]
        "#]],
    );
}

#[test]
fn a_request_waits_for_work_and_is_answered_empty_at_its_deadline() {
    let mut l = Leader::new(cfg());
    let p = l.poll(worker(1), 1, 1_000);
    assert!(l.iterate().is_empty());
    assert_eq!(l.core.waiting(), 1);
    assert_eq!(l.core.next_wake_ms(), 1_000.min(cfg().tick_ms));
    l.advance(1_000);
    let r = l.iterate();
    assert_eq!(r, vec![Reply::empty(p)]);
    assert_eq!(l.core.waiting(), 0);
}

#[test]
fn requests_share_one_picker_and_respect_the_per_request_bound() {
    let mut c = cfg();
    c.max_per_request = 2;
    let mut l = Leader::new(c);
    for _ in 0..5 {
        l.submit("default");
    }
    let p1 = l.poll(worker(1), 10, 1_000);
    let p2 = l.poll(worker(2), 10, 1_000);
    let p3 = l.poll(worker(3), 10, 1_000);
    let r = l.iterate();
    let got = |p: PollId| {
        r.iter()
            .find(|x| x.poll == p)
            .map(|x| x.result.as_ref().unwrap().len())
    };
    assert_eq!((got(p1), got(p2), got(p3)), (Some(2), Some(2), Some(1)));
    // Every task leased once.
    assert_eq!(l.sm.state.leases().count(), 5);
}

#[test]
fn a_queue_limit_holds_across_requests() {
    let mut c = cfg();
    c.queue_limits.insert("default".into(), 1);
    let mut l = Leader::new(c);
    l.submit("default");
    l.submit("default");
    l.poll(worker(1), 2, 1_000);
    l.poll(worker(2), 2, 1_000);
    let r = l.iterate();
    let leased: usize = r.iter().map(|x| x.result.as_ref().unwrap().len()).sum();
    assert_eq!(leased, 1, "max_running 1: {r:?}");
    assert_eq!(l.core.waiting(), 1, "the other request waits");
}

#[test]
fn a_draining_worker_is_answered_empty_and_its_undelivered_leases_are_handed_back() {
    let mut l = Leader::new(cfg());
    let t = l.submit("default");
    let mut w = worker(1);
    w.draining = true;
    let p = l.poll(w.clone(), 1, 10_000);
    assert_eq!(l.iterate(), vec![Reply::empty(p)]);
    assert!(l.sm.state.task(t).unwrap().lease.is_none());
    // A grant whose reply could not be delivered: a live worker adopts it later...
    let grant = LeaseGrant {
        task: t,
        attempt: 1,
        fencing_token: 9,
        granted_at_ms: 0,
    };
    assert!(l
        .core
        .undelivered(WorkerId(2), std::slice::from_ref(&grant), &mut l.rng)
        .is_empty());
    // ...a draining one never will: expire it now.
    let expire = l.core.undelivered(WorkerId(1), &[grant], &mut l.rng);
    assert!(
        matches!(&expire[..], [Command::ExpireLease { task, fencing_token: 9, .. }] if *task == t)
    );
}

#[test]
fn a_leaving_worker_hands_back_its_own_leases_under_their_tokens() {
    let mut l = Leader::new(cfg());
    for _ in 0..3 {
        l.submit("default");
    }
    l.advance(GRACE);
    let p1 = l.poll(worker(1), 2, 10_000);
    let replies = l.iterate();
    let p2 = l.poll(worker(2), 1, 10_000);
    let replies: Vec<Reply> = replies.into_iter().chain(l.iterate()).collect();
    let leased = |p: PollId| -> Vec<(TaskId, u64)> {
        let r = replies.iter().find(|r| r.poll == p).expect("answered");
        let leases = r.result.as_ref().expect("granted");
        leases.iter().map(|x| (x.task, x.fencing_token)).collect()
    };
    let (mut w1, w2) = (leased(p1), leased(p2));
    w1.sort();
    assert_eq!((w1.len(), w2.len()), (2, 1), "{replies:?}");
    let back = hand_back(&l.sm.state, WorkerId(1), &mut l.rng);
    let mut expired: Vec<(TaskId, u64)> = back
        .iter()
        .map(|c| match c {
            Command::ExpireLease {
                task,
                fencing_token,
                reason,
                ..
            } => {
                assert_eq!(reason, "handed back by worker 1 on shutdown");
                (*task, *fencing_token)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    expired.sort();
    assert_eq!(expired, w1);
    assert!(!expired.iter().any(|(t, _)| w2[0].0 == *t));
    // Applied, only worker 1's tasks are ready again; worker 2 keeps its lease.
    assert!(l.apply(back).iter().all(Result::is_ok));
    assert_eq!(l.sm.state.leases().count(), 1);
    assert!(hand_back(&l.sm.state, WorkerId(1), &mut l.rng).is_empty());
}

/// Between deciding an expiry and its apply, a heartbeat neither extends the lease nor offers
/// it for adoption (the simulator's seed 90811: an adopted lease ended moments later while a
/// short attempt ran to its end); after the apply, the worker is fenced as usual.
#[test]
fn a_lease_whose_expiry_is_being_proposed_is_fenced_and_not_offered() {
    for bug in [false, true] {
        let mut c = cfg();
        c.bugs.heartbeat_ignores_pending_expiry = bug;
        let mut l = Leader::new(c);
        let w1 = worker(1);
        let t = l.submit("default");
        l.advance(GRACE);
        let p = l.poll(w1.clone(), 1, 10_000);
        let replies = l.iterate();
        let r = replies.iter().find(|r| r.poll == p).expect("answered");
        let token = r.result.as_ref().unwrap()[0].fencing_token;
        l.advance(VISIBILITY + 100);
        let now = l.now();
        let work = l.core.tick(now, &l.sm.state, &mut l.rng).expect("due");
        assert_eq!(work.expire.len(), 1, "{work:?}");
        // The expiry is in flight: the state still holds the lease.
        let named = l.heartbeat(&w1, &[(t, token)]);
        let unnamed = l.heartbeat(&w1, &[]);
        if bug {
            assert_eq!(named.verdicts, vec![LeaseVerdict::Extended]);
            assert_eq!(unnamed.adopt.len(), 1);
            continue;
        }
        assert_eq!(named.verdicts, vec![LeaseVerdict::Fenced]);
        assert!(unnamed.adopt.is_empty(), "{unnamed:?}");
        let outputs = l.apply(work.expire);
        let now = l.now();
        l.core
            .expiries_applied(now, &l.sm.state, &work.expiries, &outputs);
        assert_eq!(
            l.heartbeat(&w1, &[(t, token)]).verdicts,
            vec![LeaseVerdict::Fenced]
        );
    }
}

/// `fleet task requeue`: the named attempt ends, its worker is fenced at its next heartbeat,
/// the task is not granted again within one visibility timeout, and the same requeue sent
/// again once the task runs under a newer token changes nothing.
#[test]
fn a_requeue_fences_the_named_attempt_and_holds_the_task_back() {
    let mut l = Leader::new(cfg());
    let (w1, w2) = (worker(1), worker(2));
    let t = l.submit("default");
    l.advance(GRACE);
    let p = l.poll(w1.clone(), 1, 60_000);
    let replies = l.iterate();
    let r = replies.iter().find(|r| r.poll == p).expect("answered");
    let token = r.result.as_ref().unwrap()[0].fencing_token;
    let command = requeue(t, token, &mut l.rng);
    assert!(l.apply(vec![command.clone()])[0].is_ok());
    let now = l.now();
    l.core.sync(now, &l.sm.state);
    assert_eq!(
        l.heartbeat(&w1, &[(t, token)]).verdicts,
        vec![LeaseVerdict::Fenced]
    );
    // Past the retry backoff but within the visibility timeout: nothing for worker 2.
    l.advance(VISIBILITY - 1);
    let p2 = l.poll(w2.clone(), 1, 60_000);
    assert!(l.iterate().iter().all(|r| r.poll != p2));
    l.advance(1);
    let replies = l.iterate();
    let r = replies.iter().find(|r| r.poll == p2).expect("granted now");
    let newer = r.result.as_ref().unwrap()[0].fencing_token;
    assert!(newer > token);
    // The same requeue again: refused by its token; worker 2 keeps the task.
    assert!(matches!(
        &l.apply(vec![command])[0],
        Err(Error::StaleToken(_))
    ));
    assert_eq!(
        l.heartbeat(&w2, &[(t, newer)]).verdicts,
        vec![LeaseVerdict::Extended]
    );
}

#[test]
fn stopping_to_lead_answers_every_request_with_the_error() {
    let mut l = Leader::new(cfg());
    let p1 = l.poll(worker(1), 1, 10_000);
    let p2 = l.poll(worker(2), 1, 10_000);
    let err = Error::NotLeader {
        leader_id: Some(3),
        leader_addr: Some("127.0.0.1:7003".into()),
    };
    let (replies, was) = l.core.stop_leading(l.now(), &err);
    assert!(was);
    assert_eq!(
        replies.iter().map(|r| r.poll).collect::<Vec<_>>(),
        vec![p1, p2]
    );
    assert!(replies.iter().all(|r| r.result == Err(err.clone())));
    assert_eq!(l.core.term(), None);
    let (replies, was) = l.core.stop_leading(l.now(), &err);
    assert!(replies.is_empty() && !was);
}

#[test]
fn hung_up_requests_are_dropped() {
    let mut l = Leader::new(cfg());
    let p1 = l.poll(worker(1), 1, 10_000);
    l.poll(worker(2), 1, 10_000);
    l.core.retain_polls(|id| id != p1);
    assert_eq!(l.core.waiting(), 1);
}

#[test]
fn heartbeat_verdicts_extend_cancel_fence_and_adopt() {
    let mut l = Leader::new(cfg());
    let (w1, w2) = (worker(1), worker(2));
    let a = l.submit("default");
    let b = l.submit("default");
    let c = l.submit("default");
    l.poll(w1.clone(), 3, 1_000);
    let leased = l.iterate()[0].result.clone().unwrap();
    let token = |t: TaskId| leased.iter().find(|x| x.task == t).unwrap().fencing_token;
    l.apply(vec![Command::Cancel { task: b }]);
    // a extended, b cancelled, a stale token fenced, an unknown task fenced; c (not named)
    // is returned to adopt.
    let r = l.heartbeat(
        &w1,
        &[
            (a, token(a)),
            (b, token(b)),
            (a, token(a) + 100),
            (TaskId(99), 1),
        ],
    );
    assert_eq!(
        r.verdicts,
        vec![
            LeaseVerdict::Extended,
            LeaseVerdict::Cancelled,
            LeaseVerdict::Fenced,
            LeaseVerdict::Fenced
        ]
    );
    assert_eq!(r.adopt.iter().map(|x| x.task).collect::<Vec<_>>(), vec![c]);
    // Another worker naming w1's lease is fenced.
    let r = l.heartbeat(&w2, &[(a, token(a))]);
    assert_eq!(r.verdicts, vec![LeaseVerdict::Fenced]);
}

#[test]
fn the_purge_is_proposed_at_most_once_a_second_and_only_when_due() {
    let mut l = Leader::new(cfg());
    let t = l.submit("default");
    l.apply(vec![Command::Cancel { task: t }]);
    let mut rng = StdRng::seed_from_u64(1);
    let work = l.core.tick(l.now(), &l.sm.state, &mut rng).unwrap();
    assert_eq!(work.purge, None, "nothing past retention");
    l.advance(60_000);
    let work = l.core.tick(l.now(), &l.sm.state, &mut rng).unwrap();
    assert!(matches!(work.purge, Some(Command::PurgeFinished { .. })));
    l.advance(500);
    let work = l.core.tick(l.now(), &l.sm.state, &mut rng).unwrap();
    assert_eq!(work.purge, None, "not twice within {PURGE_EVERY_MS} ms");
    assert!(
        l.core.tick(l.now(), &l.sm.state, &mut rng).is_none(),
        "tick not due"
    );
}

#[test]
fn a_grant_error_is_passed_on_and_a_lost_race_waits_again() {
    let mut l = Leader::new(cfg());
    l.submit("default");
    let p1 = l.poll(worker(1), 1, 10_000);
    let now = l.now();
    let (plan, _) = l.core.plan_grants(now, &l.sm.state);
    let err = Error::Unavailable("raft dropped the write".into());
    let out = l
        .core
        .grants_applied(now, &l.sm.state, plan, vec![Err(err.clone())]);
    assert_eq!(
        out.replies,
        vec![Reply {
            poll: p1,
            result: Err(err)
        }]
    );
    // Everything picked was taken meanwhile (an empty grant): the request waits again.
    let p2 = l.poll(worker(2), 1, 10_000);
    let (plan, _) = l.core.plan_grants(now, &l.sm.state);
    let out = l.core.grants_applied(
        now,
        &l.sm.state,
        plan,
        vec![Ok(CommandOutput::LeasesGranted { grants: vec![] })],
    );
    assert!(out.replies.is_empty());
    assert_eq!(l.core.waiting(), 1);
    l.core.retain_polls(|id| id != p2);
}

#[test]
fn the_heartbeat_bug_switch_extends_an_expired_lease() {
    let mut c = cfg();
    c.bugs.heartbeat_extends_expired = true;
    let mut l = Leader::new(c);
    let w1 = worker(1);
    let t = l.submit("default");
    l.poll(w1.clone(), 1, 1_000);
    let token = l.iterate()[0].result.as_ref().unwrap()[0].fencing_token;
    l.advance(GRACE + VISIBILITY);
    l.iterate();
    assert!(l.sm.state.task(t).unwrap().lease.is_none(), "expired");
    let r = l.heartbeat(&w1, &[(t, token)]);
    assert_eq!(r.verdicts, vec![LeaseVerdict::Extended], "the bug");
    l.core.cfg.bugs.heartbeat_extends_expired = false;
    let r = l.heartbeat(&w1, &[(t, token)]);
    assert_eq!(r.verdicts, vec![LeaseVerdict::Fenced], "the fix");
}
