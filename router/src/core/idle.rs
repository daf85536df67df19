//! The idle rule: when a pool that scales to zero may be put to sleep.
//!
//! A pool is idle when it is warm, nothing is in flight on it (streams
//! included), nothing is held for it, no wake is under way, and nothing
//! happened on it — a request starting or ending, or its replicas
//! reporting load — for `idle_timeout`. Only the pool's home edge acts on
//! it, once per idle period (see [`crate::control::sleep`]).

use std::time::{Duration, Instant};

/// What the idle rule needs to know of one pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// Whether a replica is ready (a cold pool has nothing to put to sleep).
    pub warm: bool,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests held.
    pub queued: u32,
    /// Whether a wake is under way.
    pub waking: bool,
    /// When something last happened on the pool.
    pub last_active: Instant,
}

/// Whether the pool is idle at `now`.
pub fn is_idle(a: &Activity, now: Instant, idle_timeout: Duration) -> bool {
    a.warm
        && a.in_flight == 0
        && a.queued == 0
        && !a.waking
        && now.saturating_duration_since(a.last_active) >= idle_timeout
}

/// Longest gap between two calls of a sleep hook that failed.
pub const MAX_SLEEP_RESEND: Duration = Duration::from_secs(60);

/// When to call a failed sleep hook again after `attempt` calls: 1 s, 2 s,
/// 4 s, … up to [`MAX_SLEEP_RESEND`]. The sleeper goes on while the pool
/// stays idle; activity or a wake ends it.
pub fn sleep_resend_after(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(MAX_SLEEP_RESEND)
}

/// How often the sleeper looks at pools with these idle timeouts: a
/// quarter of the shortest, between 100 ms and 5 s.
pub fn check_interval(idle_timeouts: impl IntoIterator<Item = Duration>) -> Duration {
    idle_timeouts.into_iter().map(|t| t / 4).fold(Duration::from_secs(5), Duration::min).max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn quiet(since: Instant) -> Activity {
        Activity { warm: true, in_flight: 0, queued: 0, waking: false, last_active: since }
    }

    #[test]
    fn idle_once_quiet_for_the_timeout() {
        let t0 = Instant::now();
        let a = quiet(t0);
        assert!(!is_idle(&a, t0 + 14 * S, 15 * S));
        assert!(is_idle(&a, t0 + 15 * S, 15 * S));
    }

    #[test]
    fn anything_going_on_keeps_a_pool_awake() {
        let t0 = Instant::now();
        let later = t0 + 100 * S;
        for a in [
            Activity { in_flight: 1, ..quiet(t0) },
            Activity { queued: 1, ..quiet(t0) },
            Activity { waking: true, ..quiet(t0) },
            Activity { warm: false, ..quiet(t0) },
            quiet(later - S),
        ] {
            assert!(!is_idle(&a, later, 15 * S), "{a:?}");
        }
    }

    #[test]
    fn failed_sleeps_are_resent_with_backoff() {
        let waits: Vec<u64> = (1..=8).map(|a| sleep_resend_after(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(sleep_resend_after(u32::MAX), MAX_SLEEP_RESEND);
    }

    #[test]
    fn checks_come_often_enough_for_the_shortest_timeout() {
        assert_eq!(check_interval([15 * S, 300 * S]), Duration::from_millis(3750));
        assert_eq!(check_interval([]), 5 * S);
        assert_eq!(check_interval([Duration::from_millis(10)]), Duration::from_millis(100));
    }
}
