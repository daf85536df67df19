//! The wake schedule of one pool: the wake hook is called once, then again
//! with backoff while no replica is ready; a wake that never completes is
//! given up after [`give_up_after`], and the pool is cold again. The shell
//! ([`crate::control::wake`]) asks [`WakeSchedule::step`] what to do at
//! each turn of its fast-probe loop.

use std::time::{Duration, Instant};

/// First resend of the wake hook: after 1.5 × the expected wake time, and
/// never sooner than this.
pub const MIN_RESEND: Duration = Duration::from_secs(2);

/// Longest gap between two wake hook calls.
pub const MAX_RESEND: Duration = Duration::from_secs(60);

/// Probe interval while a pool wakes (jittered ±25 % by the shell).
pub const FAST_PROBE: Duration = Duration::from_millis(75);

/// How long a wake may go unanswered before it is abandoned (the pool is
/// cold again, and the next request starts a new wake).
pub fn give_up_after(expected: Duration) -> Duration {
    (expected.saturating_mul(10)).clamp(Duration::from_secs(60), Duration::from_secs(30 * 60))
}

/// When to call the wake hook again after `attempt` calls.
pub fn resend_after(expected: Duration, attempt: u32) -> Duration {
    let first = expected.mul_f64(1.5).max(MIN_RESEND);
    first.saturating_mul(1 << attempt.saturating_sub(1).min(6)).min(MAX_RESEND)
}

/// What the wake loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeStep {
    /// A replica is ready: the wake took this long.
    Ready {
        /// From the wake's start to the first ready replica.
        took: Duration,
    },
    /// Call the wake hook (the `attempt`-th call, from 1), then probe.
    Call {
        /// Which call this is.
        attempt: u32,
    },
    /// Nothing to send: probe again.
    Probe,
    /// The wake took too long: give it up.
    GiveUp {
        /// How long it ran.
        after: Duration,
    },
}

/// One wake under way.
#[derive(Clone, Debug)]
pub struct WakeSchedule {
    started: Instant,
    calls: u32,
    next_call: Instant,
}

impl WakeSchedule {
    /// A wake starting at `now`.
    pub fn new(now: Instant) -> Self {
        WakeSchedule { started: now, calls: 0, next_call: now }
    }

    /// When the wake started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Hook calls made so far.
    pub fn calls(&self) -> u32 {
        self.calls
    }

    /// The next step at `now`, given whether a replica is ready and the
    /// pool's expected wake time (learned, so it may change meanwhile).
    pub fn step(&mut self, now: Instant, warm: bool, expected: Duration) -> WakeStep {
        let ran = now.saturating_duration_since(self.started);
        if warm {
            return WakeStep::Ready { took: ran };
        }
        if ran > give_up_after(expected) {
            return WakeStep::GiveUp { after: ran };
        }
        if now >= self.next_call {
            self.calls += 1;
            self.next_call = now + resend_after(expected, self.calls);
            return WakeStep::Call { attempt: self.calls };
        }
        WakeStep::Probe
    }

    /// The call just stepped to was not made: another edge of the cluster
    /// holds the wake's claim until `retry_at`. Ask again then (it is not
    /// counted as a call, so the next one is a first call again).
    pub fn defer(&mut self, retry_at: Instant) {
        self.calls = self.calls.saturating_sub(1);
        self.next_call = retry_at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn resends_back_off_to_a_cap() {
        let e = 20 * S;
        assert_eq!(resend_after(e, 1), 30 * S);
        assert_eq!(resend_after(e, 2), 60 * S);
        assert_eq!(resend_after(e, 9), MAX_RESEND);
        assert_eq!(resend_after(Duration::from_millis(100), 1), MIN_RESEND);
    }

    #[test]
    fn give_up_is_bounded() {
        assert_eq!(give_up_after(S), 60 * S);
        assert_eq!(give_up_after(30 * S), 300 * S);
        assert_eq!(give_up_after(3600 * S), 1800 * S);
        assert_eq!(give_up_after(Duration::MAX), 1800 * S, "no overflow");
    }

    #[test]
    fn a_wake_is_called_resent_and_then_given_up() {
        let t0 = Instant::now();
        let expected = 20 * S;
        let mut w = WakeSchedule::new(t0);
        assert_eq!(w.step(t0, false, expected), WakeStep::Call { attempt: 1 });
        assert_eq!(w.step(t0 + S, false, expected), WakeStep::Probe);
        assert_eq!(w.step(t0 + 29 * S, false, expected), WakeStep::Probe);
        // 1.5 × the expected wake after the first call: the second is sent.
        assert_eq!(w.step(t0 + 30 * S, false, expected), WakeStep::Call { attempt: 2 });
        assert_eq!(w.step(t0 + 31 * S, false, expected), WakeStep::Probe);
        // Then 60 s apart (the cap).
        assert_eq!(w.step(t0 + 90 * S, false, expected), WakeStep::Call { attempt: 3 });
        assert_eq!(w.step(t0 + 150 * S, false, expected), WakeStep::Call { attempt: 4 });
        assert_eq!(w.calls(), 4);
        // Ten expected wakes (200 s) without a ready replica: given up.
        assert_eq!(w.step(t0 + 200 * S, false, expected), WakeStep::Probe);
        assert_eq!(w.step(t0 + 201 * S, false, expected), WakeStep::GiveUp { after: 201 * S });
    }

    #[test]
    fn a_call_another_edge_makes_is_deferred_to_its_claims_end() {
        let t0 = Instant::now();
        let mut w = WakeSchedule::new(t0);
        assert_eq!(w.step(t0, false, 20 * S), WakeStep::Call { attempt: 1 });
        w.defer(t0 + 3 * S);
        assert_eq!(w.calls(), 0);
        assert_eq!(w.step(t0 + 2 * S, false, 20 * S), WakeStep::Probe);
        assert_eq!(w.step(t0 + 3 * S, false, 20 * S), WakeStep::Call { attempt: 1 }, "the claim ran out");
    }

    #[test]
    fn a_ready_replica_ends_the_wake_with_its_duration() {
        let t0 = Instant::now();
        let mut w = WakeSchedule::new(t0);
        assert_eq!(w.step(t0, false, 20 * S), WakeStep::Call { attempt: 1 });
        assert_eq!(w.step(t0 + 12 * S, true, 20 * S), WakeStep::Ready { took: 12 * S });
    }
}
