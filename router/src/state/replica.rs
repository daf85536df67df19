//! One replica's counters: readiness, this edge's in-flight count and the
//! load the replica itself reports. Lock-free; read on every request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::core::pick::ReplicaLoad;

/// One replica's counters.
#[derive(Debug)]
pub struct ReplicaState {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Text form of `addr`, for headers and logs (made once).
    pub addr_text: Arc<str>,
    ready: AtomicBool,
    /// Whether the replica sleeps lightly: it answers, and says it sleeps
    /// (vLLM's `/is_sleeping`), or this edge just put it to light sleep.
    asleep: AtomicBool,
    /// Set while a light sleep call to the replica is under way: probes do
    /// not put it back in rotation meanwhile.
    entering_sleep: AtomicBool,
    in_flight: AtomicU32,
    /// Requests the replica itself reports running plus waiting, from its
    /// metrics (0 if not scraped).
    reported_load: AtomicU32,
    /// Our own in-flight count when that report was taken, to tell our load
    /// from other edges'.
    in_flight_at_report: AtomicU32,
    /// What the cluster said the other edges had in flight here when that
    /// report was taken: the rest of the report is load no edge accounts
    /// for (clients that bypass the edges).
    elsewhere_at_report: AtomicU32,
    /// Requests the other edges of the cluster say they have in flight on
    /// the replica (fresh reports only; 0 without a cluster).
    elsewhere: AtomicU32,
    /// Load others put here, from the sources above: worked out when one
    /// changes, so that the request path reads one number.
    foreign: AtomicU32,
}

impl ReplicaState {
    /// A replica at `addr`, not ready until a probe says so: a
    /// scaled-to-zero pool must not look warm. The edge probes every
    /// replica once before it starts accepting, and at once after a reload
    /// adds one.
    pub fn new(addr: SocketAddr) -> Self {
        ReplicaState {
            addr,
            addr_text: addr.to_string().into(),
            ready: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            entering_sleep: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            reported_load: AtomicU32::new(0),
            in_flight_at_report: AtomicU32::new(0),
            elsewhere_at_report: AtomicU32::new(0),
            elsewhere: AtomicU32::new(0),
            foreign: AtomicU32::new(0),
        }
    }

    /// Whether the replica takes new requests.
    #[inline]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Mark ready or not; returns the previous value. Sequentially
    /// consistent with [`try_acquire`](Self::try_acquire): a replica taken
    /// out of rotation either refuses a slot being taken at that moment or
    /// shows it in its in-flight count (the sleeper looks at both).
    pub fn set_ready(&self, ready: bool) -> bool {
        self.ready.swap(ready, Ordering::SeqCst)
    }

    /// Whether the replica sleeps lightly.
    pub fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::Acquire)
    }

    /// Mark the replica lightly asleep or not; returns the previous value.
    pub fn set_asleep(&self, asleep: bool) -> bool {
        self.asleep.swap(asleep, Ordering::AcqRel)
    }

    /// Whether a light sleep call to the replica is under way.
    pub fn is_entering_sleep(&self) -> bool {
        self.entering_sleep.load(Ordering::Acquire)
    }

    /// Mark a light sleep call under way, or over.
    pub fn set_entering_sleep(&self, on: bool) {
        self.entering_sleep.store(on, Ordering::Release);
    }

    /// Requests in flight, as [`set_ready`](Self::set_ready) orders them.
    pub fn in_flight_now(&self) -> u32 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Requests this edge has in flight on the replica.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Load others put on the replica: what the other edges of the cluster
    /// publish (fresh within milliseconds), plus what the replica's own
    /// metrics reported beyond this edge's and the cluster's counts at the
    /// time (as old as the last scrape). Without a cluster it is what the
    /// metrics reported beyond ours.
    #[inline]
    pub fn foreign_load(&self) -> u32 {
        self.foreign.load(Ordering::Relaxed)
    }

    /// Record what the other edges of the cluster have in flight here.
    pub fn set_elsewhere(&self, n: u32) {
        self.elsewhere.store(n, Ordering::Relaxed);
        self.update_foreign();
    }

    fn update_foreign(&self) {
        // A scrape is up to an interval old: the other edges' share of it
        // may have finished since, so that share comes from the cluster's
        // fresher count instead. And the cluster hears of a request a few
        // milliseconds after the replica does: when its count rose since
        // the scrape, the scrape's unaccounted requests are taken to be
        // those, not counted twice.
        let (now, then) = (self.elsewhere.load(Ordering::Relaxed), self.elsewhere_at_report.load(Ordering::Relaxed));
        let unaccounted = self
            .reported_load
            .load(Ordering::Relaxed)
            .saturating_sub(self.in_flight_at_report.load(Ordering::Relaxed))
            .saturating_sub(then)
            .saturating_sub(now.saturating_sub(then));
        self.foreign.store(now.saturating_add(unaccounted), Ordering::Relaxed);
    }

    /// What the other edges of the cluster have in flight here, as last
    /// recorded.
    pub fn elsewhere(&self) -> u32 {
        self.elsewhere.load(Ordering::Relaxed)
    }

    /// The running + waiting count the replica reported last.
    pub fn reported_load(&self) -> u32 {
        self.reported_load.load(Ordering::Relaxed)
    }

    /// Record the running + waiting count the replica reported.
    pub fn set_reported_load(&self, load: u32) {
        self.in_flight_at_report.store(self.in_flight(), Ordering::Relaxed);
        self.elsewhere_at_report.store(self.elsewhere(), Ordering::Relaxed);
        self.reported_load.store(load, Ordering::Relaxed);
        self.update_foreign();
    }

    /// Requests the replica is busy with, ours and others'.
    #[inline]
    pub fn load(&self) -> u32 {
        self.in_flight().saturating_add(self.foreign_load())
    }

    /// Free slots under `max`: zero when not ready.
    #[inline]
    pub fn free_slots(&self, max: u32) -> u32 {
        if self.is_ready() {
            max.saturating_sub(self.load())
        } else {
            0
        }
    }

    /// Take a slot if the replica is ready and fewer than `max` requests
    /// are in flight here.
    pub(crate) fn try_acquire(&self, max: u32) -> bool {
        let foreign = self.foreign_load();
        let taken = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::Relaxed, |n| (n.saturating_add(foreign) < max).then_some(n + 1))
            .is_ok();
        // Taken out of rotation (a sleep, a failed connection) between the
        // pick and now: give the slot back.
        if taken && !self.ready.load(Ordering::SeqCst) {
            self.release();
            return false;
        }
        taken
    }

    pub(super) fn release(&self) {
        // Never below zero, even if a bug released twice.
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

impl ReplicaLoad for ReplicaState {
    #[inline]
    fn free(&self, max: u32) -> u32 {
        self.free_slots(max)
    }
    #[inline]
    fn busy(&self) -> u32 {
        self.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unready_replicas_have_no_free_slots() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        assert_eq!(r.free_slots(8), 0, "not ready until probed");
        r.set_ready(true);
        assert_eq!(r.free_slots(8), 8);
    }

    #[test]
    fn a_replica_out_of_rotation_gives_no_slot_even_to_a_request_that_picked_it() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        r.set_ready(true);
        // A request picked it (ready), then the sleeper took it out.
        r.set_ready(false);
        assert!(!r.try_acquire(4));
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn foreign_load_is_what_the_replica_reports_beyond_ours() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        r.set_ready(true);
        assert!(r.try_acquire(4));
        // The replica reports 3 busy, one of which is ours: two are foreign.
        r.set_reported_load(3);
        assert_eq!(r.foreign_load(), 2);
        assert_eq!(r.free_slots(4), 1);
        assert!(r.try_acquire(4));
        assert!(!r.try_acquire(4));
        r.release();
        r.release();
        r.release();
        assert_eq!(r.in_flight(), 0, "never below zero");
    }

    #[test]
    fn the_cluster_view_counts_when_it_sees_more_than_the_metrics() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        r.set_ready(true);
        r.set_reported_load(1);
        r.set_elsewhere(3);
        assert_eq!(r.foreign_load(), 3, "the cluster is fresher than a scrape");
        assert_eq!(r.free_slots(4), 1);
        r.set_elsewhere(0);
        assert_eq!(r.foreign_load(), 1, "and the scrape counts without it");
    }

    #[test]
    fn a_scrape_counts_only_the_load_that_no_edge_of_the_cluster_accounts_for() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        r.set_ready(true);
        assert!(r.try_acquire(8));
        // Another edge has 3 here; the replica reports them, ours, and one
        // request from a client that bypasses the edges.
        r.set_elsewhere(3);
        r.set_reported_load(5);
        assert_eq!(r.foreign_load(), 4);
        // The other edge's requests finish before the next scrape: the
        // cluster says so at once, and the stale scrape does not keep them.
        r.set_elsewhere(0);
        assert_eq!(r.foreign_load(), 1, "only the bypassing client's request is left");
        r.release();
    }

    #[test]
    fn a_request_the_scrape_saw_before_the_cluster_did_is_counted_once() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        r.set_ready(true);
        // The replica already counts another edge's new request; that
        // edge's report has not come yet.
        r.set_reported_load(1);
        assert_eq!(r.foreign_load(), 1);
        r.set_elsewhere(1);
        assert_eq!(r.foreign_load(), 1, "the report names the same request");
        r.set_elsewhere(2);
        assert_eq!(r.foreign_load(), 2);
    }
}
