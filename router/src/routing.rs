//! The routing core shared by every listener (HTTP/1.1, HTTP/2, HTTP/3):
//! route match, service lookup, placement, replica pick and slot
//! accounting. Protocol adapters translate their requests into calls here
//! and hold no policy of their own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use stoke_config::{PoolId, RouteId, ServiceId, Snapshot};
use tokio::sync::watch;

use crate::error::Reject;
use crate::pick::pick;
use crate::placement::{place, Decision, Placement, PoolStatus};
use crate::state::{Live, Slot, StateStore};

/// How many times one request may be sent to a replica whose connection
/// fails before anything is sent (the first try included).
pub const MAX_CONNECT_ATTEMPTS: u8 = 3;

/// `Retry-After` when no pool has capacity and nothing better is known.
pub const NO_CAPACITY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The edge's routing state: the live snapshot and the pool states.
#[derive(Debug)]
pub struct Router {
    live: ArcSwap<Live>,
    store: StateStore,
    version: AtomicU64,
    changes: watch::Sender<u64>,
}

/// A request admitted to a replica: it holds a slot until dropped.
#[derive(Debug)]
pub struct Admitted {
    /// The slot; dropping it ends the request's in-flight count.
    pub slot: Slot,
    /// The pool it is on.
    pub pool: PoolId,
    /// How long the request waited for capacity or a wake.
    pub waited: Duration,
}

impl Router {
    /// A router serving `snapshot` as version 1.
    pub fn new(snapshot: Snapshot) -> Arc<Router> {
        let store = StateStore::default();
        let live = store.bind(1, Arc::new(snapshot));
        let (changes, _) = watch::channel(1);
        Arc::new(Router { live: ArcSwap::from_pointee(live), store, version: AtomicU64::new(1), changes })
    }

    /// Notified with the new version whenever a snapshot goes live.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The live snapshot and pool states; a request keeps this for its
    /// whole life, so a reload never changes what it runs against.
    #[inline]
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Make `snapshot` live; pool and replica states carry over by id.
    pub fn swap(&self, snapshot: Snapshot) -> Arc<Live> {
        let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        let live = Arc::new(self.store.bind(version, Arc::new(snapshot)));
        self.live.store(live.clone());
        self.changes.send_replace(version);
        live
    }

    /// The route for `host` and `path`.
    pub fn route(live: &Live, host: &str, path: &str) -> Result<RouteId, Reject> {
        live.snapshot
            .network
            .route_table
            .find(host, path)
            .ok_or_else(|| Reject::client(404, "no_route", format!("no route for host \"{host}\" and path \"{path}\"")))
    }

    /// The service named `name` (from a body field or header).
    pub fn service_named(live: &Live, name: &str, from: &str) -> Result<ServiceId, Reject> {
        live.snapshot.network.service_id(name).ok_or_else(|| {
            Reject::client(404, "model_not_found", format!("no pool serves the model \"{name}\" (taken from {from})"))
        })
    }

    /// What placement knows of `pool` now.
    pub fn pool_status(live: &Live, pool: PoolId) -> PoolStatus {
        let max = live.snapshot.network.pool(pool).max_concurrency;
        if live.pool(pool).free_slots(max) > 0 {
            PoolStatus::FREE
        } else {
            PoolStatus::UNAVAILABLE
        }
    }

    /// Decide where a request for `service` goes, given the state now.
    #[inline]
    pub fn place(live: &Live, service: ServiceId) -> Placement {
        place(live.snapshot.candidates(service), |p| Self::pool_status(live, p))
    }

    /// Take a slot on a replica of `pool` (power of two choices); `None` if
    /// every ready replica is full.
    pub fn acquire(live: &Live, pool: PoolId) -> Option<Slot> {
        let view = live.pool(pool);
        let max = live.snapshot.network.pool(pool).max_concurrency;
        // Another request may take the last slot between the pick and the
        // acquire; a few tries settle it without a lock.
        for _ in 0..4 {
            let i = pick(&view.replicas, max, |n| fastrand::usize(0..n))?;
            if let Some(slot) = Slot::try_acquire(&view.state, &view.replicas[i], max) {
                return Some(slot);
            }
        }
        None
    }

    /// Admit a request for `service`: place it and take a slot.
    pub async fn admit(&self, live: &Live, service: ServiceId, started: Instant) -> Result<Admitted, Reject> {
        // A decision can be overtaken by another request taking the last
        // slot; re-place a bounded number of times.
        for _ in 0..4 {
            match Self::place(live, service).decision {
                Decision::Forward { pool } => {
                    if let Some(slot) = Self::acquire(live, pool) {
                        return Ok(Admitted { slot, pool, waited: started.elapsed() });
                    }
                }
                Decision::Hold { .. } | Decision::NoCapacity => break,
            }
        }
        Err(self.no_capacity(live, service))
    }

    /// A slot for a retry after a connect failure: the failed replica is
    /// already marked down, so the pick moves on to another replica or the
    /// next pool. Never holds.
    pub fn reacquire(live: &Live, service: ServiceId) -> Option<(PoolId, Slot)> {
        match Self::place(live, service).decision {
            Decision::Forward { pool } => Self::acquire(live, pool).map(|s| (pool, s)),
            _ => None,
        }
    }

    fn no_capacity(&self, live: &Live, service: ServiceId) -> Reject {
        let name = &live.snapshot.network.service(service).name;
        Reject::unavailable(
            "no_capacity",
            format!("no pool serving \"{name}\" has a free slot right now"),
            NO_CAPACITY_RETRY_AFTER,
        )
    }
}
