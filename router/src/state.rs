//! Live state of pools and replicas: readiness, in-flight counts, reported
//! load. Lock-free counters read by the request path; state is keyed by pool
//! id and replica address so that it survives config reloads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use stoke_config::{PoolId, Snapshot};

/// One replica's counters.
#[derive(Debug)]
pub struct ReplicaState {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Text form of `addr`, for headers and logs (made once).
    pub addr_text: Arc<str>,
    ready: AtomicBool,
    in_flight: AtomicU32,
    /// Requests the replica itself reports running plus waiting, from its
    /// metrics (0 if not scraped).
    reported_load: AtomicU32,
    /// Our own in-flight count when that report was taken, to tell our load
    /// from other edges'.
    in_flight_at_report: AtomicU32,
}

impl ReplicaState {
    fn new(addr: SocketAddr) -> Self {
        ReplicaState {
            addr,
            addr_text: addr.to_string().into(),
            // Not ready until a probe says so: a scaled-to-zero pool must
            // not look warm. The edge probes every replica once before it
            // starts accepting, and at once after a reload adds one.
            ready: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            reported_load: AtomicU32::new(0),
            in_flight_at_report: AtomicU32::new(0),
        }
    }

    /// Whether the replica takes new requests.
    #[inline]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Mark ready or not; returns the previous value.
    pub fn set_ready(&self, ready: bool) -> bool {
        self.ready.swap(ready, Ordering::Relaxed)
    }

    /// Requests this edge has in flight on the replica.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Load other edges put on the replica, as far as its own metrics tell.
    #[inline]
    pub fn foreign_load(&self) -> u32 {
        self.reported_load.load(Ordering::Relaxed).saturating_sub(self.in_flight_at_report.load(Ordering::Relaxed))
    }

    /// Record the running + waiting count the replica reported.
    pub fn set_reported_load(&self, load: u32) {
        self.in_flight_at_report.store(self.in_flight(), Ordering::Relaxed);
        self.reported_load.store(load, Ordering::Relaxed);
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

    /// Take a slot if fewer than `max` requests are in flight here.
    fn try_acquire(&self, max: u32) -> bool {
        let foreign = self.foreign_load();
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n.saturating_add(foreign) < max).then_some(n + 1))
            .is_ok()
    }

    fn release(&self) {
        // Never below zero, even if a bug released twice.
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// Per-pool state that outlives any one config snapshot.
#[derive(Debug)]
pub struct PoolState {
    /// The pool's id.
    pub id: Arc<str>,
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` of the last time a request ended or
    /// started here: the idle clock.
    last_active_ms: AtomicU64,
    epoch: Instant,
}

impl PoolState {
    fn new(id: &str) -> Self {
        PoolState {
            id: id.into(),
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Requests this edge has in flight on the pool (streams included).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// When a request last started or ended on this pool.
    pub fn last_active(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.fetch_max(ms, Ordering::Relaxed);
    }
}

/// A pool as the request path sees it under one snapshot: its long-lived
/// state and its replicas in config order.
#[derive(Debug)]
pub struct PoolView {
    /// State shared with other snapshots.
    pub state: Arc<PoolState>,
    /// Replica states, in the order of the pool's `replicas` key.
    pub replicas: Box<[Arc<ReplicaState>]>,
}

impl PoolView {
    /// Free slots over ready replicas.
    pub fn free_slots(&self, max_concurrency: u32) -> u32 {
        self.replicas.iter().map(|r| r.free_slots(max_concurrency)).sum()
    }

    /// Ready replicas.
    pub fn ready_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.is_ready()).count()
    }
}

/// A snapshot with the state of its pools: what a request runs against,
/// from start to end, even if a reload happens meanwhile.
#[derive(Debug)]
pub struct Live {
    /// Increases by one with every successful load.
    pub version: u64,
    /// The compiled config for this edge.
    pub snapshot: Arc<Snapshot>,
    /// Pools by [`PoolId`].
    pub pools: Box<[PoolView]>,
}

impl Live {
    /// A pool's view.
    #[inline]
    pub fn pool(&self, id: PoolId) -> &PoolView {
        &self.pools[id.index()]
    }
}

/// A replica's identity across snapshots: its pool's id and its address.
type ReplicaKey = (Arc<str>, SocketAddr);

/// Where pool and replica states live between snapshots.
#[derive(Debug, Default)]
pub struct StateStore {
    pools: Mutex<HashMap<Arc<str>, Arc<PoolState>>>,
    replicas: Mutex<HashMap<ReplicaKey, Arc<ReplicaState>>>,
}

impl StateStore {
    /// Bind `snapshot` to states: existing ones for pool ids and replica
    /// addresses seen before, new ones otherwise. States of pools and
    /// replicas that are gone are forgotten (in-flight requests keep theirs
    /// alive through their own references).
    pub fn bind(&self, version: u64, snapshot: Arc<Snapshot>) -> Live {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let mut next_pools = HashMap::new();
        let mut next_replicas = HashMap::new();
        let views = snapshot
            .network
            .pools
            .iter()
            .map(|pool| {
                let state = pools.get(pool.id.as_str()).cloned().unwrap_or_else(|| Arc::new(PoolState::new(&pool.id)));
                next_pools.insert(state.id.clone(), state.clone());
                let reps = pool
                    .replicas
                    .iter()
                    .map(|&addr| {
                        let key = (state.id.clone(), addr);
                        let r = replicas.get(&key).cloned().unwrap_or_else(|| Arc::new(ReplicaState::new(addr)));
                        next_replicas.insert(key, r.clone());
                        r
                    })
                    .collect();
                PoolView { state, replicas: reps }
            })
            .collect();
        *pools = next_pools;
        *replicas = next_replicas;
        Live { version, snapshot, pools: views }
    }
}

/// An in-flight slot on a replica: taken when a request is forwarded,
/// released when dropped — whichever way the request ends.
#[derive(Debug)]
pub struct Slot {
    pool: Arc<PoolState>,
    replica: Arc<ReplicaState>,
}

impl Slot {
    /// Take a slot on `replica` of `pool` if it has room under `max`.
    pub fn try_acquire(pool: &Arc<PoolState>, replica: &Arc<ReplicaState>, max: u32) -> Option<Slot> {
        if !replica.try_acquire(max) {
            return None;
        }
        pool.in_flight.fetch_add(1, Ordering::AcqRel);
        pool.touch();
        Some(Slot { pool: pool.clone(), replica: replica.clone() })
    }

    /// The replica this slot is on.
    pub fn replica(&self) -> &Arc<ReplicaState> {
        &self.replica
    }

    /// The pool this slot is on.
    pub fn pool(&self) -> &Arc<PoolState> {
        &self.pool
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.replica.release();
        let _ = self.pool.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
        self.pool.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_exactly_and_never_exceed_max() {
        let pool = Arc::new(PoolState::new("p"));
        let r = Arc::new(ReplicaState::new("127.0.0.1:1".parse().expect("addr")));
        let a = Slot::try_acquire(&pool, &r, 2).expect("first");
        let b = Slot::try_acquire(&pool, &r, 2).expect("second");
        assert!(Slot::try_acquire(&pool, &r, 2).is_none());
        assert_eq!((r.in_flight(), pool.in_flight()), (2, 2));
        drop(a);
        assert_eq!((r.in_flight(), pool.in_flight()), (1, 1));
        drop(b);
        assert_eq!((r.in_flight(), pool.in_flight()), (0, 0));
    }

    #[test]
    fn foreign_load_counts_against_capacity() {
        let pool = Arc::new(PoolState::new("p"));
        let r = Arc::new(ReplicaState::new("127.0.0.1:1".parse().expect("addr")));
        r.set_ready(true);
        let _mine = Slot::try_acquire(&pool, &r, 4).expect("slot");
        // The replica reports 3 busy, one of which is ours: two are foreign.
        r.set_reported_load(3);
        assert_eq!(r.foreign_load(), 2);
        assert_eq!(r.free_slots(4), 1);
        let _second = Slot::try_acquire(&pool, &r, 4).expect("one left");
        assert!(Slot::try_acquire(&pool, &r, 4).is_none());
    }

    #[test]
    fn unready_replicas_have_no_free_slots() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        r.set_ready(false);
        assert_eq!(r.free_slots(8), 0);
    }
}
