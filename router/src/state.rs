//! Live state of pools and replicas: readiness, in-flight counts, reported
//! load. Lock-free counters read by the request path; state is keyed by pool
//! id and replica address so that it survives config reloads.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stoke_config::{PoolId, Snapshot};
use tokio::sync::{oneshot, Notify};

use crate::pick::pick;

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

/// Seed of the mean time a request holds a slot, before any is observed.
/// Inference requests take seconds; one second errs towards holding less.
pub const SERVICE_TIME_SEED: Duration = Duration::from_secs(1);

/// Weight of a new observation in the learned wake and service times.
pub const EWMA_WEIGHT: f64 = 0.3;

/// Per-pool state that outlives any one config snapshot.
#[derive(Debug)]
pub struct PoolState {
    /// The pool's id.
    pub id: Arc<str>,
    in_flight: AtomicU32,
    /// Milliseconds since `epoch` of the last time a request started or
    /// ended here, or the replicas reported load: the idle clock.
    last_active_ms: AtomicU64,
    epoch: Instant,
    /// Requests held for a slot, first come first served.
    pub queue: HoldQueue,
    /// 0 when not waking; else milliseconds since `epoch` + 1 of the wake's start.
    waking_since_ms: AtomicU64,
    /// Learned wake time, microseconds (EWMA of observed wakes).
    expected_wake_us: AtomicU64,
    wake_observed: AtomicBool,
    /// Learned time a request holds a slot, microseconds.
    service_time_us: AtomicU64,
    /// Whether the sleep hook was called for the current idle period.
    slept: AtomicBool,
    /// Times requests were routed away from this pool while it was cold.
    demand: Mutex<VecDeque<Instant>>,
    /// Set when the pool left the config: held requests are answered.
    removed: AtomicBool,
    /// Requests this edge sent to the pool, ever.
    routed: AtomicU64,
}

impl PoolState {
    fn new(id: &str, wake_time: Duration) -> Self {
        PoolState {
            id: id.into(),
            in_flight: AtomicU32::new(0),
            last_active_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            queue: HoldQueue::default(),
            waking_since_ms: AtomicU64::new(0),
            expected_wake_us: AtomicU64::new(wake_time.as_micros() as u64),
            wake_observed: AtomicBool::new(false),
            service_time_us: AtomicU64::new(SERVICE_TIME_SEED.as_micros() as u64),
            slept: AtomicBool::new(false),
            demand: Mutex::new(VecDeque::new()),
            removed: AtomicBool::new(false),
            routed: AtomicU64::new(0),
        }
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

    /// Mark activity now: the pool is not idle.
    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.fetch_max(ms, Ordering::Relaxed);
        self.slept.store(false, Ordering::Relaxed);
    }

    /// When the current wake started, if one is under way.
    pub fn waking_since(&self) -> Option<Instant> {
        match self.waking_since_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(self.epoch + Duration::from_millis(ms - 1)),
        }
    }

    /// Start a wake unless one is under way; true if this call started it
    /// (single flight).
    pub fn begin_wake(&self) -> bool {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.waking_since_ms.compare_exchange(0, ms, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// End the wake under way; `took` is how long it took if it succeeded.
    pub fn end_wake(&self, took: Option<Duration>) {
        if let Some(took) = took {
            let observed = took.as_micros() as u64;
            let next = if self.wake_observed.swap(true, Ordering::Relaxed) {
                ewma(self.expected_wake_us.load(Ordering::Relaxed), observed)
            } else {
                // The first observation replaces the configured guess.
                observed
            };
            self.expected_wake_us.store(next, Ordering::Relaxed);
        }
        self.waking_since_ms.store(0, Ordering::Release);
    }

    /// Expected time from wake call to a ready replica.
    pub fn expected_wake(&self) -> Duration {
        Duration::from_micros(self.expected_wake_us.load(Ordering::Relaxed))
    }

    /// Mean time a request holds a slot here.
    pub fn service_time(&self) -> Duration {
        Duration::from_micros(self.service_time_us.load(Ordering::Relaxed))
    }

    fn observe_service_time(&self, took: Duration) {
        let took = took.as_micros() as u64;
        let _ = self.service_time_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| Some(ewma(prev, took)));
    }

    /// Record that a request was routed away from this pool because it was
    /// cold; returns how many such requests fell within `window`.
    pub fn record_demand(&self, now: Instant, window: Duration) -> usize {
        let mut d = self.demand.lock().unwrap_or_else(|e| e.into_inner());
        while d.front().is_some_and(|t| now.duration_since(*t) > window) {
            d.pop_front();
        }
        d.push_back(now);
        // Bounded: only the count within the window matters.
        if d.len() > 64 {
            d.pop_front();
        }
        d.len()
    }

    /// Forget recorded demand (after a wake starts).
    pub fn clear_demand(&self) {
        self.demand.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Mark that the sleep hook was called for this idle period; false if
    /// it already was.
    pub fn mark_slept(&self) -> bool {
        !self.slept.swap(true, Ordering::AcqRel)
    }

    /// Whether the pool left the config.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

fn ewma(prev: u64, observed: u64) -> u64 {
    (prev as f64 * (1.0 - EWMA_WEIGHT) + observed as f64 * EWMA_WEIGHT) as u64
}

/// Requests held for a pool: a bounded FIFO. Slots that free up are handed
/// to the head of the queue, so that a held request is never overtaken by
/// one that arrived later.
#[derive(Debug, Default)]
pub struct HoldQueue {
    waiters: Mutex<VecDeque<(u64, oneshot::Sender<Slot>)>>,
    len: AtomicU32,
    next_id: AtomicU64,
    /// Notified when held requests must give up at once (pool removed).
    closed: Notify,
}

impl HoldQueue {
    /// Requests held now.
    #[inline]
    pub fn len(&self) -> u32 {
        self.len.load(Ordering::Acquire)
    }

    /// Whether nothing is held.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&self, max: u32) -> Option<(u64, oneshot::Receiver<Slot>)> {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= max as usize {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        w.push_back((id, tx));
        self.len.store(w.len() as u32, Ordering::Release);
        Some((id, rx))
    }

    fn pop(&self) -> Option<oneshot::Sender<Slot>> {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let front = w.pop_front().map(|(_, tx)| tx);
        self.len.store(w.len() as u32, Ordering::Release);
        front
    }

    fn remove(&self, id: u64) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = w.iter().position(|(i, _)| *i == id) {
            w.remove(i);
        }
        self.len.store(w.len() as u32, Ordering::Release);
    }
}

/// A pool as the request path sees it under one snapshot: its long-lived
/// state, its replicas in config order and its limits.
#[derive(Debug)]
pub struct PoolView {
    /// State shared with other snapshots.
    pub state: Arc<PoolState>,
    /// Replica states, in the order of the pool's `replicas` key.
    pub replicas: Box<[Arc<ReplicaState>]>,
    /// Requests one replica takes at once.
    pub max_concurrency: u32,
    /// Requests held at most.
    pub max_queue: u32,
    /// The pool id as a metric label (shared, so labelling allocates nothing).
    pub label: metrics::SharedString,
}

impl PoolView {
    /// A pool view outside any snapshot (for benches and tests): replicas
    /// on `replicas` loopback ports, none ready yet.
    pub fn detached(replicas: usize, max_concurrency: u32, max_queue: u32) -> Self {
        PoolView {
            label: metrics::SharedString::const_str("detached"),
            state: Arc::new(PoolState::new("detached", Duration::from_secs(1))),
            replicas: (0..replicas)
                .map(|i| Arc::new(ReplicaState::new(SocketAddr::from(([127, 0, 0, 1], 1 + i as u16)))))
                .collect(),
            max_concurrency,
            max_queue,
        }
    }

    /// Free slots over ready replicas.
    pub fn free_slots(&self) -> u32 {
        self.replicas.iter().map(|r| r.free_slots(self.max_concurrency)).sum()
    }

    /// Slots over ready replicas, taken or not.
    pub fn ready_slots(&self) -> u32 {
        self.ready_count() as u32 * self.max_concurrency
    }

    /// Ready replicas.
    pub fn ready_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.is_ready()).count()
    }

    /// Whether a replica is ready.
    pub fn is_warm(&self) -> bool {
        self.replicas.iter().any(|r| r.is_ready())
    }

    /// Take a slot on a replica (power of two choices); `None` if every
    /// ready replica is full.
    pub fn acquire(self: &Arc<Self>) -> Option<Slot> {
        // Another request may take the last slot between the pick and the
        // acquire; a few tries settle it without a lock.
        for _ in 0..4 {
            let i = pick(&self.replicas, self.max_concurrency, |n| fastrand::usize(0..n))?;
            let replica = &self.replicas[i];
            if replica.try_acquire(self.max_concurrency) {
                self.state.in_flight.fetch_add(1, Ordering::AcqRel);
                self.state.routed.fetch_add(1, Ordering::Relaxed);
                self.state.touch();
                return Some(Slot {
                    view: self.clone(),
                    replica: replica.clone(),
                    taken: Instant::now(),
                    dispatch_on_drop: true,
                });
            }
        }
        None
    }

    /// Hand free slots to held requests, first come first served. Called
    /// whenever capacity may have appeared: a slot freed, a replica became
    /// ready, a reload.
    pub fn dispatch(self: &Arc<Self>) {
        while !self.state.queue.is_empty() {
            let Some(mut slot) = self.acquire() else { return };
            // A slot handed back below must not dispatch recursively.
            slot.dispatch_on_drop = false;
            match self.state.queue.pop() {
                // If the request gave up between pop and send, the slot
                // comes back here and is released; the loop goes on.
                Some(tx) => drop(tx.send(slot)),
                None => return,
            }
        }
    }

    /// Hold a request until a slot is handed to it; `None` if the queue is
    /// full. Dropping the ticket leaves the queue.
    pub fn hold(self: &Arc<Self>) -> Option<Ticket> {
        let (id, rx) = self.state.queue.push(self.max_queue)?;
        let ticket = Ticket { view: self.clone(), id, rx };
        // Capacity may have appeared between the decision and the push.
        self.dispatch();
        Some(ticket)
    }

    /// Answer every held request at once (the pool left the config).
    pub fn close(&self) {
        self.state.removed.store(true, Ordering::Release);
        self.state.queue.closed.notify_waiters();
        while let Some(tx) = self.state.queue.pop() {
            drop(tx);
        }
    }
}

/// A place in a pool's hold queue.
#[derive(Debug)]
pub struct Ticket {
    view: Arc<PoolView>,
    id: u64,
    rx: oneshot::Receiver<Slot>,
}

impl Ticket {
    /// Wait for a slot; `None` if the pool was removed.
    pub async fn slot(&mut self) -> Option<Slot> {
        let closed = self.view.state.queue.closed.notified();
        tokio::select! {
            s = &mut self.rx => s.ok().map(|mut s| {
                s.dispatch_on_drop = true;
                s
            }),
            _ = closed => None,
        }
    }

    /// The pool this ticket waits for.
    pub fn view(&self) -> &Arc<PoolView> {
        &self.view
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.view.state.queue.remove(self.id);
        // A slot handed over but never taken goes back, and on to the next
        // held request.
        if let Ok(mut slot) = self.rx.try_recv() {
            slot.dispatch_on_drop = true;
        }
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
    pub pools: Box<[Arc<PoolView>]>,
    /// Route names as metric labels, by route index.
    pub route_labels: Box<[metrics::SharedString]>,
    /// API keys of routes with `auth`, by route index.
    pub route_keys: Box<[Option<crate::access::KeySet>]>,
}

impl Live {
    /// A pool's view.
    #[inline]
    pub fn pool(&self, id: PoolId) -> &Arc<PoolView> {
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
    /// addresses seen before, new ones otherwise. Returns the new live view
    /// and the states of pools that left the config.
    pub fn bind(&self, version: u64, snapshot: Arc<Snapshot>) -> (Live, Vec<Arc<PoolState>>) {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let mut next_pools = HashMap::new();
        let mut next_replicas = HashMap::new();
        let views = snapshot
            .network
            .pools
            .iter()
            .map(|pool| {
                let wake_time = pool.scale.as_ref().map_or(Duration::ZERO, |s| s.wake_time);
                let state = pools
                    .get(pool.id.as_str())
                    .cloned()
                    .unwrap_or_else(|| Arc::new(PoolState::new(&pool.id, wake_time)));
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
                Arc::new(PoolView {
                    label: metrics::SharedString::from(state.id.clone()),
                    state,
                    replicas: reps,
                    max_concurrency: pool.max_concurrency,
                    max_queue: pool.max_queue,
                })
            })
            .collect();
        let removed = pools.iter().filter(|(id, _)| !next_pools.contains_key(*id)).map(|(_, s)| s.clone()).collect();
        *pools = next_pools;
        *replicas = next_replicas;
        let route_labels = snapshot
            .network
            .routes
            .iter()
            .map(|r| metrics::SharedString::from(Arc::<str>::from(r.name.as_str())))
            .collect();
        let route_keys =
            snapshot.network.routes.iter().map(|r| r.auth.as_ref().map(crate::access::KeySet::new)).collect();
        (Live { version, snapshot, pools: views, route_labels, route_keys }, removed)
    }
}

/// An in-flight slot on a replica: taken when a request is forwarded,
/// released when dropped — whichever way the request ends — and then
/// handed to the next held request, if any.
#[derive(Debug)]
pub struct Slot {
    view: Arc<PoolView>,
    replica: Arc<ReplicaState>,
    taken: Instant,
    dispatch_on_drop: bool,
}

impl Slot {
    /// The replica this slot is on.
    pub fn replica(&self) -> &Arc<ReplicaState> {
        &self.replica
    }

    /// The pool this slot is on.
    pub fn pool(&self) -> &Arc<PoolState> {
        &self.view.state
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.replica.release();
        let pool = &self.view.state;
        let _ = pool.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
        pool.observe_service_time(self.taken.elapsed());
        pool.touch();
        if self.dispatch_on_drop && !pool.queue.is_empty() {
            self.view.dispatch();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(replicas: usize, max: u32, max_queue: u32) -> Arc<PoolView> {
        let reps = (0..replicas)
            .map(|i| {
                let r = Arc::new(ReplicaState::new(SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16))));
                r.set_ready(true);
                r
            })
            .collect();
        Arc::new(PoolView {
            label: metrics::SharedString::const_str("p"),
            state: Arc::new(PoolState::new("p", Duration::from_secs(20))),
            replicas: reps,
            max_concurrency: max,
            max_queue,
        })
    }

    #[test]
    fn slots_count_exactly_and_never_exceed_max() {
        let v = view(1, 2, 4);
        let a = v.acquire().expect("first");
        let b = v.acquire().expect("second");
        assert!(v.acquire().is_none());
        assert_eq!((v.replicas[0].in_flight(), v.state.in_flight()), (2, 2));
        drop(a);
        assert_eq!((v.replicas[0].in_flight(), v.state.in_flight()), (1, 1));
        drop(b);
        assert_eq!((v.replicas[0].in_flight(), v.state.in_flight()), (0, 0));
    }

    #[test]
    fn foreign_load_counts_against_capacity() {
        let v = view(1, 4, 4);
        let r = &v.replicas[0];
        let _mine = v.acquire().expect("slot");
        // The replica reports 3 busy, one of which is ours: two are foreign.
        r.set_reported_load(3);
        assert_eq!(r.foreign_load(), 2);
        assert_eq!(r.free_slots(4), 1);
        let _second = v.acquire().expect("one left");
        assert!(v.acquire().is_none());
    }

    #[test]
    fn unready_replicas_have_no_free_slots() {
        let r = ReplicaState::new("127.0.0.1:1".parse().expect("addr"));
        assert_eq!(r.free_slots(8), 0, "not ready until probed");
        r.set_ready(true);
        assert_eq!(r.free_slots(8), 8);
    }

    #[tokio::test]
    async fn freed_slots_go_to_held_requests_in_order() {
        let v = view(1, 1, 8);
        let first = v.acquire().expect("slot");
        let mut t1 = v.hold().expect("queued");
        let mut t2 = v.hold().expect("queued");
        assert_eq!(v.state.queue.len(), 2);
        // Nobody may overtake the queue: the pool has no free slot.
        assert!(v.acquire().is_none());
        drop(first);
        let s1 = t1.slot().await.expect("first in line gets the slot");
        assert_eq!(v.state.queue.len(), 1);
        drop(s1);
        let s2 = t2.slot().await.expect("then the second");
        assert_eq!(v.state.queue.len(), 0);
        drop(s2);
        assert_eq!(v.state.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_request_that_leaves_the_queue_frees_its_place() {
        let v = view(1, 1, 8);
        let first = v.acquire().expect("slot");
        let t1 = v.hold().expect("queued");
        let mut t2 = v.hold().expect("queued");
        drop(t1); // client gone
        assert_eq!(v.state.queue.len(), 1);
        drop(first);
        assert!(t2.slot().await.is_some());
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_request_that_left_moves_on() {
        let v = view(1, 1, 8);
        let first = v.acquire().expect("slot");
        let t1 = v.hold().expect("queued");
        let mut t2 = v.hold().expect("queued");
        drop(first); // handed to t1, which never takes it
        drop(t1);
        let s = t2.slot().await.expect("the slot moved on to t2");
        drop(s);
        assert_eq!((v.state.in_flight(), v.replicas[0].in_flight()), (0, 0));
    }

    #[test]
    fn the_queue_is_bounded() {
        let v = view(1, 1, 2);
        let _s = v.acquire();
        let _a = v.hold().expect("1");
        let _b = v.hold().expect("2");
        assert!(v.hold().is_none(), "a full queue refuses at once");
    }

    #[tokio::test]
    async fn closing_answers_held_requests() {
        let v = view(1, 1, 8);
        let _s = v.acquire();
        let mut t = v.hold().expect("queued");
        v.close();
        assert!(t.slot().await.is_none());
        assert!(v.state.is_removed());
    }

    #[test]
    fn wakes_are_single_flight_and_learned() {
        let p = PoolState::new("p", Duration::from_secs(20));
        assert_eq!(p.expected_wake(), Duration::from_secs(20));
        assert!(p.begin_wake());
        assert!(!p.begin_wake(), "second wake while one is under way");
        assert!(p.waking_since().is_some());
        p.end_wake(Some(Duration::from_secs(10)));
        assert!(p.waking_since().is_none());
        assert_eq!(p.expected_wake(), Duration::from_secs(10), "first observation replaces the guess");
        assert!(p.begin_wake());
        p.end_wake(Some(Duration::from_secs(20)));
        assert_eq!(p.expected_wake(), Duration::from_secs(13), "then an EWMA");
    }

    #[test]
    fn demand_counts_within_a_window() {
        let p = PoolState::new("p", Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(p.record_demand(t0, Duration::from_secs(60)), 1);
        assert_eq!(p.record_demand(t0 + Duration::from_secs(30), Duration::from_secs(60)), 2);
        assert_eq!(p.record_demand(t0 + Duration::from_secs(100), Duration::from_secs(60)), 1);
    }
}
