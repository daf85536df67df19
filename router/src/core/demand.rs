//! Route away, then warm: a cold pool that loses requests only because it
//! sleeps is woken once [`WARM_AFTER`] requests within [`DEMAND_WINDOW`]
//! were routed away from it, so that later requests go near.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Requests routed away from a cold pool, within [`DEMAND_WINDOW`], that wake it.
pub const WARM_AFTER: usize = 3;

/// Window over which routed-away requests are counted.
pub const DEMAND_WINDOW: Duration = Duration::from_secs(60);

/// The times requests were routed away from one cold pool, within the
/// window. Bounded: only the count within the window matters.
#[derive(Debug, Default, Clone)]
pub struct Demand {
    times: VecDeque<Instant>,
}

impl Demand {
    /// Record a request routed away at `now`; true if the pool should now
    /// be woken (then the record starts afresh).
    pub fn routed_away(&mut self, now: Instant) -> bool {
        self.routed_away_with(now, 0)
    }

    /// [`routed_away`](Self::routed_away), counting `elsewhere` more
    /// requests that other edges routed away within the window.
    pub fn routed_away_with(&mut self, now: Instant, elsewhere: usize) -> bool {
        self.expire(now);
        self.times.push_back(now);
        if self.times.len() > WARM_AFTER {
            self.times.pop_front();
        }
        if self.times.len() + elsewhere >= WARM_AFTER {
            self.times.clear();
            return true;
        }
        false
    }

    /// Requests counted within the window at `now`.
    pub fn count(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.times.len()
    }

    fn expire(&mut self, now: Instant) {
        while self.times.front().is_some_and(|t| now.saturating_duration_since(*t) > DEMAND_WINDOW) {
            self.times.pop_front();
        }
    }

    /// Requests counted now (within the window of the last record).
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether nothing is counted.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Forget what was counted (a wake started for another reason).
    pub fn clear(&mut self) {
        self.times.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn two_routed_away_requests_do_not_wake_three_do() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        assert!(!d.routed_away(t0));
        assert!(!d.routed_away(t0 + S), "no wake after 2");
        assert!(d.routed_away(t0 + 2 * S), "a wake after 3");
        assert!(d.is_empty(), "counting starts afresh after a wake");
        assert!(!d.routed_away(t0 + 3 * S));
    }

    #[test]
    fn requests_outside_the_window_do_not_count() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        assert!(!d.routed_away(t0));
        assert!(!d.routed_away(t0 + 10 * S));
        // The first is more than a window before the third.
        assert!(!d.routed_away(t0 + DEMAND_WINDOW + 11 * S), "none once the window has passed");
        assert_eq!(d.len(), 1);
        assert!(!d.routed_away(t0 + DEMAND_WINDOW + 12 * S));
        assert!(d.routed_away(t0 + DEMAND_WINDOW + 13 * S));
    }

    #[test]
    fn demand_at_other_edges_counts_towards_the_wake() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        assert!(!d.routed_away_with(t0, 1), "one here and one elsewhere");
        assert!(d.routed_away_with(t0 + S, 1), "two here and one elsewhere");
        assert!(d.is_empty());
        assert!(!d.routed_away(t0 + 2 * S));
        assert_eq!(d.count(t0 + DEMAND_WINDOW + 3 * S), 0, "what this edge publishes expires too");
    }

    #[test]
    fn the_record_stays_bounded() {
        let t0 = Instant::now();
        let mut d = Demand::default();
        for i in 0..1000 {
            d.routed_away(t0 + Duration::from_millis(i));
            assert!(d.len() < WARM_AFTER);
        }
    }
}
