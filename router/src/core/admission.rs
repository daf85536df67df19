//! Admission: what happens to a request once placement has chosen — forward
//! it now, hold it with an ETA, or refuse it with a reason — and when a held
//! request's time is up. Pure: the shell ([`crate::proxy::admit`]) takes
//! slots, holds tickets and starts wakes as this says.

use std::time::{Duration, Instant};

use stoke_config::PoolId;

use super::placement::{Decision, PoolStatus};

/// `Retry-After` when no pool has capacity and nothing better is known.
pub const NO_CAPACITY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How many times a request decides again when another request took the
/// slot it was placed on, before it waits in that pool's queue instead.
pub const MAX_OVERTAKEN: u32 = 3;

/// What to do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Take a slot on this pool now.
    Forward {
        /// The pool.
        pool: PoolId,
    },
    /// Hold the request in this pool's queue; it is expected to wait `eta`.
    Hold {
        /// The pool.
        pool: PoolId,
        /// Expected wait.
        eta: Duration,
    },
    /// Answer at once.
    Refuse(Refusal),
}

/// Why a request is refused before it is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No pool can take or hold it.
    NoCapacity,
    /// The fastest pool would make it wait longer than it may.
    WaitExceedsDeadline {
        /// The pool.
        pool: PoolId,
        /// Its expected wait.
        eta: Duration,
        /// What the request had left.
        left: Duration,
    },
}

impl Refusal {
    /// When the client may try again.
    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::NoCapacity => NO_CAPACITY_RETRY_AFTER,
            Refusal::WaitExceedsDeadline { eta, .. } => *eta,
        }
    }
}

/// The latest a request started at `started` may be held, for a wait of
/// `max_wait` (saturating: a huge wait is no deadline, never an overflow).
pub fn deadline(started: Instant, max_wait: Duration) -> Instant {
    started.checked_add(max_wait).unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Admit a request placed as `decision` at `now`, with `deadline`.
pub fn admit(decision: Decision, now: Instant, deadline: Instant) -> Admission {
    match decision {
        Decision::Forward { pool } => Admission::Forward { pool },
        Decision::Hold { pool, eta_us } => hold(pool, Duration::from_micros(u64::from(eta_us)), now, deadline),
        Decision::NoCapacity => Admission::Refuse(Refusal::NoCapacity),
    }
}

/// Hold for `pool` with `eta`, unless the deadline is nearer than that: a
/// request that cannot be served in time is told so at once, not after
/// waiting for nothing.
pub fn hold(pool: PoolId, eta: Duration, now: Instant, deadline: Instant) -> Admission {
    let left = deadline.saturating_duration_since(now);
    if eta > left {
        Admission::Refuse(Refusal::WaitExceedsDeadline { pool, eta, left })
    } else {
        Admission::Hold { pool, eta }
    }
}

/// Whether the pool a request is held for must be woken: it has no ready
/// replica, and it scales to zero.
pub fn needs_wake(warm: bool, scales: bool) -> bool {
    !warm && scales
}

/// `Retry-After` for a request whose deadline passed while held: what the
/// pool still expects to make a request wait, and at least a second.
pub fn retry_after_timeout(status: PoolStatus) -> Duration {
    Duration::from_micros(u64::from(status.wait_us.unwrap_or(0))).max(NO_CAPACITY_RETRY_AFTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const P: PoolId = PoolId(3);

    #[test]
    fn free_pools_forward_and_nothing_refuses() {
        let now = Instant::now();
        assert_eq!(admit(Decision::Forward { pool: P }, now, now + S), Admission::Forward { pool: P });
        assert_eq!(admit(Decision::NoCapacity, now, now + S), Admission::Refuse(Refusal::NoCapacity));
        assert_eq!(Refusal::NoCapacity.retry_after(), NO_CAPACITY_RETRY_AFTER);
    }

    #[test]
    fn a_wait_that_fits_the_deadline_is_held() {
        let t0 = Instant::now();
        let d = deadline(t0, 30 * S);
        let a = admit(Decision::Hold { pool: P, eta_us: 20_000_000 }, t0, d);
        assert_eq!(a, Admission::Hold { pool: P, eta: 20 * S });
        // 15 s later the same wake no longer fits what is left.
        let a = admit(Decision::Hold { pool: P, eta_us: 20_000_000 }, t0 + 15 * S, d);
        assert_eq!(a, Admission::Refuse(Refusal::WaitExceedsDeadline { pool: P, eta: 20 * S, left: 15 * S }));
        let Admission::Refuse(r) = a else { unreachable!() };
        assert_eq!(r.retry_after(), 20 * S, "retry once the pool should be awake");
    }

    #[test]
    fn a_zero_wait_deadline_holds_only_what_is_immediate() {
        let t0 = Instant::now();
        assert_eq!(hold(P, Duration::ZERO, t0, t0), Admission::Hold { pool: P, eta: Duration::ZERO });
        assert!(matches!(hold(P, Duration::from_micros(1), t0, t0), Admission::Refuse(_)));
    }

    #[test]
    fn deadlines_never_overflow() {
        let t0 = Instant::now();
        assert!(deadline(t0, Duration::MAX) > t0 + 365 * 24 * 3600 * S);
        assert_eq!(deadline(t0, 5 * S), t0 + 5 * S);
    }

    #[test]
    fn only_cold_scaling_pools_are_woken() {
        assert!(needs_wake(false, true));
        assert!(!needs_wake(true, true));
        assert!(!needs_wake(false, false));
    }

    #[test]
    fn a_timed_out_hold_retries_after_the_pools_wait() {
        let s = PoolStatus { wait_us: Some(12_000_000), free_slot: false, cold: false };
        assert_eq!(retry_after_timeout(s), 12 * S);
        assert_eq!(retry_after_timeout(PoolStatus::UNAVAILABLE), NO_CAPACITY_RETRY_AFTER);
        assert_eq!(retry_after_timeout(PoolStatus::FREE), NO_CAPACITY_RETRY_AFTER);
    }
}
