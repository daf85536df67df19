//! A pool's capacity under one snapshot, and the requests that wait for
//! it. A [`PoolView`] hands out [`Slot`]s (one request's place on a
//! replica); its [`HoldQueue`] is a bounded FIFO of [`Ticket`]s. Slots that
//! free up are handed to the head of the queue, so that a held request is
//! never overtaken by one that arrived later, and a ticket or slot released
//! on any path (a client gone, an error, a panic) gives its capacity back.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::core::affinity::{self, Chosen};
use crate::core::idle::Activity;
use crate::core::pick::pick;
use crate::core::placement::PoolStatus;
use crate::core::wait::{self, PoolLoad};

use super::pool::PoolState;
use super::replica::ReplicaState;

/// A pool as the request path sees it under one snapshot: its long-lived
/// state, its replicas in config order and its limits.
#[derive(Debug)]
pub struct PoolView {
    /// State shared with other snapshots.
    pub state: Arc<PoolState>,
    /// Requests held for a slot, first come first served (shared with
    /// other snapshots, like `state`).
    pub queue: Arc<HoldQueue>,
    /// Replica states, in the order of the pool's `replicas` key.
    pub replicas: Box<[Arc<ReplicaState>]>,
    /// Requests one replica takes at once.
    pub max_concurrency: u32,
    /// Requests held at most.
    pub max_queue: u32,
    /// Whether the pool scales to zero.
    pub scales: bool,
    /// Whether its idle gaps are learned (`idle_timeout = "auto"`).
    pub learns_gaps: bool,
    /// The pool id as a metric label (shared, so labelling allocates nothing).
    pub label: metrics::SharedString,
    /// Prompt-cache affinity, if the pool has it.
    pub affinity: Option<stoke_config::Affinity>,
    /// The hash of each replica's address, for rendezvous hashing.
    pub replica_ids: Box<[u64]>,
}

impl PoolView {
    /// A pool view outside any snapshot (for benches and tests): replicas
    /// on `replicas` loopback ports, none ready yet.
    pub fn detached(replicas: usize, max_concurrency: u32, max_queue: u32) -> Self {
        PoolView {
            label: metrics::SharedString::const_str("detached"),
            state: Arc::new(PoolState::new("detached", Duration::from_secs(1), crate::clock::now())),
            queue: Arc::default(),
            replicas: (0..replicas)
                .map(|i| Arc::new(ReplicaState::new(SocketAddr::from(([127, 0, 0, 1], 1 + i as u16)))))
                .collect(),
            max_concurrency,
            max_queue,
            scales: true,
            learns_gaps: false,
            affinity: None,
            replica_ids: (0..replicas).map(|i| i as u64).collect(),
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

    /// Work out again whether the pool sleeps lightly (none ready, and a
    /// replica answers that it sleeps), after probes or a light sleep.
    pub fn note_depth(&self) {
        self.state.set_light(!self.is_warm() && self.replicas.iter().any(|r| r.is_asleep()));
    }

    /// What the wait model needs to know of the pool now.
    #[inline]
    pub fn load(&self) -> PoolLoad {
        let (mut warm, mut ready, mut free) = (false, 0u32, 0u32);
        for r in self.replicas.iter() {
            if r.is_ready() {
                warm = true;
                ready += 1;
                free += r.free_slots(self.max_concurrency);
            }
        }
        PoolLoad {
            warm,
            free_slots: free,
            ready_slots: ready * self.max_concurrency,
            queued: self.queue.len(),
            held_elsewhere: self.state.held_elsewhere(),
            max_queue: self.max_queue,
            scales: self.scales,
            service_time: self.state.service_time(),
            expected_wake: self.state.expected_wake(),
            waking_since: self.state.waking_since(),
        }
    }

    /// The pool's status for placement at `now` (the wait model).
    #[inline]
    pub fn status(&self, now: Instant) -> PoolStatus {
        wait::status(&self.load(), now)
    }

    /// What the idle rule needs to know of the pool now: this edge's
    /// requests and, in a cluster, the other edges'.
    pub fn activity(&self) -> Activity {
        let elsewhere = self.state.elsewhere();
        Activity {
            warm: self.is_warm(),
            in_flight: self.state.in_flight().saturating_add(elsewhere.in_flight),
            queued: self.queue.len().saturating_add(elsewhere.held),
            waking: self.state.waking_since().is_some(),
            last_active: self.state.last_active(),
        }
    }

    /// Take a slot on a replica (power of two choices) at `now`; `None` if
    /// every ready replica is full.
    #[inline]
    pub fn acquire(self: &Arc<Self>, now: Instant) -> Option<Slot> {
        self.acquire_keyed(now, None)
    }

    /// Take a slot for a request with affinity `key` at `now`: the key's
    /// replica by rendezvous hashing within the pool's load bound, when the
    /// pool has affinity and the request a key; else as [`acquire`](Self::acquire).
    pub fn acquire_keyed(self: &Arc<Self>, now: Instant, key: Option<u64>) -> Option<Slot> {
        // Another request may take the last slot between the pick and the
        // acquire; a few tries settle it without a lock.
        for _ in 0..4 {
            let (i, chosen) = match (&self.affinity, key) {
                (Some(a), Some(key)) => {
                    affinity::pick(&self.replicas, &self.replica_ids, self.max_concurrency, key, a.max_load)?
                }
                _ => (pick(&self.replicas, self.max_concurrency, |n| fastrand::usize(0..n))?, Chosen::None),
            };
            let replica = &self.replicas[i];
            if replica.try_acquire(self.max_concurrency) {
                if self.state.in_flight.fetch_add(1, Ordering::AcqRel) == 0 && self.learns_gaps {
                    self.state.end_gap(now);
                }
                self.state.routed.fetch_add(1, Ordering::Relaxed);
                self.state.touch(now);
                return Some(Slot {
                    view: self.clone(),
                    replica: replica.clone(),
                    taken: now,
                    dispatch_on_drop: true,
                    chosen,
                });
            }
        }
        None
    }

    /// Hand free slots to held requests, first come first served. Called
    /// whenever capacity may have appeared: a slot freed, a replica became
    /// ready, a reload.
    pub fn dispatch(self: &Arc<Self>, now: Instant) {
        while !self.queue.is_empty() {
            // The slot is taken for the request at the head, with its key.
            let Some(mut slot) = self.acquire_keyed(now, self.queue.front_key()) else { return };
            // A slot handed back below must not dispatch recursively.
            slot.dispatch_on_drop = false;
            match self.queue.pop() {
                // If the request gave up between pop and send, the slot
                // comes back here and is released; the loop goes on.
                Some(tx) => drop(tx.send(slot)),
                None => return,
            }
        }
    }

    /// Hold a request until a slot is handed to it; `None` if the queue is
    /// full. Dropping the ticket leaves the queue.
    pub fn hold(self: &Arc<Self>, now: Instant) -> Option<Ticket> {
        self.hold_keyed(now, None)
    }

    /// [`hold`](Self::hold) a request with affinity `key`: the slot handed
    /// to it is picked for its key.
    pub fn hold_keyed(self: &Arc<Self>, now: Instant, key: Option<u64>) -> Option<Ticket> {
        let (id, rx) = self.queue.push(self.max_queue, key)?;
        let ticket = Ticket { view: self.clone(), id, rx };
        // Capacity may have appeared between the decision and the push.
        self.dispatch(now);
        Some(ticket)
    }

    /// Answer every held request at once (the pool left the config).
    pub fn close(&self) {
        self.state.set_removed();
        self.queue.close();
    }
}

/// One held request: its place, where its slot goes, and its affinity key.
#[derive(Debug)]
struct Waiter {
    id: u64,
    tx: oneshot::Sender<Slot>,
    key: Option<u64>,
}

/// Requests held for a pool: a bounded FIFO.
#[derive(Debug, Default)]
pub struct HoldQueue {
    waiters: Mutex<VecDeque<Waiter>>,
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

    pub(super) fn push(&self, max: u32, key: Option<u64>) -> Option<(u64, oneshot::Receiver<Slot>)> {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() >= max as usize {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        w.push_back(Waiter { id, tx, key });
        self.len.store(w.len() as u32, Ordering::Release);
        Some((id, rx))
    }

    pub(super) fn pop(&self) -> Option<oneshot::Sender<Slot>> {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let front = w.pop_front().map(|w| w.tx);
        self.len.store(w.len() as u32, Ordering::Release);
        front
    }

    fn remove(&self, id: u64) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = w.iter().position(|w| w.id == id) {
            w.remove(i);
        }
        self.len.store(w.len() as u32, Ordering::Release);
    }

    /// The affinity key of the request at the head.
    fn front_key(&self) -> Option<u64> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner()).front().and_then(|w| w.key)
    }

    /// Answer every held request at once.
    pub(super) fn close(&self) {
        self.closed.notify_waiters();
        while let Some(tx) = self.pop() {
            drop(tx);
        }
    }
}

/// A place in a pool's hold queue. Dropping it leaves the queue.
#[derive(Debug)]
pub struct Ticket {
    pub(super) view: Arc<PoolView>,
    pub(super) id: u64,
    pub(super) rx: oneshot::Receiver<Slot>,
}

impl Ticket {
    /// Wait for a slot; `None` if the pool was removed.
    pub async fn slot(&mut self) -> Option<Slot> {
        let closed = self.view.queue.closed.notified();
        tokio::select! {
            s = &mut self.rx => s.ok().map(|mut s| {
                s.dispatch_on_drop = true;
                s
            }),
            _ = closed => None,
        }
    }

    /// The slot, if one was handed to this ticket already (a replay polls
    /// its held requests this way instead of awaiting them).
    pub fn try_slot(&mut self) -> Option<Slot> {
        self.rx.try_recv().ok().map(|mut s| {
            s.dispatch_on_drop = true;
            s
        })
    }

    /// The pool this ticket waits for.
    pub fn view(&self) -> &Arc<PoolView> {
        &self.view
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.view.queue.remove(self.id);
        // A slot handed over but never taken goes back, and on to the next
        // held request.
        if let Ok(mut slot) = self.rx.try_recv() {
            slot.dispatch_on_drop = true;
        }
    }
}

/// An in-flight slot on a replica: taken when a request is forwarded,
/// released when dropped — whichever way the request ends — and then
/// handed to the next held request, if any.
#[derive(Debug)]
pub struct Slot {
    pub(super) view: Arc<PoolView>,
    pub(super) replica: Arc<ReplicaState>,
    pub(super) taken: Instant,
    pub(super) dispatch_on_drop: bool,
    pub(super) chosen: Chosen,
}

impl Slot {
    /// How the replica was chosen (affinity owner, spilled, or no key).
    pub fn chosen(&self) -> Chosen {
        self.chosen
    }

    /// Whether the slot's pool has affinity configured.
    pub fn has_affinity(&self) -> bool {
        self.view.affinity.is_some()
    }

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
        // A slot ends wherever a request ends, with no caller to pass the
        // time in: it reads the runtime's clock (paused in tests).
        let now = crate::clock::now();
        self.replica.release();
        let pool = &self.view.state;
        let _ = pool.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1));
        pool.observe_service_time(now.saturating_duration_since(self.taken));
        pool.touch(now);
        if self.dispatch_on_drop && !self.view.queue.is_empty() {
            self.view.dispatch(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(replicas: usize, max: u32, max_queue: u32) -> Arc<PoolView> {
        let v = PoolView::detached(replicas, max, max_queue);
        for r in v.replicas.iter() {
            r.set_ready(true);
        }
        Arc::new(v)
    }

    #[test]
    fn slots_count_exactly_and_never_exceed_max() {
        let now = crate::clock::now();
        let v = view(1, 2, 4);
        let a = v.acquire(now).expect("first");
        let b = v.acquire(now).expect("second");
        assert!(v.acquire(now).is_none());
        assert_eq!((v.replicas[0].in_flight(), v.state.in_flight()), (2, 2));
        drop(a);
        assert_eq!((v.replicas[0].in_flight(), v.state.in_flight()), (1, 1));
        drop(b);
        assert_eq!((v.replicas[0].in_flight(), v.state.in_flight()), (0, 0));
    }

    #[test]
    fn foreign_load_counts_against_capacity() {
        let now = crate::clock::now();
        let v = view(1, 4, 4);
        let r = &v.replicas[0];
        let _mine = v.acquire(now).expect("slot");
        r.set_reported_load(3);
        assert_eq!(r.free_slots(4), 1);
        let _second = v.acquire(now).expect("one left");
        assert!(v.acquire(now).is_none());
    }

    #[test]
    fn the_load_seen_by_the_wait_model_matches_the_counters() {
        let now = crate::clock::now();
        let v = view(2, 3, 4);
        v.replicas[1].set_ready(false);
        let _s = v.acquire(now).expect("slot");
        let l = v.load();
        assert_eq!((l.warm, l.free_slots, l.ready_slots, l.queued, l.max_queue), (true, 2, 3, 0, 4));
        assert_eq!(v.status(now), PoolStatus::FREE);
    }

    #[tokio::test]
    async fn freed_slots_go_to_held_requests_in_order() {
        let now = crate::clock::now();
        let v = view(1, 1, 8);
        let first = v.acquire(now).expect("slot");
        let mut t1 = v.hold(now).expect("queued");
        let mut t2 = v.hold(now).expect("queued");
        assert_eq!(v.queue.len(), 2);
        // Nobody may overtake the queue: the pool has no free slot.
        assert!(v.acquire(now).is_none());
        drop(first);
        let s1 = t1.slot().await.expect("first in line gets the slot");
        assert_eq!(v.queue.len(), 1);
        drop(s1);
        let s2 = t2.slot().await.expect("then the second");
        assert_eq!(v.queue.len(), 0);
        drop(s2);
        assert_eq!(v.state.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_request_that_leaves_the_queue_frees_its_place() {
        let now = crate::clock::now();
        let v = view(1, 1, 8);
        let first = v.acquire(now).expect("slot");
        let t1 = v.hold(now).expect("queued");
        let mut t2 = v.hold(now).expect("queued");
        drop(t1); // client gone
        assert_eq!(v.queue.len(), 1);
        drop(first);
        assert!(t2.slot().await.is_some());
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_request_that_left_moves_on() {
        let now = crate::clock::now();
        let v = view(1, 1, 8);
        let first = v.acquire(now).expect("slot");
        let t1 = v.hold(now).expect("queued");
        let mut t2 = v.hold(now).expect("queued");
        drop(first); // handed to t1, which never takes it
        drop(t1);
        let s = t2.slot().await.expect("the slot moved on to t2");
        drop(s);
        assert_eq!((v.state.in_flight(), v.replicas[0].in_flight()), (0, 0));
    }

    #[test]
    fn the_queue_is_bounded() {
        let now = crate::clock::now();
        let v = view(1, 1, 2);
        let _s = v.acquire(now);
        let _a = v.hold(now).expect("1");
        let _b = v.hold(now).expect("2");
        assert!(v.hold(now).is_none(), "a full queue refuses at once");
    }

    #[tokio::test]
    async fn closing_answers_held_requests() {
        let now = crate::clock::now();
        let v = view(1, 1, 8);
        let _s = v.acquire(now);
        let mut t = v.hold(now).expect("queued");
        v.close();
        assert!(t.slot().await.is_none());
        assert!(v.state.is_removed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_teaches_the_pool_its_service_time_on_the_runtime_clock() {
        let v = view(1, 1, 8);
        let s = v.acquire(crate::clock::now()).expect("slot");
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(s);
        // EWMA from the 1 s seed: 0.7 × 1 s + 0.3 × 10 s.
        assert_eq!(v.state.service_time(), Duration::from_millis(3700));
    }
}
