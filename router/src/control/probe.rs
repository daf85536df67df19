//! Active health probes and load scrapes of every replica, restarted for
//! each snapshot that goes live (states carry over, so readiness is not
//! lost across a reload).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::load::parse_load;
use crate::clock;
use crate::net::client as http_client;
use crate::state::{Live, PoolView, ReplicaState, Router};
use stoke_config::{HealthCheck, LoadReport};

/// Consecutive failed probes that mark a ready replica down. A refused
/// connection marks it down at once.
pub const FAILS_TO_DOWN: u32 = 2;

/// Outcome of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// 2xx.
    Healthy,
    /// 2xx, and the replica says it sleeps (`{"is_sleeping": true}` on the
    /// pool's light-sleep probe): alive, not ready.
    Asleep,
    /// Answered, but not 2xx (booting, overloaded).
    Unhealthy,
    /// No TCP connection.
    Refused,
    /// No answer in time, or a broken answer.
    Failed,
}

/// Probe a replica once.
pub async fn probe(replica: &ReplicaState, check: &HealthCheck) -> Probe {
    probe_timed(replica, check).await.0
}

/// Probe a replica once; with an answer, also its connect and first-byte
/// times (the round trip from this edge).
pub async fn probe_timed(replica: &ReplicaState, check: &HealthCheck) -> (Probe, Option<(Duration, Duration)>) {
    match http_client::get(replica.addr, &replica.addr_text, &check.path, check.timeout).await {
        Ok(a) if a.status.is_success() => {
            let timing = Some((a.connect, a.first_byte));
            match &check.sleeping_path {
                Some(path) if sleeps(replica, path, check.timeout).await => (Probe::Asleep, timing),
                _ => (Probe::Healthy, timing),
            }
        }
        Ok(a) => (Probe::Unhealthy, Some((a.connect, a.first_byte))),
        Err(http_client::ClientError::Connect(_)) => (Probe::Refused, None),
        Err(_) => (Probe::Failed, None),
    }
}

/// Whether a healthy replica says it sleeps: `{"is_sleeping": true}` at
/// `path`. An answer that says nothing of it (an error, a server without
/// sleep mode) counts as awake: its health check already said it serves.
async fn sleeps(replica: &ReplicaState, path: &str, timeout: Duration) -> bool {
    let Ok(a) = http_client::get(replica.addr, &replica.addr_text, path, timeout).await else { return false };
    a.status.is_success()
        && serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|v| v.get("is_sleeping").and_then(serde_json::Value::as_bool))
            .unwrap_or(false)
}

/// Probe `replica` of `view` once and apply the result, measuring the
/// pool's RTT on the way; true if the measured RTT moved enough that
/// placement should rank again ([`Live::rerank`]).
pub async fn probe_and_measure(view: &PoolView, replica: &ReplicaState, check: &HealthCheck) -> (Probe, bool) {
    let (result, timing) = probe_timed(replica, check).await;
    let rerank = timing.is_some_and(|(connect, first_byte)| view.state.observe_rtt(connect, first_byte));
    (result, rerank)
}

/// Apply a probe result, given the failures in a row so far; returns the
/// new count.
pub fn apply(replica: &ReplicaState, pool: &str, result: Probe, fails: u32) -> u32 {
    apply_seen(replica, pool, result, fails).0
}

/// [`apply`], also telling whether the replica just became ready.
pub fn apply_seen(replica: &ReplicaState, pool: &str, result: Probe, fails: u32) -> (u32, bool) {
    let (ready, fails) = match result {
        // A replica being put to light sleep stays out of rotation until
        // the call is over, though it still says it is awake.
        Probe::Healthy if replica.is_entering_sleep() => (false, 0),
        Probe::Healthy => {
            replica.set_asleep(false);
            (true, 0)
        }
        Probe::Asleep => {
            if !replica.set_asleep(true) {
                tracing::info!(pool, replica = %replica.addr, "replica sleeps lightly");
            }
            (false, 0)
        }
        Probe::Refused => {
            replica.set_asleep(false);
            (false, fails + 1)
        }
        Probe::Unhealthy | Probe::Failed => {
            let fails = fails + 1;
            // A replica not yet seen healthy stays down; a ready one gets
            // the benefit of the doubt for one probe.
            (replica.is_ready() && fails < FAILS_TO_DOWN, fails)
        }
    };
    let was = replica.set_ready(ready);
    if was != ready {
        if ready {
            tracing::info!(pool, replica = %replica.addr, "replica ready");
        } else {
            tracing::warn!(pool, replica = %replica.addr, probe = ?result, "replica down");
        }
    }
    (fails, ready && !was)
}

/// Probe every replica of `live` once, all at the same time; returns when
/// all have answered or timed out.
pub async fn probe_all(live: &Live) {
    let mut set = JoinSet::new();
    for (pool, view) in live.snapshot.network.pools.iter().zip(live.pools.iter()) {
        for replica in view.replicas.iter() {
            let (view, replica, check, id) = (view.clone(), replica.clone(), pool.health.clone(), pool.id.clone());
            set.spawn(async move {
                let (result, _) = probe_and_measure(&view, &replica, &check).await;
                apply(&replica, &id, result, 0);
            });
        }
    }
    while set.join_next().await.is_some() {}
    let now = clock::now();
    for view in live.pools.iter() {
        view.note_depth();
        view.dispatch(now);
    }
}

/// Run probes and scrapes for whatever snapshot is live, until `shutdown`.
pub async fn run(router: Arc<Router>, mut shutdown: watch::Receiver<bool>) {
    let mut versions = router.subscribe();
    loop {
        let live = router.live();
        let mut tasks = JoinSet::new();
        for (pool, view) in live.snapshot.network.pools.iter().zip(live.pools.iter()) {
            for replica in view.replicas.iter() {
                tasks.spawn(probe_loop(
                    router.clone(),
                    view.clone(),
                    replica.clone(),
                    pool.health.clone(),
                    pool.id.clone(),
                ));
                if let Some(load) = &pool.load {
                    tasks.spawn(scrape_loop(view.clone(), replica.clone(), load.clone()));
                }
            }
        }
        drop(live);
        tokio::select! {
            changed = versions.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        // Dropping the set aborts the old loops.
    }
}

async fn probe_loop(
    router: Arc<Router>,
    view: Arc<PoolView>,
    replica: Arc<ReplicaState>,
    check: HealthCheck,
    pool: String,
) {
    let mut fails = 0;
    loop {
        let (result, rerank) = probe_and_measure(&view, &replica, &check).await;
        if rerank {
            router.rerank();
        }
        let was_down = fails > 0 || replica.is_asleep();
        let (f, became_ready) = apply_seen(&replica, &pool, result, fails);
        fails = f;
        view.note_depth();
        if became_ready {
            // Held requests leave as soon as a replica is seen ready. One
            // that was down (stopped, booting) was woken, maybe by another
            // edge: the pool starts an idle period here too, so that its
            // home edge can put it to sleep again. (One that only left
            // rotation for a sleep that has not happened yet was not.)
            let now = clock::now();
            if was_down {
                view.state.woke(now);
            }
            view.dispatch(now);
        }
        tokio::time::sleep(jitter(check.interval)).await;
    }
}

async fn scrape_loop(view: Arc<PoolView>, replica: Arc<ReplicaState>, load: LoadReport) {
    loop {
        tokio::time::sleep(jitter(load.interval)).await;
        let timeout = load.interval.min(Duration::from_secs(2));
        if let Ok(answer) = http_client::get(replica.addr, &replica.addr_text, &load.path, timeout).await {
            if answer.status.is_success() {
                if let Some(n) = std::str::from_utf8(&answer.body).ok().and_then(|t| parse_load(t, load.format)) {
                    apply_load(&view, &replica, n, clock::now());
                }
            }
        }
    }
}

/// Take in the load a replica reported at `now`: load from any edge keeps
/// the pool awake, and capacity that other edges freed goes to the
/// requests held here first.
pub fn apply_load(view: &Arc<PoolView>, replica: &ReplicaState, reported: u32, now: std::time::Instant) {
    let quiet_before = replica.reported_load() == 0 && view.state.in_flight() == 0;
    replica.set_reported_load(reported);
    if reported > 0 {
        // Other edges' load after a quiet spell ends an idle gap too.
        if quiet_before && view.learns_gaps {
            view.state.end_gap(now);
        }
        view.state.touch(now);
    }
    view.dispatch(now);
}

/// `d` ± 10 %, so that probes of many replicas do not fall in step.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.9 + fastrand::f64() * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn capacity_freed_by_other_edges_goes_to_held_requests() {
        let view = Arc::new(PoolView::detached(1, 2, 8));
        let replica = view.replicas[0].clone();
        replica.set_ready(true);
        // Other edges fill the replica.
        apply_load(&view, &replica, 2, clock::now());
        let mut ticket = view.hold(clock::now()).expect("held");
        let waiting = tokio::time::timeout(Duration::from_secs(1), ticket.slot()).await;
        assert!(waiting.is_err(), "no slot while the replica is full");
        // Their requests end: the next scrape reports less.
        apply_load(&view, &replica, 1, clock::now());
        let slot = tokio::time::timeout(Duration::from_secs(1), ticket.slot()).await;
        assert!(slot.expect("handed over at once").is_some());
    }
}
