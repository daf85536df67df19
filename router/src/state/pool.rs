//! A pool's own bookkeeping, kept across snapshots by pool id: in-flight
//! count, the idle clock, the wake under way and the learned wake time,
//! the learned service time, demand from requests routed away, and the
//! hold queue. Every method that needs the time is given it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stoke_config::IdleTimeout;

use crate::core::demand::Demand;
use crate::core::idle::{wake_cost, Depths, IdleGaps, Window};

/// Seed of the mean time a request holds a slot, before any is observed.
/// Inference requests take seconds; one second errs towards holding less.
pub const SERVICE_TIME_SEED: Duration = Duration::from_secs(1);

/// Seed of the light wake time until the config's is given
/// ([`PoolState::seed_light_wake`]).
pub const LIGHT_WAKE_SEED: Duration = Duration::from_secs(2);

/// Weight of a new observation in the learned wake and service times.
pub const EWMA_WEIGHT: f64 = 0.3;

/// The idle windows in force for a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Windows {
    /// Idle time before the light sleep, with a light depth.
    pub light: Option<Duration>,
    /// Idle time before the deep sleep.
    pub deep: Duration,
}

/// Per-pool state that outlives any one config snapshot.
#[derive(Debug)]
pub struct PoolState {
    /// The pool's id.
    pub id: Arc<str>,
    pub(super) in_flight: AtomicU32,
    /// Milliseconds since `epoch` of the last time a request started or
    /// ended here, or the replicas reported load: the idle clock.
    last_active_ms: AtomicU64,
    /// Like `last_active_ms`, but for requests and reported load only (a
    /// wake is not demand): where idle gaps are measured from.
    last_demand_ms: AtomicU64,
    epoch: Instant,
    /// 0 when not waking; else milliseconds since `epoch` + 1 of the wake's start.
    waking_since_ms: AtomicU64,
    /// Learned wake time, microseconds (EWMA of observed wakes).
    expected_wake_us: AtomicU64,
    wake_observed: AtomicBool,
    /// Learned time a request holds a slot, microseconds.
    service_time_us: AtomicU64,
    /// Whether the sleep hook was called for the current idle period.
    slept: AtomicBool,
    /// Whether the light sleep was called for the current idle period.
    light_slept: AtomicBool,
    /// Whether the pool sleeps lightly (as this edge sees it): not warm,
    /// and a replica answers that it sleeps.
    light: AtomicBool,
    /// Whether the wake under way started from light sleep.
    waking_from_light: AtomicBool,
    /// Learned wake time from light sleep, microseconds.
    expected_light_us: AtomicU64,
    light_observed: AtomicBool,
    /// The light window chosen last (`idle_timeout = "auto"` with a light
    /// depth), for `/state`.
    light_window: Mutex<Option<Window>>,
    /// Requests routed away from this pool while it was cold.
    demand: Mutex<Demand>,
    /// Why the last wake failed, until a wake succeeds or a new one starts.
    wake_error: Mutex<Option<String>>,
    /// The span of the wake under way, when it is traced (trace and span
    /// id): the holds it ends link to it.
    wake_span: Mutex<Option<([u8; 16], [u8; 8])>>,
    /// Set when the pool left the config: held requests are answered.
    removed: AtomicBool,
    /// Requests this edge sent to the pool, ever.
    pub(super) routed: AtomicU64,
    /// Idle gaps seen, for `idle_timeout = "auto"`.
    gaps: Mutex<IdleGaps>,
    /// The window chosen last (`idle_timeout = "auto"`), for `/state`.
    window: Mutex<Option<Window>>,
    /// The busy-period start a pre-warm was sent for.
    prewarmed_for: Mutex<Option<Instant>>,
    /// Share of this edge's wakes of the pool that requests waited for
    /// (an EWMA, as f64 bits; 1 until a wake is seen).
    held_share: AtomicU64,
    /// What the other edges of the cluster publish for the pool (fresh
    /// reports only; zero without a cluster).
    elsewhere: Elsewhere,
    /// Round trip from this edge, measured by health probes.
    rtt: Rtt,
}

/// The round trip to a pool as its health probes measure it: the time to a
/// probe's first byte, smoothed, and the value placement ranks by.
#[derive(Debug, Default)]
struct Rtt {
    /// Smoothed, microseconds; 0 before the first sample.
    smoothed_us: AtomicU64,
    /// The last probe's connect and first-byte times, microseconds.
    last_connect_us: AtomicU64,
    last_first_byte_us: AtomicU64,
    samples: AtomicU64,
    /// The smoothed value when placement last ranked by it.
    ranked_us: AtomicU64,
}

/// Weight of a new sample in the smoothed RTT.
pub const RTT_WEIGHT: f64 = 0.2;

/// What `/state` shows of a pool's measured RTT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasuredRtt {
    /// Smoothed time to a probe's first byte.
    pub smoothed: Duration,
    /// The last probe's connect time.
    pub last_connect: Duration,
    /// The last probe's time to first byte.
    pub last_first_byte: Duration,
    /// Probes that answered.
    pub samples: u64,
}

/// A pool's figures summed over the other edges' fresh cluster reports.
#[derive(Debug, Default)]
struct Elsewhere {
    in_flight: AtomicU32,
    held: AtomicU32,
    routed_away: AtomicU32,
}

/// What the other edges of the cluster have for one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    /// Requests in flight (streams included).
    pub in_flight: u32,
    /// Requests held for it.
    pub held: u32,
    /// Requests routed away from it while it slept, within the demand window.
    pub routed_away: u32,
}

impl Figures {
    /// Whether any request is in flight or held.
    pub fn busy(&self) -> bool {
        self.in_flight > 0 || self.held > 0
    }
}

impl PoolState {
    /// A pool first seen at `now`, expected to wake in `wake_time`.
    pub fn new(id: &str, wake_time: Duration, now: Instant) -> Self {
        PoolState {
            id: id.into(),
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(0),
            last_demand_ms: AtomicU64::new(0),
            epoch: now,
            waking_since_ms: AtomicU64::new(0),
            expected_wake_us: AtomicU64::new(saturating_micros(wake_time)),
            wake_observed: AtomicBool::new(false),
            service_time_us: AtomicU64::new(saturating_micros(SERVICE_TIME_SEED)),
            slept: AtomicBool::new(false),
            light_slept: AtomicBool::new(false),
            light: AtomicBool::new(false),
            waking_from_light: AtomicBool::new(false),
            expected_light_us: AtomicU64::new(saturating_micros(LIGHT_WAKE_SEED)),
            light_observed: AtomicBool::new(false),
            light_window: Mutex::new(None),
            demand: Mutex::new(Demand::default()),
            wake_error: Mutex::new(None),
            wake_span: Mutex::new(None),
            removed: AtomicBool::new(false),
            routed: AtomicU64::new(0),
            gaps: Mutex::new(IdleGaps::default()),
            window: Mutex::new(None),
            prewarmed_for: Mutex::new(None),
            held_share: AtomicU64::new(1f64.to_bits()),
            elsewhere: Elsewhere::default(),
            rtt: Rtt::default(),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Requests this edge sent to the pool since it first saw it.
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// Requests this edge has in flight on the pool (streams included).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// When a request last started or ended on this pool (or its replicas
    /// last reported load).
    pub fn last_active(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed))
    }

    /// Mark activity at `now`: the pool is not idle, and a new idle period
    /// (with its own sleep) begins after it.
    pub fn touch(&self, now: Instant) {
        let ms = self.ms(now);
        self.last_active_ms.fetch_max(ms, Ordering::Relaxed);
        self.last_demand_ms.fetch_max(ms, Ordering::Relaxed);
        self.slept.store(false, Ordering::Relaxed);
        self.light_slept.store(false, Ordering::Relaxed);
    }

    /// A wake completed at `now`: a new idle period begins, with its own
    /// sleep, even if no request comes (a wake for demand that went
    /// elsewhere, a pre-warm whose busy period does not come).
    pub fn woke(&self, now: Instant) {
        self.last_active_ms.fetch_max(self.ms(now), Ordering::Relaxed);
        self.slept.store(false, Ordering::Relaxed);
        self.light_slept.store(false, Ordering::Relaxed);
    }

    /// A request starts at `now` on a pool with nothing else in flight (or
    /// its replicas report load again): the gap since the last activity
    /// ends. Gaps shorter than a tenth of a second are not idle time.
    pub fn end_gap(&self, now: Instant) {
        let gap_ms = self.ms(now).saturating_sub(self.last_demand_ms.load(Ordering::Relaxed));
        if gap_ms < 100 {
            return;
        }
        let gap = Duration::from_millis(gap_ms);
        let long = self.window.lock().unwrap_or_else(|e| e.into_inner()).map_or(Duration::MAX, |w| w.idle);
        self.gaps.lock().unwrap_or_else(|e| e.into_inner()).observe(gap, now, long);
    }

    /// The windows in force: the deep one under `deep`, and with a light
    /// depth the light one under its own rule. Where either is `"auto"`,
    /// both are picked together from the gaps seen, the learned wake times
    /// and the light depth's cost (remembered for `/state`).
    pub fn windows(&self, deep: IdleTimeout, light: Option<(IdleTimeout, f64)>) -> Windows {
        let deep_cost = wake_cost(self.expected_deep_wake(), self.held_share());
        let light_cost = wake_cost(self.expected_light_wake(), self.held_share());
        let auto = |rule: IdleTimeout| match rule {
            IdleTimeout::Auto { min, max } => Some((min, max)),
            IdleTimeout::Fixed(_) => None,
        };
        let fixed = |rule: IdleTimeout| match rule {
            IdleTimeout::Fixed(d) => d,
            IdleTimeout::Auto { max, .. } => max,
        };
        let gaps = self.gaps.lock().unwrap_or_else(|e| e.into_inner());
        let (light_w, deep_w) = match (light, auto(deep)) {
            (None, None) => return Windows { light: None, deep: fixed(deep) },
            (None, Some((min, max))) => (None, gaps.window(deep_cost, min, max)),
            (Some((rule, share)), deep_bounds) => {
                let (lmin, lmax) = auto(rule).unwrap_or((fixed(rule), fixed(rule)));
                let (dmin, dmax) = deep_bounds.unwrap_or((fixed(deep), fixed(deep)));
                if auto(rule).is_none() && deep_bounds.is_none() {
                    return Windows { light: Some(fixed(rule)), deep: fixed(deep) };
                }
                let costs = Depths { light: light_cost, light_share: share, deep: deep_cost };
                let (l, d) = gaps.windows(costs, (lmin, lmax), (dmin, dmax));
                (Some(l), d)
            }
        };
        drop(gaps);
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = auto(deep).map(|_| deep_w);
        *self.light_window.lock().unwrap_or_else(|e| e.into_inner()) =
            light_w.filter(|_| light.is_some_and(|(r, _)| auto(r).is_some()));
        Windows { light: light_w.map(|w| w.idle), deep: deep_w.idle }
    }

    /// The light window `"auto"` chose last, if it did.
    pub fn auto_light_window(&self) -> Option<Window> {
        *self.light_window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This edge starts a wake of the pool: `held` if a request waits for
    /// it, not if it is for demand that is being served elsewhere.
    pub fn note_wake(&self, held: bool) {
        let sample = if held { 1.0 } else { 0.0 };
        let _ = self.held_share.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            let prev = f64::from_bits(bits);
            Some((prev * (1.0 - EWMA_WEIGHT) + sample * EWMA_WEIGHT).to_bits())
        });
    }

    /// Share of this edge's wakes that requests waited for.
    pub fn held_share(&self) -> f64 {
        f64::from_bits(self.held_share.load(Ordering::Relaxed))
    }

    /// The window `idle_timeout = "auto"` chose last, if it did.
    pub fn auto_window(&self) -> Option<Window> {
        *self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the next busy period is expected, if the pool has a rhythm.
    pub fn next_busy(&self) -> Option<Instant> {
        self.gaps.lock().unwrap_or_else(|e| e.into_inner()).next_start()
    }

    /// Mark that a pre-warm was sent for the busy period expected at
    /// `next`; false if one already was.
    pub fn mark_prewarmed(&self, next: Instant) -> bool {
        let mut p = self.prewarmed_for.lock().unwrap_or_else(|e| e.into_inner());
        if *p == Some(next) {
            return false;
        }
        *p = Some(next);
        true
    }

    /// When the current wake started, if one is under way.
    pub fn waking_since(&self) -> Option<Instant> {
        match self.waking_since_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms - 1)),
        }
    }

    /// Start a wake at `now` unless one is under way; true if this call
    /// started it (single flight). Demand counted so far is spent.
    pub fn begin_wake(&self, now: Instant) -> bool {
        let ms = self.ms(now) + 1;
        let began = self.waking_since_ms.compare_exchange(0, ms, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if began {
            self.waking_from_light.store(self.is_light(), Ordering::Relaxed);
            self.demand.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.set_wake_error(None);
        }
        began
    }

    /// End the wake under way; `took` is how long it took if it succeeded.
    pub fn end_wake(&self, took: Option<Duration>) {
        if let Some(took) = took {
            let observed = saturating_micros(took);
            let (learned, seen) = if self.waking_from_light.load(Ordering::Relaxed) {
                (&self.expected_light_us, &self.light_observed)
            } else {
                (&self.expected_wake_us, &self.wake_observed)
            };
            let next = if seen.swap(true, Ordering::Relaxed) {
                ewma(learned.load(Ordering::Relaxed), observed)
            } else {
                // The first observation replaces the configured guess.
                observed
            };
            learned.store(next, Ordering::Relaxed);
        }
        self.waking_since_ms.store(0, Ordering::Release);
    }

    /// Record why the wake failed (a hook error, a give-up), or `None`
    /// once it goes well again.
    pub fn set_wake_error(&self, error: Option<String>) {
        *self.wake_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Set (or clear) the span of the wake under way.
    pub fn set_wake_span(&self, span: Option<([u8; 16], [u8; 8])>) {
        *self.wake_span.lock().unwrap_or_else(|e| e.into_inner()) = span;
    }

    /// The span of the wake under way, if it is traced.
    pub fn wake_span(&self) -> Option<([u8; 16], [u8; 8])> {
        *self.wake_span.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the last wake failed, if it did and no wake has gone well since.
    pub fn wake_error(&self) -> Option<String> {
        self.wake_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pool's condition as the admin API and the status page show it.
    pub fn condition(&self, warm: bool, scales: bool) -> &'static str {
        if warm {
            "warm"
        } else if self.wake_error.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            "wake_failed"
        } else if self.waking_since().is_some() {
            "waking"
        } else if scales {
            "cold"
        } else {
            "down"
        }
    }

    /// Expected time from wake call to a ready replica, from the depth the
    /// pool sleeps at (or, while it wakes, the one it wakes from).
    pub fn expected_wake(&self) -> Duration {
        let light = match self.waking_since() {
            Some(_) => self.waking_from_light.load(Ordering::Relaxed),
            None => self.is_light(),
        };
        if light {
            self.expected_light_wake()
        } else {
            self.expected_deep_wake()
        }
    }

    /// Expected wake from deep sleep (a cold start), learned.
    pub fn expected_deep_wake(&self) -> Duration {
        Duration::from_micros(self.expected_wake_us.load(Ordering::Relaxed))
    }

    /// Expected wake from light sleep, learned.
    pub fn expected_light_wake(&self) -> Duration {
        Duration::from_micros(self.expected_light_us.load(Ordering::Relaxed))
    }

    /// Seed the light wake time from the config (until one is observed).
    pub fn seed_light_wake(&self, wake_time: Duration) {
        if !self.light_observed.load(Ordering::Relaxed) {
            self.expected_light_us.store(saturating_micros(wake_time), Ordering::Relaxed);
        }
    }

    /// The depth the wake under way (or the last one) started from.
    pub fn wake_depth(&self) -> &'static str {
        if self.waking_from_light.load(Ordering::Relaxed) {
            "light"
        } else {
            "deep"
        }
    }

    /// Whether the pool sleeps lightly, as this edge sees it.
    pub fn is_light(&self) -> bool {
        self.light.load(Ordering::Acquire)
    }

    /// Note whether the pool sleeps lightly.
    pub fn set_light(&self, light: bool) {
        self.light.store(light, Ordering::Release);
    }

    /// The pool's depth as `/state` shows it.
    pub fn depth(&self, warm: bool) -> &'static str {
        if warm {
            "awake"
        } else if self.is_light() {
            "light"
        } else {
            "deep"
        }
    }

    /// Mean time a request holds a slot here.
    pub fn service_time(&self) -> Duration {
        Duration::from_micros(self.service_time_us.load(Ordering::Relaxed))
    }

    pub(super) fn observe_service_time(&self, took: Duration) {
        let took = saturating_micros(took);
        let _ = self.service_time_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| Some(ewma(prev, took)));
    }

    /// Record that a request was routed away from this pool at `now`
    /// because it was cold; true if that demand, with what the other edges
    /// of the cluster routed away, should wake it ([`crate::core::demand`]).
    pub fn routed_away(&self, now: Instant) -> bool {
        let elsewhere = self.elsewhere.routed_away.load(Ordering::Relaxed) as usize;
        self.demand.lock().unwrap_or_else(|e| e.into_inner()).routed_away_with(now, elsewhere)
    }

    /// Requests routed away from this pool while it slept, within the
    /// demand window (what this edge publishes to the cluster).
    pub fn routed_away_now(&self, now: Instant) -> u32 {
        self.demand.lock().unwrap_or_else(|e| e.into_inner()).count(now) as u32
    }

    /// Record what the other edges of the cluster publish for the pool at
    /// `now`. Requests there are activity here: the home edge does not put
    /// a pool to sleep under another edge's requests, and a busy period
    /// that starts elsewhere ends an idle gap (`learns_gaps`).
    pub fn set_elsewhere(&self, f: Figures, now: Instant, learns_gaps: bool) {
        let was_busy = self.elsewhere().busy();
        self.elsewhere.in_flight.store(f.in_flight, Ordering::Relaxed);
        self.elsewhere.held.store(f.held, Ordering::Relaxed);
        self.elsewhere.routed_away.store(f.routed_away, Ordering::Relaxed);
        if f.busy() {
            if !was_busy && learns_gaps && self.in_flight() == 0 {
                self.end_gap(now);
            }
            self.touch(now);
        }
    }

    /// Take in a health probe's connect and first-byte times; true if the
    /// smoothed RTT moved far enough from the one placement ranks by (a
    /// tenth, and half a millisecond) that the ranking should be redone.
    pub fn observe_rtt(&self, connect: Duration, first_byte: Duration) -> bool {
        let sample = saturating_micros(first_byte).max(1);
        self.rtt.last_connect_us.store(saturating_micros(connect), Ordering::Relaxed);
        self.rtt.last_first_byte_us.store(sample, Ordering::Relaxed);
        let first = self.rtt.samples.fetch_add(1, Ordering::Relaxed) == 0;
        let mut now = sample;
        let _ = self.rtt.smoothed_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| {
            now = if first || prev == 0 {
                sample
            } else {
                (prev as f64 * (1.0 - RTT_WEIGHT) + sample as f64 * RTT_WEIGHT) as u64
            };
            Some(now)
        });
        let ranked = self.rtt.ranked_us.load(Ordering::Relaxed);
        ranked == 0 || (now.abs_diff(ranked) > 500 && now.abs_diff(ranked) * 10 > ranked)
    }

    /// The smoothed RTT, once a probe has measured one.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt.smoothed_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The measured RTT as `/state` shows it.
    pub fn measured_rtt(&self) -> Option<MeasuredRtt> {
        let smoothed = self.rtt()?;
        Some(MeasuredRtt {
            smoothed,
            last_connect: Duration::from_micros(self.rtt.last_connect_us.load(Ordering::Relaxed)),
            last_first_byte: Duration::from_micros(self.rtt.last_first_byte_us.load(Ordering::Relaxed)),
            samples: self.rtt.samples.load(Ordering::Relaxed),
        })
    }

    /// Placement now ranks by `rtt` (microseconds).
    pub(super) fn mark_ranked(&self, rtt_us: u64) {
        self.rtt.ranked_us.store(rtt_us.max(1), Ordering::Relaxed);
    }

    /// Requests the other edges of the cluster hold for the pool.
    #[inline]
    pub fn held_elsewhere(&self) -> u32 {
        self.elsewhere.held.load(Ordering::Relaxed)
    }

    /// What the other edges of the cluster have for the pool, as last recorded.
    pub fn elsewhere(&self) -> Figures {
        Figures {
            in_flight: self.elsewhere.in_flight.load(Ordering::Relaxed),
            held: self.elsewhere.held.load(Ordering::Relaxed),
            routed_away: self.elsewhere.routed_away.load(Ordering::Relaxed),
        }
    }

    /// Mark that the sleep hook was called for this idle period; false if
    /// it already was.
    pub fn mark_slept(&self) -> bool {
        !self.slept.swap(true, Ordering::AcqRel)
    }

    /// Whether the sleep hook was called for the current idle period (no
    /// activity since).
    pub fn is_slept(&self) -> bool {
        self.slept.load(Ordering::Acquire)
    }

    /// Mark that the light sleep was called for this idle period; false if
    /// it already was.
    pub fn mark_light_slept(&self) -> bool {
        !self.light_slept.swap(true, Ordering::AcqRel)
    }

    /// Undo [`mark_light_slept`](Self::mark_light_slept).
    pub fn unmark_light_slept(&self) {
        self.light_slept.store(false, Ordering::Release);
    }

    /// Undo [`mark_slept`](Self::mark_slept): the sleep did not happen.
    pub fn unmark_slept(&self) {
        self.slept.store(false, Ordering::Release);
    }

    /// Whether the pool left the config.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub(super) fn set_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }
}

fn saturating_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ewma(prev: u64, observed: u64) -> u64 {
    (prev as f64 * (1.0 - EWMA_WEIGHT) + observed as f64 * EWMA_WEIGHT) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn wakes_are_single_flight_and_learned() {
        let t0 = Instant::now();
        let p = PoolState::new("p", 20 * S, t0);
        assert_eq!(p.expected_wake(), 20 * S);
        assert!(p.begin_wake(t0 + S));
        assert!(!p.begin_wake(t0 + 2 * S), "second wake while one is under way");
        assert_eq!(p.waking_since(), Some(t0 + S));
        p.end_wake(Some(10 * S));
        assert!(p.waking_since().is_none());
        assert_eq!(p.expected_wake(), 10 * S, "first observation replaces the guess");
        assert!(p.begin_wake(t0 + 20 * S));
        p.end_wake(Some(20 * S));
        assert_eq!(p.expected_wake(), 13 * S, "then an EWMA");
    }

    #[test]
    fn a_wake_spends_the_demand_counted_so_far() {
        let t0 = Instant::now();
        let p = PoolState::new("p", S, t0);
        assert!(!p.routed_away(t0));
        assert!(!p.routed_away(t0 + S));
        assert!(p.begin_wake(t0 + S));
        p.end_wake(None);
        assert!(!p.routed_away(t0 + 2 * S), "the count started afresh with the wake");
    }

    #[test]
    fn a_finished_wake_opens_an_idle_period_of_its_own() {
        let t0 = Instant::now();
        let p = PoolState::new("p", S, t0);
        p.touch(t0 + S);
        assert!(p.mark_slept(), "slept after the first busy period");
        // Woken with no request (demand that went elsewhere, a pre-warm):
        // it must be able to sleep again.
        assert!(p.begin_wake(t0 + 100 * S));
        p.end_wake(Some(3 * S));
        p.woke(t0 + 103 * S);
        assert_eq!(p.last_active(), t0 + 103 * S);
        assert!(p.mark_slept(), "a new idle period, with its own sleep");
        // The wake is not demand: the next request ends a gap measured
        // from the last request.
        p.end_gap(t0 + 200 * S);
        assert_eq!(p.gaps.lock().expect("gaps").window(S, S, 1000 * S).gaps, 1.0);
        // Wakes for demand served elsewhere make the next cheaper.
        assert_eq!(p.held_share(), 1.0);
        p.note_wake(false);
        assert!((p.held_share() - 0.7).abs() < 1e-9);
    }

    #[test]
    fn requests_at_other_edges_are_activity_and_demand_here() {
        let t0 = Instant::now();
        let p = PoolState::new("p", S, t0);
        p.touch(t0);
        assert!(p.mark_slept());
        let busy = Figures { in_flight: 2, held: 1, routed_away: 0 };
        p.set_elsewhere(busy, t0 + 30 * S, true);
        assert_eq!(p.last_active(), t0 + 30 * S, "the idle clock restarts");
        assert!(p.mark_slept(), "a new idle period");
        assert_eq!(p.elsewhere(), busy);
        // Two requests routed away elsewhere and one here wake the pool.
        p.set_elsewhere(Figures { routed_away: 2, ..Figures::default() }, t0 + 31 * S, true);
        assert_eq!(p.last_active(), t0 + 30 * S, "demand for a cold pool is not activity");
        assert!(p.routed_away(t0 + 32 * S));
    }

    #[test]
    fn the_measured_rtt_is_smoothed_and_asks_for_a_new_ranking_when_it_moves() {
        let p = PoolState::new("p", S, Instant::now());
        let ms = Duration::from_millis;
        assert_eq!(p.rtt(), None);
        assert!(p.observe_rtt(ms(1), ms(40)), "the first sample ranks");
        assert_eq!(p.rtt(), Some(ms(40)));
        p.mark_ranked(40_000);
        assert!(!p.observe_rtt(ms(1), ms(42)), "a small move does not re-rank");
        assert_eq!(p.rtt(), Some(Duration::from_micros(40_400)));
        for _ in 0..5 {
            p.observe_rtt(ms(1), ms(10));
        }
        assert!(p.observe_rtt(ms(1), ms(10)), "a large one does");
        let m = p.measured_rtt().expect("measured");
        assert_eq!((m.last_connect, m.last_first_byte, m.samples), (ms(1), ms(10), 8));
    }

    #[test]
    fn the_idle_clock_moves_forward_only_and_reopens_the_sleep() {
        let t0 = Instant::now();
        let p = PoolState::new("p", S, t0);
        p.touch(t0 + 10 * S);
        p.touch(t0 + 5 * S);
        assert_eq!(p.last_active(), t0 + 10 * S);
        assert!(p.mark_slept());
        assert!(!p.mark_slept(), "once per idle period");
        p.touch(t0 + 11 * S);
        assert!(p.mark_slept(), "activity starts a new idle period");
    }
}
