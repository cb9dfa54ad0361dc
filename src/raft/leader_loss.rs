//! Noticing a dead leader at once, instead of after a randomized election timeout.
//!
//! openraft's follower stands for election when it has heard nothing from the leader for the
//! leader lease it granted (`election_timeout_max`) *plus* a randomized election timeout. The
//! lease is needed: no voter may elect anyone else while the leader it acknowledged may still
//! be serving. The random part is there only to keep survivors from campaigning at the same
//! instant and splitting the vote; it cost a `kill -9` of the leader 150-300 ms (0.5-1 s with
//! the previous timing) on top of the lease, and the lease itself was 1 s.
//!
//! When the leader's process dies (crash, `kill -9`, OOM killer), its kernel closes every socket
//! it had, so the follower's inbound Raft connection from the leader ends. That is a strong hint,
//! not a proof: a connection also ends when the leader redials, or a middlebox resets it. On it,
//! a follower stands for election as soon as the lease it granted has run out (counted from
//! the last append it accepted), and survivors go in node-id order, [`STAGGER`] apart, so two
//! followers that saw the same death do not split the vote. Safety is unchanged: the campaign is
//! a pre-vote, which every voter that still hears from the leader refuses (its lease is valid),
//! and which openraft skips locally while this follower's own lease is valid (the leader
//! appended again). A frozen leader (SIGSTOP, a hung host) keeps its sockets open and is found
//! by openraft's election timer, as before.
//!
//! This file holds the decisions, driven by the caller's clock; `server` runs them.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::NodeId;

/// How far apart surviving voters start their campaigns: more than a pre-vote and a vote round
/// trip with the vote's fsync, so the first candidate has usually won before the next starts.
pub const STAGGER: Duration = Duration::from_millis(40);

/// How often a campaign is retried while the leader's lease may still hold on another voter
/// (its last append may have arrived a little later there).
pub const RETRY: Duration = Duration::from_millis(10);

/// What a follower knows about its leader's liveness.
#[derive(Debug, Default)]
pub struct LeaderLoss {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The leader of the last append this replica accepted, and when.
    last_append: Option<(NodeId, Instant)>,
    /// A leader whose connection closed and that has not appended since.
    suspected: Option<NodeId>,
}

/// A campaign to run: stand for election from `at`, while `leader` stays suspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Campaign {
    pub leader: NodeId,
    pub at: Instant,
    /// The last moment worth trying: after it, openraft's own election timer takes over.
    pub until: Instant,
}

impl LeaderLoss {
    /// Records an append accepted from `leader`: it is alive.
    pub fn appended(&self, leader: NodeId, now: Instant) {
        let mut st = self.inner.lock().expect("leader-loss lock");
        st.last_append = Some((leader, now));
        if st.suspected == Some(leader) {
            st.suspected = None;
        }
    }

    /// A replica connection from `from` ended. If `from` is the leader this replica follows, it
    /// is suspected dead and the campaign to run is returned.
    pub fn connection_closed(&self, view: &View, now: Instant) -> Option<Campaign> {
        let mut st = self.inner.lock().expect("leader-loss lock");
        let leader = view.leader?;
        if view.from != leader || leader == view.me || !view.voters.contains(&view.me) {
            return None;
        }
        st.suspected = Some(leader);
        // Without an append from it (this replica just started), count the lease from now.
        let heard = match st.last_append {
            Some((l, at)) if l == leader => at,
            _ => now,
        };
        let at = heard + view.lease + STAGGER * rank(view.me, leader, &view.voters) as u32;
        Some(Campaign {
            leader,
            at: at.max(now),
            until: heard + view.lease + view.election_timeout_min,
        })
    }

    /// Whether `leader` is suspected dead (its connection closed and it has not appended since).
    pub fn is_suspected(&self, leader: NodeId) -> bool {
        self.inner.lock().expect("leader-loss lock").suspected == Some(leader)
    }
}

/// What the caller saw when a connection ended.
#[derive(Debug, Clone)]
pub struct View {
    pub me: NodeId,
    /// The node whose connection ended (from its handshake).
    pub from: NodeId,
    /// The leader this replica follows now, if any.
    pub leader: Option<NodeId>,
    pub voters: Vec<NodeId>,
    /// The leader lease a follower grants (openraft: `election_timeout_max`).
    pub lease: Duration,
    pub election_timeout_min: Duration,
}

/// This replica's place among the voters that survive `leader`, in node-id order.
pub fn rank(me: NodeId, leader: NodeId, voters: &[NodeId]) -> usize {
    voters.iter().filter(|&&v| v != leader && v < me).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(300);
    const MIN: Duration = Duration::from_millis(150);

    fn view(me: NodeId, from: NodeId, leader: Option<NodeId>) -> View {
        View {
            me,
            from,
            leader,
            voters: vec![1, 2, 3],
            lease: LEASE,
            election_timeout_min: MIN,
        }
    }

    #[test]
    fn a_closed_leader_connection_starts_a_campaign_when_the_lease_ends() {
        let t0 = Instant::now();
        let l = LeaderLoss::default();
        l.appended(1, t0);
        let c = l
            .connection_closed(&view(2, 1, Some(1)), t0 + Duration::from_millis(5))
            .expect("campaign");
        assert_eq!(c.leader, 1);
        assert_eq!(c.at, t0 + LEASE, "node 2 is the first survivor: no stagger");
        assert_eq!(c.until, t0 + LEASE + MIN);
        assert!(l.is_suspected(1));
        // Node 3 goes one stagger later.
        let l3 = LeaderLoss::default();
        l3.appended(1, t0);
        let c3 = l3.connection_closed(&view(3, 1, Some(1)), t0).unwrap();
        assert_eq!(c3.at, t0 + LEASE + STAGGER);
    }

    #[test]
    fn an_append_clears_the_suspicion() {
        let t0 = Instant::now();
        let l = LeaderLoss::default();
        l.appended(1, t0);
        l.connection_closed(&view(2, 1, Some(1)), t0).unwrap();
        l.appended(1, t0 + Duration::from_millis(50));
        assert!(
            !l.is_suspected(1),
            "the leader redialled and appended: alive"
        );
    }

    #[test]
    fn other_connections_start_nothing() {
        let t0 = Instant::now();
        let l = LeaderLoss::default();
        assert_eq!(
            l.connection_closed(&view(2, 3, Some(1)), t0),
            None,
            "not the leader"
        );
        assert_eq!(
            l.connection_closed(&view(2, 1, None), t0),
            None,
            "no leader"
        );
        assert_eq!(
            l.connection_closed(&view(1, 1, Some(1)), t0),
            None,
            "itself"
        );
        let mut learner = view(4, 1, Some(1));
        learner.voters = vec![1, 2, 3];
        assert_eq!(
            l.connection_closed(&learner, t0),
            None,
            "a learner cannot campaign"
        );
        assert!(!l.is_suspected(1));
    }

    #[test]
    fn without_an_append_the_lease_counts_from_the_close() {
        let t0 = Instant::now();
        let l = LeaderLoss::default();
        l.appended(3, t0); // an earlier leader
        let c = l.connection_closed(&view(2, 1, Some(1)), t0).unwrap();
        assert_eq!(c.at, t0 + LEASE);
    }

    #[test]
    fn survivors_are_ranked_by_node_id_without_the_leader() {
        assert_eq!(rank(2, 1, &[1, 2, 3]), 0);
        assert_eq!(rank(3, 1, &[1, 2, 3]), 1);
        assert_eq!(rank(1, 2, &[1, 2, 3]), 0);
        assert_eq!(rank(5, 3, &[1, 2, 3, 4, 5]), 3);
    }
}
