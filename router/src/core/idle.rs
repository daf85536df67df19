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

/// What each depth costs a pool with two: a wake from each (see
/// [`wake_cost`]) and the light depth's share of an awake replica's cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Depths {
    /// Cost of a wake from light sleep.
    pub light: Duration,
    /// A lightly sleeping replica's cost per second, as a share of an
    /// awake one's.
    pub light_share: f64,
    /// Cost of a wake from deep sleep.
    pub deep: Duration,
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

    /// The light and deep windows for a pool with two depths, each within
    /// its bounds (the deep one no shorter than the light one): the pair
    /// whose expected cost over the observed gaps is least. A gap the light
    /// window bridges costs its length; one that ends in light sleep the
    /// light window, the rest of the gap at the light depth's share, and a
    /// light wake; one that ends in deep sleep the light window, the time
    /// in light sleep, and a deep wake (ski rental with two ways to rent).
    /// A light window equal to the deep one skips the light depth. Until
    /// enough gaps are seen, the break-even windows: awake as long as a
    /// light wake costs over what light sleep saves, then lightly asleep as
    /// long as a deep wake costs over a light one.
    pub fn windows(&self, costs: Depths, light: (Duration, Duration), deep: (Duration, Duration)) -> (Window, Window) {
        let (lmin, lmax) = light;
        let (dmin, dmax) = (deep.0.max(lmin), deep.1.max(lmin));
        let share = costs.light_share.clamp(0.0, 0.999);
        let (cl, cd) = (costs.light.as_secs_f64(), costs.deep.as_secs_f64());
        let window = |idle: Duration, reason, wake_cost| Window { idle, reason, wake_cost, gaps: self.total };
        if self.total < GAPS_TO_DECIDE {
            let l = Duration::from_secs_f64(cl / (1.0 - share)).clamp(lmin, lmax);
            let rest = if share > 0.0 { ((cd - cl).max(0.0) / share).min(1e9) } else { 1e9 };
            let d = (l + Duration::from_secs_f64(rest)).clamp(dmin, dmax).max(l);
            return (window(l, WindowReason::BreakEven, costs.light), window(d, WindowReason::BreakEven, costs.deep));
        }
        // Each candidate window with the count and the summed length of
        // the gaps it bridges.
        let candidates = |lo: Duration, hi: Duration| {
            let mut out = Vec::new();
            let (mut count, mut sum) = (0.0, 0.0);
            out.push((lo, 0.0, 0.0));
            for i in 0..GAP_BUCKETS {
                let top = bucket_top(i);
                if top > hi {
                    break;
                }
                count += self.counts[i];
                sum += self.counts[i] * bucket_mid(i);
                if top >= lo && self.counts[i] > 0.0 {
                    out.push((top, count, sum));
                }
            }
            if hi < Duration::MAX && out.last().is_some_and(|(w, _, _)| *w < hi) {
                out.push((hi, count, sum));
            }
            out
        };
        let (lights, deeps) = (candidates(lmin, lmax), candidates(dmin, dmax));
        let total = self.total;
        let mut best = (lights[0].0, deeps[0].0.max(lights[0].0), f64::INFINITY);
        for &(l, lc, ls) in &lights {
            let lw = l.as_secs_f64();
            for &(d, dc, ds) in deeps.iter().filter(|(d, _, _)| *d >= l) {
                let dw = d.as_secs_f64();
                let in_light = (dc - lc).max(0.0);
                let cost = ls
                    + in_light * (lw + cl - share * lw)
                    + share * (ds - ls).max(0.0)
                    + (total - dc).max(0.0) * (lw + share * (dw - lw) + cd);
                if cost < best.2 - 1e-9 {
                    best = (l, d, cost);
                }
            }
        }
        (
            window(best.0.clamp(lmin, lmax), WindowReason::Histogram, costs.light),
            window(best.1.clamp(dmin, dmax), WindowReason::Histogram, costs.deep),
        )
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

    fn gaps_of(gaps: &[Duration]) -> IdleGaps {
        let mut g = IdleGaps::default();
        let t0 = Instant::now();
        for (i, gap) in gaps.iter().enumerate() {
            g.observe(*gap, t0 + S * i as u32, Duration::MAX);
        }
        g
    }

    const TWO: Depths = Depths { light: Duration::from_secs(2), light_share: 0.25, deep: Duration::from_secs(60) };
    const BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3 * 3600));

    #[test]
    fn two_depths_start_from_the_break_even_windows() {
        let (light, deep) = IdleGaps::default().windows(TWO, BOUNDS, BOUNDS);
        assert_eq!((light.reason, deep.reason), (WindowReason::BreakEven, WindowReason::BreakEven));
        // Awake while a light wake costs more than light sleep saves
        // (2 s / 0.75), then light while a deep wake costs more than the
        // light one over the light depth's cost ((60 − 2) s / 0.25 more).
        assert_eq!(light.idle.as_millis(), 2666);
        assert_eq!(deep.idle.as_millis(), 2666 + 232_000);
        assert_eq!((light.wake_cost, deep.wake_cost), (TWO.light, TWO.deep));
    }

    #[test]
    fn gaps_of_half_a_minute_are_slept_through_lightly_and_hours_deeply() {
        // Pauses of 30 s: a light sleep (1 s + 29 s at a quarter + a 2 s
        // wake) beats staying awake (30 s) and a deep wake (60 s).
        let (light, deep) = gaps_of(&[30 * S; 40]).windows(TWO, BOUNDS, BOUNDS);
        assert_eq!(light.reason, WindowReason::Histogram);
        assert!(light.idle < 30 * S, "{light:?}");
        assert!(deep.idle > 30 * S, "the light sleep bridges the pause: {deep:?}");
        // Nights of ten hours: a deep sleep soon (a quarter of ten hours in
        // light sleep costs far more than one deep wake).
        let (light, deep) = gaps_of(&[36_000 * S; 40]).windows(TWO, BOUNDS, BOUNDS);
        assert!(deep.idle < 600 * S && light.idle <= deep.idle, "{light:?} {deep:?}");
        // Both kinds: the short pauses in light sleep, the nights deep.
        let mut mixed = vec![30 * S; 30];
        mixed.extend([36_000 * S; 10]);
        let (light, deep) = gaps_of(&mixed).windows(TWO, BOUNDS, BOUNDS);
        assert!(light.idle < 30 * S && deep.idle > 30 * S && deep.idle < 3600 * S, "{light:?} {deep:?}");
        // Pauses of 2 s: bridged awake (a light wake costs as much).
        let (light, _) = gaps_of(&[2 * S; 40]).windows(TWO, BOUNDS, BOUNDS);
        assert!(light.idle >= 2 * S, "{light:?}");
    }

    #[test]
    fn the_windows_keep_to_their_bounds_and_in_order() {
        let lb = (10 * S, 20 * S);
        let db = (5 * S, 40 * S);
        for gaps in [vec![], vec![30 * S; 40], vec![36_000 * S; 40], vec![S; 40]] {
            let (light, deep) = gaps_of(&gaps).windows(TWO, lb, db);
            assert!((lb.0..=lb.1).contains(&light.idle), "{light:?}");
            assert!((db.0..=db.1).contains(&deep.idle) && deep.idle >= light.idle, "{light:?} {deep:?}");
        }
    }
}
