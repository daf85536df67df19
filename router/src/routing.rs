//! The routing core shared by every listener (HTTP/1.1, HTTP/2, HTTP/3):
//! route match, service lookup, placement, holding, waking, replica pick
//! and slot accounting. Protocol adapters translate their requests into
//! calls here and hold no policy of their own.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use stoke_config::{PoolId, RouteId, ServiceId, Snapshot};
use tokio::sync::watch;

use std::net::IpAddr;

use crate::access::{Identity, RateLimiter};
use crate::error::Reject;
use crate::placement::{place, Decision, Placement, PoolStatus};
use crate::state::{Live, PoolView, Slot, StateStore};
use crate::wake::{DEMAND_WINDOW, WARM_AFTER};

/// How many times one request may be sent to a replica whose connection
/// fails before anything is sent (the first try included).
pub const MAX_CONNECT_ATTEMPTS: u8 = 3;

/// `Retry-After` when no pool has capacity and nothing better is known.
pub const NO_CAPACITY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Request header with which a client asks for a shorter hold than the
/// route's `max_wait`, in milliseconds (`stoke-max-wait-ms: 2000`).
pub const MAX_WAIT_HEADER: &str = "stoke-max-wait-ms";

/// The edge's routing state: the live snapshot and the pool states.
#[derive(Debug)]
pub struct Router {
    live: ArcSwap<Live>,
    store: StateStore,
    version: AtomicU64,
    changes: watch::Sender<u64>,
    /// Token buckets of the routes' rate limits (kept across reloads).
    pub limiter: RateLimiter,
}

/// A request admitted to a replica: it holds a slot until dropped.
#[derive(Debug)]
pub struct Admitted {
    /// The slot; dropping it ends the request's in-flight count.
    pub slot: Slot,
    /// The pool it is on.
    pub pool: PoolId,
    /// How long the request was held for capacity or a wake.
    pub waited: Duration,
}

impl Router {
    /// A router serving `snapshot` as version 1.
    pub fn new(snapshot: Snapshot) -> Arc<Router> {
        let store = StateStore::default();
        let (live, _) = store.bind(1, Arc::new(snapshot));
        let (changes, _) = watch::channel(1);
        Arc::new(Router {
            live: ArcSwap::from_pointee(live),
            store,
            version: AtomicU64::new(1),
            changes,
            limiter: RateLimiter::default(),
        })
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
    /// Requests held for pools that left the config are answered.
    pub fn swap(&self, snapshot: Snapshot) -> Arc<Live> {
        let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        let old = self.live();
        let (live, removed) = self.store.bind(version, Arc::new(snapshot));
        let live = Arc::new(live);
        self.live.store(live.clone());
        for state in removed {
            if let Some(view) = old.pools.iter().find(|v| Arc::ptr_eq(&v.state, &state)) {
                view.close();
            }
        }
        // Capacity may have changed (replicas added, limits raised).
        for view in live.pools.iter() {
            view.dispatch();
        }
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

    /// Access control of a route: the API key (if the route has `auth`),
    /// then the rate limits. `key_header` is the value of the route's key
    /// header; `client` the client's address.
    pub fn admit_client(
        &self,
        live: &Live,
        route: RouteId,
        key_header: Option<&[u8]>,
        client: Option<IpAddr>,
    ) -> Result<(), Reject> {
        let r = live.snapshot.network.route(route);
        let key = match (&r.auth, &live.route_keys[route.index()]) {
            (Some(auth), Some(keys)) => Some(keys.check(&auth.header, key_header)?),
            _ => None,
        };
        let Some(limit) = &r.rate_limit else { return Ok(()) };
        let now = Instant::now();
        let limited = |wait: Duration| Reject {
            status: 429,
            code: "rate_limited",
            message: format!("too many requests on route {}; slow down", r.name),
            origin: crate::error::Origin::Client,
            retry_after: Some(wait),
        };
        // Host and prefix identify a route (names need not be unique), and
        // stay the same across reloads.
        let id = (&r.host, &r.path_prefix);
        if let (Some(rate), Some(key)) = (limit.per_key, key.as_ref()) {
            self.limiter.take(id, Identity::Key(key), rate, limit.burst, now).map_err(limited)?;
        }
        if let (Some(rate), Some(ip)) = (limit.per_ip, client) {
            self.limiter.take(id, Identity::Ip(ip), rate, limit.burst, now).map_err(limited)?;
        }
        Ok(())
    }

    /// The service named `name` (from a body field or header).
    pub fn service_named(live: &Live, name: &str, from: &str) -> Result<ServiceId, Reject> {
        live.snapshot.network.service_id(name).ok_or_else(|| {
            Reject::client(404, "model_not_found", format!("no pool serves the model \"{name}\" (taken from {from})"))
        })
    }

    /// What placement knows of `pool` now.
    pub fn pool_status(live: &Live, pool: PoolId) -> PoolStatus {
        status_of(live.pool(pool), live.snapshot.network.pool(pool).scale.is_some(), Instant::now())
    }

    /// Decide where a request for `service` goes, given the state now.
    #[inline]
    pub fn place(live: &Live, service: ServiceId) -> Placement {
        let now = Instant::now();
        place(live.snapshot.candidates(service), |p| {
            status_of(live.pool(p), live.snapshot.network.pool(p).scale.is_some(), now)
        })
    }

    /// Take a slot on a replica of `pool` (power of two choices); `None` if
    /// every ready replica is full.
    #[inline]
    pub fn acquire(live: &Live, pool: PoolId) -> Option<Slot> {
        live.pool(pool).acquire()
    }

    /// Admit a request for `service`: place it, and either take a slot now
    /// or hold it (waking the pool if it sleeps) until a slot frees, its
    /// deadline passes (503 with `Retry-After`) or `client_gone` resolves.
    /// A request whose expected wait already exceeds its deadline is
    /// answered at once; the wake it needs still starts.
    pub async fn admit(
        self: &Arc<Self>,
        live: &Arc<Live>,
        service: ServiceId,
        started: Instant,
        max_wait: Duration,
        client_gone: impl Future<Output = ()>,
    ) -> Result<Admitted, Reject> {
        let mut tries = 0;
        let (pool, eta_us) = loop {
            tries += 1;
            let placement = Self::place(live, service);
            if let Some(cold) = placement.passed_over_cold {
                // Route away, then warm: repeated demand wakes the near pool.
                if live.pool(cold).state.record_demand(Instant::now(), DEMAND_WINDOW) >= WARM_AFTER {
                    self.wake(live, cold, "demand");
                }
            }
            match placement.decision {
                Decision::Forward { pool } => {
                    if let Some(slot) = Self::acquire(live, pool) {
                        return Ok(Admitted { slot, pool, waited: started.elapsed() });
                    }
                    // Overtaken for the last slot: decide again, a few times.
                    if tries < 4 {
                        continue;
                    }
                    break (pool, 0);
                }
                Decision::Hold { pool, eta_us } => break (pool, eta_us),
                Decision::NoCapacity => return Err(no_capacity(live, service, NO_CAPACITY_RETRY_AFTER)),
            }
        };

        let view = live.pool(pool).clone();
        if !view.is_warm() {
            self.wake(live, pool, "request");
        }
        let eta = Duration::from_micros(u64::from(eta_us));
        let deadline = started + max_wait;
        let left = deadline.saturating_duration_since(Instant::now());
        if eta > left {
            return Err(Reject::unavailable(
                "wait_exceeds_deadline",
                format!(
                    "the fastest pool for \"{}\" ({}) is expected to take {} ms, longer than this request may wait ({} ms)",
                    live.snapshot.network.service(service).name,
                    view.state.id,
                    eta.as_millis(),
                    left.as_millis()
                ),
                eta,
            ));
        }
        let Some(mut ticket) = view.hold() else {
            return Err(Reject::unavailable(
                "queue_full",
                format!("pool {} holds its maximum of {} requests", view.state.id, view.max_queue),
                eta.max(NO_CAPACITY_RETRY_AFTER),
            ));
        };
        tokio::select! {
            slot = ticket.slot() => match slot {
                Some(slot) => Ok(Admitted { slot, pool, waited: started.elapsed() }),
                None => Err(Reject::unavailable(
                    "pool_removed",
                    format!("pool {} left the config while the request was held", view.state.id),
                    NO_CAPACITY_RETRY_AFTER,
                )),
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                let status = status_of(&view, live.snapshot.network.pool(pool).scale.is_some(), Instant::now());
                let retry = Duration::from_micros(u64::from(status.wait_us.unwrap_or(0))).max(NO_CAPACITY_RETRY_AFTER);
                Err(Reject::unavailable(
                    "wait_timeout",
                    format!("held {} ms for pool {} without a free slot (max wait)", max_wait.as_millis(), view.state.id),
                    retry,
                ))
            }
            _ = client_gone => Err(Reject::client_gone()),
        }
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
}

/// A pool's status for placement at `now`.
///
/// - a free slot, and nobody held: wait 0;
/// - warm but full (or others held first): the queue estimate, position ×
///   mean slot time ÷ slots; unavailable when the queue is full;
/// - waking: the remaining expected wake time (at least a tenth of it once
///   overdue);
/// - cold (scales to zero): the expected wake time;
/// - no ready replica and no way to wake one: unavailable.
pub fn status_of(view: &PoolView, scales: bool, now: Instant) -> PoolStatus {
    let queued = view.state.queue.len();
    let queue_full = queued >= view.max_queue;
    if view.is_warm() {
        let free = view.free_slots();
        if free > queued {
            return PoolStatus::FREE;
        }
        if queue_full {
            return PoolStatus::UNAVAILABLE;
        }
        let slots = view.ready_slots().max(1);
        let wait = view.state.service_time().as_micros() as u64 * u64::from(queued + 1) / u64::from(slots);
        return PoolStatus { wait_us: Some(wait.min(u64::from(u32::MAX)) as u32), free_slot: false, cold: false };
    }
    if !scales || queue_full {
        return PoolStatus::UNAVAILABLE;
    }
    let expected = view.state.expected_wake();
    match view.state.waking_since() {
        Some(since) => {
            let left = expected.saturating_sub(now.saturating_duration_since(since)).max(expected / 10);
            PoolStatus { wait_us: Some(micros(left)), free_slot: false, cold: false }
        }
        None => PoolStatus { wait_us: Some(micros(expected)), free_slot: false, cold: true },
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn no_capacity(live: &Live, service: ServiceId, retry_after: Duration) -> Reject {
    let name = &live.snapshot.network.service(service).name;
    Reject::unavailable(
        "no_capacity",
        format!("no pool serving \"{name}\" can take or hold the request now"),
        retry_after,
    )
}

/// The wait a request asks for: the route's `max_wait`, or less if the
/// client sent [`MAX_WAIT_HEADER`].
pub fn max_wait(route_max: Duration, header: Option<&[u8]>) -> Duration {
    header
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(route_max, |ms| route_max.min(Duration::from_millis(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_deadline_can_only_shorten() {
        let route = Duration::from_secs(30);
        assert_eq!(max_wait(route, None), route);
        assert_eq!(max_wait(route, Some(b"2000")), Duration::from_secs(2));
        assert_eq!(max_wait(route, Some(b"99999999")), route);
        assert_eq!(max_wait(route, Some(b"soon")), route);
        assert_eq!(max_wait(route, Some(b"0")), Duration::ZERO);
    }
}
