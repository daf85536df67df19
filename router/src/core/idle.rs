//! The idle rule: when a pool that scales to zero may be put to sleep.
//!
//! A pool is idle when it is warm, nothing is in flight on it (streams
//! included), nothing is held for it, no wake is under way, and nothing
//! happened on it — a request starting or ending, or its replicas
//! reporting load — for `idle_timeout`. Only the pool's home edge acts on
//! it, once per idle period (see [`crate::control::sleep`]).

use std::collections::VecDeque;
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

/// Buckets of the idle-gap histogram per doubling of the gap (about 19 %
/// apart).
const BUCKETS_PER_DOUBLING: f64 = 4.0;
/// The shortest gap the histogram tells apart; shorter ones share its
/// first bucket.
const SHORTEST_GAP: Duration = Duration::from_millis(100);
/// Buckets: from [`SHORTEST_GAP`] to past a week.
const GAP_BUCKETS: usize = 96;
/// Weight an old gap keeps with every new one (the histogram forgets over
/// a few hundred gaps, so it follows a pool whose pattern changes).
const GAP_DECAY: f64 = 0.995;
/// Gaps seen before the histogram decides; until then the window is the
/// break-even one.
pub const GAPS_TO_DECIDE: f64 = 8.0;
/// What a wake costs, in seconds of one replica's GPU time: the boot
/// itself (`wake`, GPU time serving nothing), plus as much again for the
/// requests that wait for it, in the share `held` of the pool's wakes that
/// requests waited for (the others came while requests went to a warm
/// pool farther away, and cost those requests only the longer trip).
pub fn wake_cost(wake: Duration, held: f64) -> Duration {
    wake.mul_f64(1.0 + held.clamp(0.0, 1.0))
}

/// Why [`IdleGaps::window`] picked its window, for `/state` and the status page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowReason {
    /// Too few gaps seen: the break-even window of ski rental (stay awake
    /// as long as a wake would cost).
    BreakEven,
    /// The window that costs least over the pool's own idle gaps.
    Histogram,
}

impl WindowReason {
    /// As `/state` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            WindowReason::BreakEven => "break_even",
            WindowReason::Histogram => "histogram",
        }
    }
}

/// The idle window `idle_timeout = "auto"` chose, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    /// The window.
    pub idle: Duration,
    /// Why.
    pub reason: WindowReason,
    /// What one wake costs, in seconds of replica time.
    pub wake_cost: Duration,
    /// Gaps the choice rests on (decayed count).
    pub gaps: f64,
}

/// One pool's idle gaps — from the end of its last activity to the next
/// request, whether it slept meanwhile or not — as a decaying log-scale
/// histogram (as in Shahrad et al., "Serverless in the Wild", ATC 2020),
/// and the starts of its busy periods, to foresee the next one.
#[derive(Clone, Debug)]
pub struct IdleGaps {
    counts: Box<[f64]>,
    total: f64,
    /// Starts of recent busy periods after a long gap, oldest first.
    starts: VecDeque<Instant>,
    /// The longest of the recent long gaps, seconds (fading), so that only
    /// the gaps of its order (the nights) start busy periods.
    longest: f64,
}

impl Default for IdleGaps {
    fn default() -> Self {
        IdleGaps { counts: vec![0.0; GAP_BUCKETS].into(), total: 0.0, starts: VecDeque::new(), longest: 0.0 }
    }
}

fn bucket(gap: Duration) -> usize {
    let x = gap.as_secs_f64() / SHORTEST_GAP.as_secs_f64();
    if x <= 1.0 {
        return 0;
    }
    ((x.log2() * BUCKETS_PER_DOUBLING) as usize + 1).min(GAP_BUCKETS - 1)
}

/// The longest gap bucket `i` holds.
fn bucket_top(i: usize) -> Duration {
    SHORTEST_GAP.mul_f64(2f64.powf(i as f64 / BUCKETS_PER_DOUBLING))
}

/// A gap typical of bucket `i` (its geometric middle).
fn bucket_mid(i: usize) -> f64 {
    if i == 0 {
        return SHORTEST_GAP.as_secs_f64() / 2.0;
    }
    SHORTEST_GAP.as_secs_f64() * 2f64.powf((i as f64 - 0.5) / BUCKETS_PER_DOUBLING)
}

/// Busy-period starts remembered for the forecast.
const STARTS_KEPT: usize = 4;
/// What the longest long gap keeps of itself with every new long gap.
const LONGEST_FADE: f64 = 0.9;
/// How far two periods between busy-period starts may differ and still
/// count as one rhythm.
const PERIOD_TOLERANCE: f64 = 0.1;

impl IdleGaps {
    /// Record a gap of `gap` that ended at `now` with a request. A gap
    /// longer than `long` (the window in force) and of the order of the
    /// longest recent ones (at least half) starts a busy period: the
    /// night's gap does, a lull in the day does not.
    pub fn observe(&mut self, gap: Duration, now: Instant, long: Duration) {
        for c in self.counts.iter_mut() {
            *c *= GAP_DECAY;
        }
        self.total = self.total * GAP_DECAY + 1.0;
        self.counts[bucket(gap)] += 1.0;
        if gap > long {
            let g = gap.as_secs_f64();
            self.longest = (self.longest * LONGEST_FADE).max(g);
            if g >= self.longest / 2.0 {
                if self.starts.len() == STARTS_KEPT {
                    self.starts.pop_front();
                }
                self.starts.push_back(now);
            }
        }
    }

    /// The idle window for a pool whose wake costs `wake_cost` (see
    /// [`wake_cost`]), within `min..=max`: the one whose expected cost over
    /// the observed gaps is least, a gap costing its own length if the
    /// window bridges it and the window plus a wake if not (ski rental,
    /// with the gap distribution known); the break-even window until
    /// enough gaps are seen.
    pub fn window(&self, wake_cost: Duration, min: Duration, max: Duration) -> Window {
        if self.total < GAPS_TO_DECIDE {
            return Window {
                idle: wake_cost.clamp(min, max),
                reason: WindowReason::BreakEven,
                wake_cost,
                gaps: self.total,
            };
        }
        let c = wake_cost.as_secs_f64();
        // Cost of a window that bridges buckets 0..=k: their gaps, plus
        // for every longer gap the window and a wake. One pass.
        let mut bridged = 0.0;
        let mut bridged_count = 0.0;
        let cost = |w: f64, bridged: f64, bridged_count: f64| bridged + (self.total - bridged_count) * (w + c);
        let (mut best_w, mut best) = (min, cost(min.as_secs_f64(), 0.0, 0.0));
        for i in 0..GAP_BUCKETS {
            let top = bucket_top(i);
            if top > max {
                break;
            }
            bridged += self.counts[i] * bucket_mid(i);
            bridged_count += self.counts[i];
            if top < min || self.counts[i] == 0.0 {
                continue;
            }
            let total = cost(top.as_secs_f64(), bridged, bridged_count);
            if total < best - 1e-9 {
                (best_w, best) = (top, total);
            }
        }
        Window { idle: best_w.clamp(min, max), reason: WindowReason::Histogram, wake_cost, gaps: self.total }
    }

    /// When the next busy period is expected to start, if the last ones
    /// came with a steady rhythm (three starts, two periods within 10 % of
    /// each other): the last start plus the mean period.
    pub fn next_start(&self) -> Option<Instant> {
        let n = self.starts.len();
        if n < 3 {
            return None;
        }
        let (a, b, c) = (self.starts[n - 3], self.starts[n - 2], self.starts[n - 1]);
        let (p1, p2) = (b.saturating_duration_since(a).as_secs_f64(), c.saturating_duration_since(b).as_secs_f64());
        if p1 <= 0.0 || (p1 - p2).abs() > PERIOD_TOLERANCE * p1.max(p2) {
            return None;
        }
        Some(c + Duration::from_secs_f64((p1 + p2) / 2.0))
    }
}

/// When to wake a cold pool ahead of a busy period expected at `next`, so
/// that it is ready as it starts: its wake time before, and a quarter more
/// for a wake slower than learned.
pub fn prewarm_at(next: Instant, wake: Duration) -> Instant {
    next.checked_sub(wake.mul_f64(1.25)).unwrap_or(next)
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
    fn a_wake_costs_its_boot_and_the_waits_it_causes() {
        assert_eq!(wake_cost(20 * S, 1.0), 40 * S, "every wake made requests wait");
        assert_eq!(wake_cost(20 * S, 0.0), 20 * S, "requests always went elsewhere meanwhile");
        assert_eq!(wake_cost(20 * S, 7.0), 40 * S);
    }

    #[test]
    fn without_gaps_the_window_is_break_even() {
        let g = IdleGaps::default();
        let w = g.window(wake_cost(20 * S, 1.0), S, 1800 * S);
        assert_eq!((w.idle, w.reason), (40 * S, WindowReason::BreakEven));
        assert_eq!(g.window(wake_cost(20 * S, 1.0), 60 * S, 1800 * S).idle, 60 * S, "within the bounds");
    }

    fn gaps(list: &[(u64, usize)]) -> IdleGaps {
        let t0 = Instant::now();
        let mut g = IdleGaps::default();
        for &(secs, n) in list {
            for _ in 0..n {
                g.observe(Duration::from_secs(secs), t0, Duration::MAX);
            }
        }
        g
    }

    #[test]
    fn short_gaps_are_bridged_and_long_ones_slept_through() {
        // Many 30 s pauses and some nights: keep the pool through the
        // pauses (a wake costs 40 s), sleep soon after for the nights.
        let g = gaps(&[(30, 40), (8 * 3600, 4)]);
        let w = g.window(wake_cost(20 * S, 1.0), S, 1800 * S);
        assert_eq!(w.reason, WindowReason::Histogram);
        assert!(w.idle >= 30 * S && w.idle < 40 * S, "{w:?}");
        // Only long gaps: sleep at once (the shortest window allowed).
        let g = gaps(&[(3600, 20)]);
        assert_eq!(g.window(wake_cost(20 * S, 1.0), 2 * S, 1800 * S).idle, 2 * S);
        // Gaps a little longer than a wake costs: cheaper to sleep at once
        // than to bridge them.
        let g = gaps(&[(60, 20)]);
        assert_eq!(g.window(wake_cost(20 * S, 1.0), 2 * S, 1800 * S).idle, 2 * S);
        // Gaps far shorter than a wake: bridge them all.
        let g = gaps(&[(5, 30), (10, 30)]);
        let w = g.window(wake_cost(20 * S, 1.0), S, 1800 * S);
        assert!(w.idle >= 10 * S && w.idle < 13 * S, "{w:?}");
        assert!(g.window(wake_cost(20 * S, 1.0), S, 8 * S).idle <= 8 * S, "never past max");
    }

    #[test]
    fn a_steady_rhythm_of_busy_periods_is_foreseen() {
        let t0 = Instant::now();
        let day = 240 * S;
        let mut g = IdleGaps::default();
        for d in 0..3u32 {
            // A few short gaps in the day, then the morning's first request
            // after the night's long gap.
            g.observe(5 * S, t0 + day * d + 10 * S, 60 * S);
            g.observe(100 * S, t0 + day * d, 60 * S);
            if d < 2 {
                assert_eq!(g.next_start(), None, "two starts are not yet a rhythm");
            }
        }
        assert_eq!(g.next_start(), Some(t0 + 3 * day));
        // A lull in the day, long but far shorter than the nights, is no
        // busy period's start.
        g.observe(20 * S, t0 + 3 * day - 100 * S, 10 * S);
        assert_eq!(g.next_start(), Some(t0 + 3 * day));
        assert_eq!(prewarm_at(t0 + 3 * day, 4 * S), t0 + 3 * day - 5 * S);
        // An irregular start breaks the rhythm.
        g.observe(100 * S, t0 + 3 * day + 100 * S, 60 * S);
        assert_eq!(g.next_start(), None);
    }

    #[test]
    fn checks_come_often_enough_for_the_shortest_timeout() {
        assert_eq!(check_interval([15 * S, 300 * S]), Duration::from_millis(3750));
        assert_eq!(check_interval([]), 5 * S);
        assert_eq!(check_interval([Duration::from_millis(10)]), Duration::from_millis(100));
    }
}
