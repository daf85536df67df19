//! The admission shell: places a request, takes a slot or holds it, starts
//! the wakes that [`crate::core`] asks for, and waits — for a slot, the
//! deadline or the client leaving. Every decision is the core's; this reads
//! the clock and does the waiting.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stoke_config::{PoolId, ServiceId};

use crate::clock;
use crate::control::wake::{self, Reason};
use crate::core::admission::{self, Admission, Refusal, MAX_OVERTAKEN, NO_CAPACITY_RETRY_AFTER};
use crate::core::placement::Decision;
use crate::error::Reject;
use crate::otel::Hold;
use crate::state::{Live, Router, Slot};

/// Request header with which a client asks for a shorter hold than the
/// route's `max_wait`, in milliseconds (`stoke-max-wait-ms: 2000`).
pub const MAX_WAIT_HEADER: &str = "stoke-max-wait-ms";

/// A request's affinity keys, for the pools among its candidates that have
/// `[pool.affinity]` (empty, and allocation-free, when none has).
#[derive(Debug, Default, Clone)]
pub struct Keys(Vec<(PoolId, u64)>);

impl Keys {
    /// The request's key for `pool`, if the pool has affinity and the
    /// request a key.
    #[inline]
    pub fn of(&self, pool: PoolId) -> Option<u64> {
        self.0.iter().find(|(p, _)| *p == pool).map(|(_, k)| *k)
    }

    /// Record the key for `pool`.
    pub fn push(&mut self, pool: PoolId, key: u64) {
        self.0.push((pool, key));
    }
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

/// Admit a request for `service` that arrived at `started` and may wait
/// `max_wait`: place it, and either take a slot now or hold it (waking the
/// pool if it sleeps) until a slot frees, its deadline passes (503 with
/// `Retry-After`) or `client_gone` resolves. A request whose expected wait
/// already exceeds its deadline is answered at once; the wake it needs
/// still starts. A hold, however it ends, is noted in `hold` for the
/// request's trace.
#[allow(clippy::too_many_arguments)]
pub async fn admit(
    router: &Arc<Router>,
    live: &Arc<Live>,
    service: ServiceId,
    started: Instant,
    max_wait: Duration,
    client_gone: impl Future<Output = ()>,
    keys: &Keys,
    hold: &mut Option<Hold>,
) -> Result<Admitted, Reject> {
    let deadline = admission::deadline(started, max_wait);
    let now = clock::now();
    let pool = match place(live, service, started, now, deadline, keys, |pool, reason| {
        wake::start(router, live, pool, reason);
    })? {
        Placed::Admitted(admitted) => return Ok(admitted),
        Placed::Hold(pool) => pool,
    };
    let view = live.pool(pool).clone();
    let Some(mut ticket) = view.hold_keyed(now, keys.of(pool)) else {
        return Err(queue_full(&view, now));
    };
    // A reload may have removed the pool between the placement (on this
    // request's snapshot) and the hold: its queue was closed already and
    // would answer no one.
    if view.state.is_removed() {
        return Err(pool_removed(&view.state.id));
    }
    let (warm, eta) = (view.is_warm(), view.status(now).wait_us.unwrap_or(0));
    let wake = view.state.wake_span();
    let held = tokio::select! {
        slot = ticket.slot() => match slot {
            Some(slot) => Ok(Admitted { slot, pool, waited: clock::now().saturating_duration_since(started) }),
            None => Err(pool_removed(&view.state.id)),
        },
        _ = tokio::time::sleep_until(deadline.into()) => Err(wait_timeout(&view, max_wait, clock::now())),
        _ = client_gone => Err(Reject::client_gone()),
    };
    let eta = Duration::from_micros(u64::from(eta));
    *hold = Some(Hold { since: now, until: clock::now(), warm, eta, wake });
    held
}

/// What [`place`] did with a request.
#[derive(Debug)]
pub enum Placed {
    /// It has a slot.
    Admitted(Admitted),
    /// It is to be held in this pool's queue (the wake it needs, if any,
    /// was started).
    Hold(PoolId),
}

/// Place a request for `service` that arrived at `started`, at `now`, with
/// `deadline`: take a slot now, or say which pool to hold it for, or
/// refuse it — the whole of admission but the waiting, with no clock and
/// no task of its own. Wakes the core asks for are started through `wake`
/// (a hook call live, the replay's model of one in `stoke simulate`).
pub fn place(
    live: &Live,
    service: ServiceId,
    started: Instant,
    now: Instant,
    deadline: Instant,
    keys: &Keys,
    mut wake: impl FnMut(PoolId, Reason),
) -> Result<Placed, Reject> {
    let mut overtaken = 0;
    loop {
        let placement = live.place(service, now);
        if let Some(cold) = placement.passed_over_cold {
            // Route away, then warm: repeated demand wakes the near pool.
            if live.pool(cold).state.routed_away(now) {
                wake(cold, Reason::Demand);
            }
        }
        let mut decision = placement.decision;
        if let Decision::Forward { pool } = decision {
            // First come, first served: capacity that appeared without a
            // dispatch (nothing is lost if one was missed) goes to the
            // requests held before this one.
            let view = live.pool(pool);
            if !view.queue.is_empty() {
                view.dispatch(now);
            }
            if let Some(slot) = view.acquire_keyed(now, keys.of(pool)) {
                return Ok(Placed::Admitted(Admitted { slot, pool, waited: now.saturating_duration_since(started) }));
            }
            // Overtaken for the last slot: decide again a few times, then
            // wait in that pool's queue.
            overtaken += 1;
            if overtaken <= MAX_OVERTAKEN {
                continue;
            }
            decision = Decision::Hold { pool, eta_us: 0 };
        }
        if let Decision::Hold { pool, .. } = decision {
            let view = live.pool(pool);
            if admission::needs_wake(view.is_warm(), view.scales) {
                wake(pool, Reason::Request);
            }
        }
        match admission::admit(decision, now, deadline) {
            Admission::Hold { pool, .. } => return Ok(Placed::Hold(pool)),
            Admission::Forward { .. } => continue,
            Admission::Refuse(refusal) => return Err(refused(live, service, refusal)),
        }
    }
}

/// The answer for a request whose pool's queue is full.
pub fn queue_full(view: &crate::state::PoolView, now: Instant) -> Reject {
    let eta = Duration::from_micros(u64::from(view.status(now).wait_us.unwrap_or(0)));
    Reject::unavailable(
        "queue_full",
        format!("pool {} holds its maximum of {} requests", view.state.id, view.max_queue),
        eta.max(NO_CAPACITY_RETRY_AFTER),
    )
}

/// The answer for a held request whose deadline passed.
pub fn wait_timeout(view: &crate::state::PoolView, max_wait: Duration, now: Instant) -> Reject {
    Reject::unavailable(
        "wait_timeout",
        format!("held {} ms for pool {} without a free slot (max wait)", max_wait.as_millis(), view.state.id),
        admission::retry_after_timeout(view.status(now)),
    )
}

/// The answer for a held request whose pool left the config.
pub fn pool_removed(pool: &str) -> Reject {
    Reject::unavailable(
        "pool_removed",
        format!("pool {pool} left the config while the request was held"),
        NO_CAPACITY_RETRY_AFTER,
    )
}

/// The answer for a request the core refused.
fn refused(live: &Live, service: ServiceId, refusal: Refusal) -> Reject {
    let name = &live.snapshot.network.service(service).name;
    match refusal {
        Refusal::NoCapacity => Reject::unavailable(
            "no_capacity",
            format!("no pool serving \"{name}\" can take or hold the request now"),
            refusal.retry_after(),
        ),
        Refusal::WaitExceedsDeadline { pool, eta, left } => Reject::unavailable(
            "wait_exceeds_deadline",
            format!(
                "the fastest pool for \"{name}\" ({}) is expected to take {} ms, longer than this request may wait ({} ms)",
                live.pool(pool).state.id,
                eta.as_millis(),
                left.as_millis()
            ),
            refusal.retry_after(),
        ),
    }
}

/// How a retry that finds no replica free is held for a wake instead of
/// failing: the edge's router, and when the request started and how long
/// its route lets it wait.
pub struct Rehold<'a> {
    /// The edge's router.
    pub router: &'a Arc<Router>,
    /// When the request arrived.
    pub started: Instant,
    /// Its route's `max_wait`.
    pub max_wait: Duration,
}

/// A slot for the next try of a request whose last try sent nothing (the
/// failed replica is already marked down or its slot released): another
/// replica or the next pool at once ([`reacquire`]); else, with `rehold`,
/// the request is admitted as a new one would be — held for a wake within
/// what is left of its `max_wait` — since the pool it was on may have
/// gone to sleep under this edge, put there by its home edge before this
/// edge's probes saw it. The client is not watched meanwhile; the wait is
/// bounded by the deadline.
pub async fn retry(
    live: &Arc<Live>,
    service: Option<ServiceId>,
    rehold: Option<&Rehold<'_>>,
) -> Option<(PoolId, Slot)> {
    let service = service?;
    if let Some(found) = reacquire(live, service) {
        return Some(found);
    }
    let r = rehold?;
    let admitted =
        admit(r.router, live, service, r.started, r.max_wait, std::future::pending(), &Keys::default(), &mut None)
            .await;
    admitted.ok().map(|a| (a.pool, a.slot))
}

/// A slot for a retry after a connect failure: the failed replica is
/// already marked down, so the pick moves on to another replica or the
/// next pool. Never holds.
pub fn reacquire(live: &Live, service: ServiceId) -> Option<(PoolId, Slot)> {
    let now = clock::now();
    match live.place(service, now).decision {
        Decision::Forward { pool } => live.acquire(pool, now).map(|s| (pool, s)),
        _ => None,
    }
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

    const S: Duration = Duration::from_secs(1);

    /// No affinity keys (the pools in these tests have none).
    static NO_KEYS: Keys = Keys(Vec::new());

    /// Frankfurt warm with its one slot taken; Paris cold.
    fn full_near_pool() -> (Arc<Router>, Arc<Live>, ServiceId, Slot) {
        let router = crate::testing::two_pools(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        let live = router.live();
        live.pools[0].replicas[0].set_ready(true);
        let service = live.snapshot.network.service_id("m").expect("service");
        let slot = live.acquire(PoolId(0), clock::now()).expect("the one slot");
        (router, live, service, slot)
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_gives_up_at_its_deadline() {
        let (router, live, service, _busy) = full_near_pool();
        let started = clock::now();
        let mut hold = None;
        let admit = admit(&router, &live, service, started, 5 * S, std::future::pending(), &NO_KEYS, &mut hold);
        let (answer, ()) = tokio::join!(admit, async {
            tokio::time::sleep(Duration::from_millis(4_990)).await;
            assert_eq!(live.pools[0].queue.len(), 1, "still held just before the deadline");
        });
        let reject = answer.expect_err("no slot freed");
        assert_eq!((reject.status, reject.code), (503, "wait_timeout"));
        assert!(reject.retry_after.is_some_and(|r| r >= S));
        assert_eq!(clock::now() - started, 5 * S, "answered at the deadline, on the virtual clock");
        assert_eq!(live.pools[0].queue.len(), 0, "its place is freed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_takes_the_first_slot_that_frees() {
        let (router, live, service, busy) = full_near_pool();
        let started = clock::now();
        let mut hold = None;
        let admit = admit(&router, &live, service, started, 30 * S, std::future::pending(), &NO_KEYS, &mut hold);
        let (answer, ()) = tokio::join!(admit, async {
            tokio::time::sleep(2 * S).await;
            drop(busy);
        });
        let admitted = answer.expect("admitted");
        assert_eq!(admitted.pool, PoolId(0));
        assert_eq!(admitted.waited, 2 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_leaves_while_held_leaves_the_queue() {
        let (router, live, service, _busy) = full_near_pool();
        let gone = tokio::time::sleep(S);
        let reject =
            admit(&router, &live, service, clock::now(), 30 * S, gone, &NO_KEYS, &mut None).await.expect_err("gone");
        assert!(reject.is_client_gone());
        assert_eq!(live.pools[0].queue.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_on_a_snapshot_whose_pool_a_reload_removed_is_answered_at_once() {
        let router = crate::testing::two_pools(1, "idle_timeout = \"5m\"\nwake_time = \"1s\"");
        let old = router.live();
        let service = old.snapshot.network.service_id("m").expect("service");
        // The reload drops Frankfurt's pool; the request still runs on the
        // snapshot it started with, where Frankfurt is the nearest.
        let text = crate::testing::two_pools_text(1, "idle_timeout = \"5m\"\nwake_time = \"1s\"")
            .replace("id = \"fra-gpu\"", "id = \"fra-gpu-2\"");
        router.swap(crate::testing::snapshot(&text));
        let started = clock::now();
        let reject = admit(&router, &old, service, started, 30 * S, std::future::pending(), &NO_KEYS, &mut None)
            .await
            .expect_err("removed");
        assert_eq!((reject.status, reject.code), (503, "pool_removed"));
        assert_eq!(clock::now(), started, "at once, not at the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_arrival_does_not_overtake_a_held_request() {
        let router = crate::testing::two_pools(2, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        let live = router.live();
        let service = live.snapshot.network.service_id("m").expect("service");
        let replica = live.pools[0].replicas[0].clone();
        replica.set_ready(true);
        // Frankfurt full with other edges' requests; Paris cold and far
        // slower to wake than Frankfurt's queue: the first request is held.
        replica.set_reported_load(2);
        let first = tokio::spawn({
            let (router, live) = (router.clone(), live.clone());
            async move {
                admit(&router, &live, service, clock::now(), 30 * S, std::future::pending(), &NO_KEYS, &mut None).await
            }
        });
        while live.pools[0].queue.is_empty() {
            tokio::task::yield_now().await;
        }
        // Other edges' load drops, and nothing dispatched the queue (a
        // path that frees capacity silently): a new arrival comes.
        replica.set_reported_load(0);
        let second =
            admit(&router, &live, service, clock::now(), 30 * S, std::future::pending(), &NO_KEYS, &mut None).await;
        assert!(second.is_ok());
        let first = tokio::time::timeout(S, first).await.expect("the held request got its slot first").expect("task");
        assert!(first.is_ok(), "{first:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_longer_than_the_deadline_is_refused_at_once() {
        let router = crate::testing::two_pools(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        let live = router.live();
        let service = live.snapshot.network.service_id("m").expect("service");
        // Both pools cold: the nearest wakes in 20 s, the request may wait 5.
        let started = clock::now();
        let reject = admit(&router, &live, service, started, 5 * S, std::future::pending(), &NO_KEYS, &mut None)
            .await
            .expect_err("refused");
        assert_eq!((reject.status, reject.code), (503, "wait_exceeds_deadline"));
        assert_eq!(reject.retry_after, Some(20 * S));
        assert_eq!(clock::now(), started, "at once");
        assert!(live.pools[0].state.waking_since().is_some(), "the wake it needs still starts");
    }

    /// Where [`place`] put a request: admitted or held, and for which pool.
    fn outcome(placed: Result<Placed, Reject>) -> Result<(bool, PoolId), u16> {
        match placed {
            Ok(Placed::Admitted(a)) => Ok((true, a.pool)),
            Ok(Placed::Hold(pool)) => Ok((false, pool)),
            Err(r) => Err(r.status),
        }
    }

    #[test]
    fn affinity_never_changes_which_pool_serves() {
        // Affinity only orders the replicas of the pool that placement
        // chose: a conversation whose cache is in the near pool is placed as
        // any request when that pool is warm, full or cold.
        let text = crate::testing::two_pools_text(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"").replace(
            "sleep = { url = \"http://127.0.0.1:9/sleep\" }",
            "sleep = { url = \"http://127.0.0.1:9/sleep\" }\n[pool.affinity]\nkey = \"header:x-session-id\"",
        );
        let (near, far) = (PoolId(0), PoolId(1));
        let mut keyed = Keys::default();
        keyed.push(near, 7);
        keyed.push(far, 7);
        type Setup = fn(&Live) -> Option<Slot>;
        let states: [(&str, Setup); 3] = [
            ("near warm", |live| {
                live.pools[0].replicas[0].set_ready(true);
                None
            }),
            ("near full, far warm", |live| {
                live.pools[0].replicas[0].set_ready(true);
                live.pools[1].replicas[0].set_ready(true);
                live.acquire(PoolId(0), clock::now())
            }),
            ("near cold, far warm", |live| {
                live.pools[1].replicas[0].set_ready(true);
                None
            }),
        ];
        for (what, setup) in states {
            let mut seen = Vec::new();
            for keys in [&NO_KEYS, &keyed] {
                let router = Router::new(crate::testing::snapshot(&text));
                let live = router.live();
                assert!(live.pools.iter().all(|v| v.affinity.is_some()), "both pools have affinity");
                let service = live.snapshot.network.service_id("m").expect("service");
                let _busy = setup(&live);
                let now = clock::now();
                seen.push(outcome(place(&live, service, now, now, now + 30 * S, keys, |_, _| {})));
            }
            assert_eq!(seen[0], seen[1], "{what}: with and without a key");
            let expected = match what {
                "near warm" => Ok((true, near)),
                _ => Ok((true, far)),
            };
            assert_eq!(seen[1], expected, "{what}");
        }
    }
}
