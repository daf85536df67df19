//! Placement: which pool serves a request. A pure function of the ranked
//! candidates and each pool's status, so that it is tested and benchmarked
//! without sockets, and costs nothing to call per request.
//!
//! For each candidate the expected time to first byte from this edge is
//! `rtt + wait`, where `wait` is 0 with a free slot, a queue estimate when
//! the pool is warm but full, the remaining wake time while it wakes, and
//! its expected wake time when it is cold. The lowest wins; ties go to the
//! nearer pool.

use stoke_config::{Candidate, PoolId};

/// What placement needs to know of one pool at the moment of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// Expected wait before the pool can start the request, in
    /// microseconds; `None` if the pool can take no request now and cannot
    /// hold one (down, or its queue is full).
    pub wait_us: Option<u32>,
    /// Whether a ready replica has a free slot (so `wait_us` is 0).
    pub free_slot: bool,
    /// Whether the pool is asleep (scaled to zero, not waking).
    pub cold: bool,
}

impl PoolStatus {
    /// A warm pool with a free slot.
    pub const FREE: PoolStatus = PoolStatus { wait_us: Some(0), free_slot: true, cold: false };
    /// A pool that can take nothing.
    pub const UNAVAILABLE: PoolStatus = PoolStatus { wait_us: None, free_slot: false, cold: false };
}

/// The decision for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forward now to this pool (it has a free slot).
    Forward {
        /// The pool.
        pool: PoolId,
    },
    /// Hold the request for this pool: it is full, waking or cold, and
    /// still the fastest way to a first byte.
    Hold {
        /// The pool.
        pool: PoolId,
        /// Expected wait, microseconds.
        eta_us: u32,
    },
    /// No pool can take or hold the request.
    NoCapacity,
}

/// A decision and what it learned on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// What to do with the request.
    pub decision: Decision,
    /// The nearest cold pool that is nearer than the chosen one: it lost
    /// only because it sleeps. Repeated demand for it is the signal to wake
    /// it ("route away, then warm").
    pub passed_over_cold: Option<PoolId>,
}

/// Choose among `candidates` (ranked nearest first) given each pool's
/// status.
#[inline]
pub fn place(candidates: &[Candidate], mut status: impl FnMut(PoolId) -> PoolStatus) -> Placement {
    let mut best: Option<(u64, Candidate, PoolStatus)> = None;
    let mut nearest_cold: Option<Candidate> = None;
    for &c in candidates {
        // Candidates are ranked by RTT and a wait is never negative: once
        // the RTT alone reaches the best cost, no later candidate can win
        // (and no later cold pool is nearer than the chosen one).
        if best.is_some_and(|(b, _, _)| u64::from(c.rtt_us) >= b) {
            break;
        }
        let s = status(c.pool);
        if s.cold && nearest_cold.is_none() {
            nearest_cold = Some(c);
        }
        let Some(wait) = s.wait_us else { continue };
        let cost = u64::from(c.rtt_us) + u64::from(wait);
        if best.is_none_or(|(b, _, _)| cost < b) {
            best = Some((cost, c, s));
        }
    }
    let decision = match best {
        Some((_, c, s)) if s.free_slot => Decision::Forward { pool: c.pool },
        Some((cost, c, _)) => Decision::Hold { pool: c.pool, eta_us: (cost - u64::from(c.rtt_us)) as u32 },
        None => Decision::NoCapacity,
    };
    let chosen_rtt = best.map(|(_, c, _)| c.rtt_us);
    let passed_over_cold = match (nearest_cold, chosen_rtt) {
        (Some(cold), Some(rtt)) if cold.rtt_us < rtt => Some(cold.pool),
        (Some(cold), None) => Some(cold.pool),
        _ => None,
    };
    Placement { decision, passed_over_cold }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(rtts: &[u32]) -> Vec<Candidate> {
        rtts.iter().enumerate().map(|(i, &rtt_us)| Candidate { pool: PoolId(i as u32), rtt_us }).collect()
    }

    fn full(queue_us: u32) -> PoolStatus {
        PoolStatus { wait_us: Some(queue_us), free_slot: false, cold: false }
    }

    fn cold(wake_us: u32) -> PoolStatus {
        PoolStatus { wait_us: Some(wake_us), free_slot: false, cold: true }
    }

    #[test]
    fn nearest_free_pool_wins() {
        let c = cands(&[0, 9_000, 150_000]);
        let p = place(&c, |_| PoolStatus::FREE);
        assert_eq!(p.decision, Decision::Forward { pool: PoolId(0) });
        assert_eq!(p.passed_over_cold, None);
    }

    #[test]
    fn full_or_down_pools_are_passed_over() {
        let c = cands(&[0, 9_000, 150_000]);
        let s = [PoolStatus::UNAVAILABLE, full(1_000_000), PoolStatus::FREE];
        let p = place(&c, |id| s[id.index()]);
        assert_eq!(p.decision, Decision::Forward { pool: PoolId(2) });
    }

    #[test]
    fn a_short_queue_nearby_beats_a_far_free_pool() {
        let c = cands(&[0, 150_000]);
        let s = [full(20_000), PoolStatus::FREE];
        let p = place(&c, |id| s[id.index()]);
        assert_eq!(p.decision, Decision::Hold { pool: PoolId(0), eta_us: 20_000 });
    }

    #[test]
    fn cold_near_pool_loses_to_warm_far_pool_and_is_reported() {
        // Paris cold (wake 25 s), Frankfurt warm 9 ms away.
        let c = cands(&[0, 9_000]);
        let s = [cold(25_000_000), PoolStatus::FREE];
        let p = place(&c, |id| s[id.index()]);
        assert_eq!(p.decision, Decision::Forward { pool: PoolId(1) });
        assert_eq!(p.passed_over_cold, Some(PoolId(0)));
    }

    #[test]
    fn cold_near_pool_wins_when_the_alternative_is_slower() {
        // Sydney: local pool wakes in 300 ms; Singapore is 92 ms away but full
        // with a 2 s queue.
        let c = cands(&[0, 92_000]);
        let s = [cold(300_000), full(2_000_000)];
        let p = place(&c, |id| s[id.index()]);
        assert_eq!(p.decision, Decision::Hold { pool: PoolId(0), eta_us: 300_000 });
        assert_eq!(p.passed_over_cold, None);
    }

    #[test]
    fn nothing_available() {
        let c = cands(&[0, 10]);
        let p = place(&c, |_| PoolStatus::UNAVAILABLE);
        assert_eq!(p.decision, Decision::NoCapacity);
        assert_eq!(place(&[], |_| PoolStatus::FREE).decision, Decision::NoCapacity);
    }

    #[test]
    fn ties_go_to_the_nearer_pool() {
        let c = cands(&[1_000, 1_000]);
        let p = place(&c, |_| PoolStatus::FREE);
        assert_eq!(p.decision, Decision::Forward { pool: PoolId(0) });
    }
}
