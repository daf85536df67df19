//! The wait model: how long a pool would make a request wait before it can
//! start, from what is known of the pool at `now`.
//!
//! - a free slot, and nobody held: wait 0;
//! - warm but full (or others held first): the queue estimate, position ×
//!   mean slot time ÷ slots; unavailable when the queue is full;
//! - waking: the remaining expected wake time (at least a tenth of it once
//!   overdue);
//! - cold (scales to zero): the expected wake time;
//! - no ready replica and no way to wake one: unavailable.

use std::time::{Duration, Instant};

use super::placement::PoolStatus;

/// What the wait model needs to know of one pool at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLoad {
    /// Whether a replica is ready.
    pub warm: bool,
    /// Free slots over ready replicas.
    pub free_slots: u32,
    /// Slots over ready replicas, taken or not.
    pub ready_slots: u32,
    /// Requests held for the pool now, here.
    pub queued: u32,
    /// Requests the other edges of the cluster hold for it (they are
    /// ahead of a request held now, for its ETA).
    pub held_elsewhere: u32,
    /// Requests it may hold at most.
    pub max_queue: u32,
    /// Whether the pool scales to zero (and so can be woken).
    pub scales: bool,
    /// Mean time a request holds a slot.
    pub service_time: Duration,
    /// Expected time from a wake call to a ready replica.
    pub expected_wake: Duration,
    /// When the wake under way started, if one is.
    pub waking_since: Option<Instant>,
}

/// The pool's status for placement at `now`.
#[inline]
pub fn status(p: &PoolLoad, now: Instant) -> PoolStatus {
    let queue_full = p.queued >= p.max_queue;
    if p.warm {
        if p.free_slots > p.queued {
            return PoolStatus::FREE;
        }
        if queue_full {
            return PoolStatus::UNAVAILABLE;
        }
        let slots = p.ready_slots.max(1);
        let ahead = u64::from(p.queued) + u64::from(p.held_elsewhere) + 1;
        let wait = p.service_time.as_micros() as u64 * ahead / u64::from(slots);
        return PoolStatus { wait_us: Some(wait.min(u64::from(u32::MAX)) as u32), free_slot: false, cold: false };
    }
    if !p.scales || queue_full {
        return PoolStatus::UNAVAILABLE;
    }
    match p.waking_since {
        Some(since) => PoolStatus {
            wait_us: Some(micros(remaining_wake(p.expected_wake, since, now))),
            free_slot: false,
            cold: false,
        },
        None => PoolStatus { wait_us: Some(micros(p.expected_wake)), free_slot: false, cold: true },
    }
}

/// What is left of a wake that started at `since` and is expected to take
/// `expected`: never less than a tenth of `expected`, so that an overdue
/// wake still costs something against a warm pool.
pub fn remaining_wake(expected: Duration, since: Instant, now: Instant) -> Duration {
    expected.saturating_sub(now.saturating_duration_since(since)).max(expected / 10)
}

/// A duration in microseconds, saturating at `u32::MAX` (about 71 minutes).
pub fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn warm(free: u32, ready: u32, queued: u32) -> PoolLoad {
        PoolLoad {
            warm: true,
            free_slots: free,
            ready_slots: ready,
            queued,
            held_elsewhere: 0,
            max_queue: 8,
            scales: true,
            service_time: 2 * S,
            expected_wake: 20 * S,
            waking_since: None,
        }
    }

    fn cold() -> PoolLoad {
        PoolLoad { warm: false, free_slots: 0, ready_slots: 0, ..warm(0, 0, 0) }
    }

    #[test]
    fn a_free_slot_nobody_waits_for_is_free() {
        let now = Instant::now();
        assert_eq!(status(&warm(1, 4, 0), now), PoolStatus::FREE);
        // One free slot, one request held before: the slot is the held one's.
        assert_ne!(status(&warm(1, 4, 1), now), PoolStatus::FREE);
    }

    #[test]
    fn a_full_pool_waits_its_place_in_the_queue() {
        let now = Instant::now();
        // 4 slots, 3 held: the next is 4th in line; 2 s per slot ÷ 4 slots
        // = 0.5 s per place.
        let s = status(&warm(0, 4, 3), now);
        assert_eq!(s, PoolStatus { wait_us: Some(2_000_000), free_slot: false, cold: false });
        let s = status(&warm(0, 4, 0), now);
        assert_eq!(s.wait_us, Some(500_000));
        // A full queue takes nothing more.
        assert_eq!(status(&PoolLoad { queued: 8, ..warm(0, 4, 8) }, now), PoolStatus::UNAVAILABLE);
        // Requests other edges hold are ahead too, but fill only their own
        // edges' queues.
        let s = status(&PoolLoad { held_elsewhere: 12, ..warm(0, 4, 3) }, now);
        assert_eq!(s.wait_us, Some(8_000_000));
    }

    #[test]
    fn a_waking_pool_waits_what_is_left_of_its_wake() {
        let t0 = Instant::now();
        let p = PoolLoad { waking_since: Some(t0), ..cold() };
        assert_eq!(status(&p, t0).wait_us, Some(20_000_000));
        assert_eq!(status(&p, t0 + 5 * S).wait_us, Some(15_000_000));
        assert!(!status(&p, t0 + 5 * S).cold, "waking is not cold");
        // Overdue: a tenth of the expected wake, never zero.
        assert_eq!(status(&p, t0 + 60 * S).wait_us, Some(2_000_000));
    }

    #[test]
    fn a_cold_pool_waits_its_whole_wake() {
        let s = status(&cold(), Instant::now());
        assert_eq!(s, PoolStatus { wait_us: Some(20_000_000), free_slot: false, cold: true });
    }

    #[test]
    fn a_pool_that_is_down_and_cannot_wake_is_unavailable() {
        let p = PoolLoad { scales: false, ..cold() };
        assert_eq!(status(&p, Instant::now()), PoolStatus::UNAVAILABLE);
        let p = PoolLoad { queued: 8, ..cold() };
        assert_eq!(status(&p, Instant::now()), PoolStatus::UNAVAILABLE, "a full queue holds no more");
    }

    #[test]
    fn waits_saturate() {
        assert_eq!(micros(Duration::from_secs(100_000)), u32::MAX);
    }
}
