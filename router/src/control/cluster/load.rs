//! The shared load view: every edge publishes, per pool, what it has in
//! flight and held and how many requests it routed away from the pool
//! while it slept, every [`PUBLISH_EVERY`] and at once on a large change.
//! Each edge sums the other edges' fresh reports (younger than [`FRESH`])
//! into the pool and replica states, where placement, holds, the wait
//! model, route-away-then-warm and the sleeper read them. A report that
//! stops coming simply ages out: an edge cut off from the cluster goes back
//! to its own view within a second.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Cluster;
use crate::clock;
use crate::metrics as m;
use crate::state::{Figures, Live, Router};

/// How often an edge publishes its report.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// How often it looks for a large change to publish at once. A cached
/// prompt's request lives a few tens of milliseconds, so a replica's load
/// must reach the other edges within a few: looking costs a pass over the
/// pools' counters, and a report is only built when they moved.
pub const LOOK_EVERY: Duration = Duration::from_millis(5);

/// Reports older than this are ignored.
pub const FRESH: Duration = Duration::from_secs(1);

/// One edge's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The edge's location id.
    pub edge: String,
    /// Pools with anything in flight, held or routed away (the others are
    /// zero).
    #[serde(default)]
    pub pools: BTreeMap<String, PoolReport>,
    /// The edge's measured round trip to each pool, milliseconds.
    #[serde(default)]
    pub rtt_ms: BTreeMap<String, f64>,
}

/// One pool in an edge's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolReport {
    /// Requests in flight, streams included.
    #[serde(default)]
    pub in_flight: u32,
    /// Requests held.
    #[serde(default)]
    pub held: u32,
    /// Requests routed away while the pool slept, within the demand window.
    #[serde(default)]
    pub routed_away: u32,
    /// In flight per replica address (non-zero ones).
    #[serde(default)]
    pub replicas: BTreeMap<String, u32>,
}

/// A report as received, with when.
#[derive(Debug)]
pub struct Received {
    /// When it arrived (this edge's clock).
    pub at: Instant,
    /// What it said.
    pub report: Report,
}

/// This edge's report at `now`.
pub fn report(live: &Live, edge: &str, now: Instant) -> Report {
    let mut pools = BTreeMap::new();
    for view in live.pools.iter() {
        let p = PoolReport {
            in_flight: view.state.in_flight(),
            held: view.queue.len(),
            routed_away: view.state.routed_away_now(now),
            replicas: view
                .replicas
                .iter()
                .filter(|r| r.in_flight() > 0)
                .map(|r| (r.addr_text.to_string(), r.in_flight()))
                .collect(),
        };
        if p.in_flight > 0 || p.held > 0 || p.routed_away > 0 {
            pools.insert(view.state.id.to_string(), p);
        }
    }
    let rtt_ms = live
        .pools
        .iter()
        .filter_map(|v| Some((v.state.id.to_string(), v.state.rtt()?.as_secs_f64() * 1000.0)))
        .collect();
    Report { edge: edge.to_owned(), pools, rtt_ms }
}

/// Whether `now` differs from `last` enough to publish before the next
/// tick: a pool became busy or idle, or moved by an eighth of its slots;
/// or, in a pool with affinity, any replica's count moved. Affinity's load
/// bound compares one replica with the pool's mean at a few requests each,
/// so a request the other edges do not see yet is a hot spot.
pub fn large_change(live: &Live, last: &Report, now: &Report) -> bool {
    live.pools.iter().any(|view| {
        let (a, b) = (last.pools.get(&*view.state.id), now.pools.get(&*view.state.id));
        if view.affinity.is_some() {
            return a.map(|p| &p.replicas) != b.map(|p| &p.replicas);
        }
        let busy = |p: Option<&PoolReport>| p.map_or(0, |p| p.in_flight + p.held);
        let (a, b) = (busy(a), busy(b));
        let step = (view.replicas.len() as u32 * view.max_concurrency / 8).max(2);
        (a == 0) != (b == 0) || a.abs_diff(b) >= step
    })
}

/// A cheap digest of what a report would say about load (not RTTs), read
/// from the counters without building it: the publisher builds a report
/// only when this moved or one is due.
pub fn fingerprint(live: &Live) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut add = |x: u64| {
        h ^= x;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    for view in live.pools.iter() {
        add(u64::from(view.state.in_flight()));
        add(u64::from(view.queue.len()));
        for r in view.replicas.iter() {
            add(u64::from(r.in_flight()));
        }
    }
    h
}

/// The other edges' figures at `now`: per pool, and per replica address.
pub fn sum<'a>(
    reports: impl Iterator<Item = &'a Received>,
    now: Instant,
) -> (HashMap<&'a str, Figures>, HashMap<&'a str, u32>) {
    let (mut pools, mut replicas) = (HashMap::<&str, Figures>::new(), HashMap::<&str, u32>::new());
    for r in reports.filter(|r| now.saturating_duration_since(r.at) <= FRESH) {
        for (id, p) in &r.report.pools {
            let f = pools.entry(id.as_str()).or_default();
            f.in_flight = f.in_flight.saturating_add(p.in_flight);
            f.held = f.held.saturating_add(p.held);
            f.routed_away = f.routed_away.saturating_add(p.routed_away);
            for (addr, n) in &p.replicas {
                let e = replicas.entry(addr.as_str()).or_default();
                *e = e.saturating_add(*n);
            }
        }
    }
    (pools, replicas)
}

/// Write the other edges' figures into the live states at `now`; held
/// requests get any capacity that the others freed.
pub fn apply(cluster: &Cluster, live: &Live, now: Instant) {
    let peers = cluster.peers.lock().unwrap_or_else(|e| e.into_inner());
    take_in(live, peers.values(), now);
    let fresh = peers.values().filter(|r| now.saturating_duration_since(r.at) <= FRESH).count();
    drop(peers);
    metrics::gauge!(m::CLUSTER_PEERS).set(fresh as f64);
}

/// Sum `reports` (the other edges') into the pool and replica states of
/// `live` at `now`; held requests get any capacity that the others freed.
/// Returns the indices of the pools that were dispatched.
pub fn take_in<'a>(live: &Live, reports: impl Iterator<Item = &'a Received>, now: Instant) -> Vec<usize> {
    let (pools, replicas) = sum(reports, now);
    let mut dispatched = Vec::new();
    for (p, view) in live.pools.iter().enumerate() {
        let before = view.state.elsewhere();
        view.state.set_elsewhere(pools.get(&*view.state.id).copied().unwrap_or_default(), now, view.learns_gaps);
        let mut freed = before.in_flight > view.state.elsewhere().in_flight;
        for r in view.replicas.iter() {
            let n = replicas.get(&*r.addr_text).copied().unwrap_or(0);
            freed |= n < r.elsewhere();
            r.set_elsewhere(n);
        }
        if freed && !view.queue.is_empty() {
            view.dispatch(now);
            dispatched.push(p);
        }
    }
    dispatched
}

/// Publish this edge's report every [`PUBLISH_EVERY`] and on large
/// changes, until `shutdown`. Nothing is published while disconnected (a
/// report queued meanwhile would arrive stale but look fresh).
pub async fn publish(router: Arc<Router>, cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let mut last = Report::default();
    let mut last_at: Option<Instant> = None;
    let mut last_print = 0u64;
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let live = router.live();
        let now = clock::now();
        let due = last_at.is_none_or(|t| now.saturating_duration_since(t) >= PUBLISH_EVERY);
        let print = fingerprint(&live);
        if !due && print == last_print {
            continue;
        }
        last_print = print;
        let report = report(&live, &cluster.edge, now);
        if !due && !large_change(&live, &last, &report) {
            continue;
        }
        drop(live);
        last_at = Some(now);
        if !cluster.is_connected() {
            cluster.stats.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::CLUSTER_PUBLISHES_DROPPED).increment(1);
            continue;
        }
        let body = match serde_json::to_vec(&report) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the load report");
                continue;
            }
        };
        let subject = cluster.subject("load", &cluster.edge);
        let sent = cluster.bounded("publishing load", cluster.client.publish(subject, body.into())).await;
        match sent {
            Some(Ok(())) => {
                cluster.stats.published.fetch_add(1, Ordering::Relaxed);
                last = report;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "load report not sent");
                cluster.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::CLUSTER_PUBLISHES_DROPPED).increment(1);
            }
            None => {
                cluster.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::CLUSTER_PUBLISHES_DROPPED).increment(1);
            }
        }
    }
}

/// Read the other edges' reports into the live states until `shutdown`;
/// reports that stop coming age out on the next tick.
pub async fn receive(router: Arc<Router>, cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let Some(mut sub) = cluster.subscribe(cluster.subject("load", "*"), &mut shutdown).await else { return };
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                let report: Report = match serde_json::from_slice(&msg.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(subject = %msg.subject, error = %e, "ignoring a malformed load report");
                        continue;
                    }
                };
                if *report.edge == *cluster.edge {
                    continue;
                }
                let now = clock::now();
                cluster
                    .peers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(report.edge.as_str().into(), Received { at: now, report });
                apply(&cluster, &router.live(), now);
            }
            _ = tick.tick() => apply(&cluster, &router.live(), clock::now()),
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool in a report: id, in flight, held, and in flight per replica.
    type Row<'a> = (&'a str, u32, u32, &'a [(&'a str, u32)]);

    fn received(edge: &str, at: Instant, pools: &[Row<'_>]) -> Received {
        let pools = pools
            .iter()
            .map(|(id, in_flight, held, replicas)| {
                let replicas = replicas.iter().map(|(a, n)| (a.to_string(), *n)).collect();
                (id.to_string(), PoolReport { in_flight: *in_flight, held: *held, routed_away: 0, replicas })
            })
            .collect();
        Received { at, report: Report { edge: edge.to_owned(), pools, rtt_ms: BTreeMap::new() } }
    }

    #[test]
    fn fresh_reports_are_summed_and_stale_ones_ignored() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(10);
        let reports = [
            received("par", now - Duration::from_millis(300), &[("fra-a", 3, 1, &[("127.0.0.1:1", 3)])]),
            received(
                "lon",
                now - Duration::from_millis(900),
                &[("fra-a", 2, 0, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)])],
            ),
            received("iad", now - Duration::from_millis(1100), &[("fra-a", 50, 50, &[("127.0.0.1:1", 50)])]),
        ];
        let (pools, replicas) = sum(reports.iter(), now);
        assert_eq!(pools["fra-a"], Figures { in_flight: 5, held: 1, routed_away: 0 });
        assert_eq!(replicas["127.0.0.1:1"], 4);
        assert_eq!(replicas["127.0.0.1:2"], 1);
    }

    #[test]
    fn a_report_round_trips_and_unknown_fields_are_ignored() {
        let r = received("par", Instant::now(), &[("fra-a", 1, 2, &[("127.0.0.1:1", 1)])]).report;
        let text = serde_json::to_string(&r).expect("encode");
        assert_eq!(serde_json::from_str::<Report>(&text).expect("decode"), r);
        let newer = r#"{"edge":"par","pools":{"x":{"in_flight":1,"streams":4}},"rtt":{}}"#;
        let r: Report = serde_json::from_str(newer).expect("a newer edge's report");
        assert_eq!(r.pools["x"].in_flight, 1);
    }

    #[test]
    fn the_other_edges_fill_the_replicas_here() {
        let router = crate::testing::two_pools(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        let live = router.live();
        let view = live.pools[0].clone();
        view.replicas[0].set_ready(true);
        let addr = view.replicas[0].addr_text.to_string();
        let now = view.state.last_active();
        let cap = view.max_concurrency;
        let mine = report(&live, "fra", now);
        assert!(mine.pools.is_empty(), "nothing to report");
        // Paris fills the replica: Frankfurt sees no free slot.
        let paris = [received("par", now, &[(&view.state.id, cap, 0, &[(&addr, cap)])])];
        let (pools, replicas) = sum(paris.iter(), now);
        view.state.set_elsewhere(pools[&*view.state.id], now, false);
        view.replicas[0].set_elsewhere(replicas[addr.as_str()]);
        assert_eq!(view.free_slots(), 0);
        assert!(view.acquire(now).is_none(), "the pool is full with Paris's requests");
        assert_eq!(view.activity().in_flight, cap, "and busy for the sleeper");
        // One slot taken here shows in this edge's report.
        view.replicas[0].set_elsewhere(cap - 1);
        let slot = view.acquire(now).expect("a slot");
        let mine = report(&live, "fra", now);
        assert_eq!(mine.pools[&*view.state.id].in_flight, 1);
        assert_eq!(mine.pools[&*view.state.id].replicas[&addr], 1);
        assert!(large_change(&live, &Report::default(), &mine), "idle to busy is published at once");
        drop(slot);
    }

    /// A pool of four replicas that take 16 each, with or without affinity.
    fn four_replicas(affinity: &str) -> Arc<Router> {
        let text = format!(
            r#"{}
[[pool]]
id = "fra-gpu"
location = "fra"
serves = ["m"]
replicas = ["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:11", "127.0.0.1:12"]
max_concurrency = 16
{affinity}
[[route]]
service = "m"
"#,
            crate::testing::FRA_PAR
        );
        Router::new(crate::testing::snapshot(&text))
    }

    #[test]
    fn one_more_request_on_a_replica_is_published_at_once_where_affinity_bounds_load() {
        for (affinity, at_once) in [("[pool.affinity]\nkey = \"prefix\"", true), ("", false)] {
            let router = four_replicas(affinity);
            let live = router.live();
            let view = live.pools[0].clone();
            for r in view.replicas.iter() {
                r.set_ready(true);
            }
            let now = view.state.last_active();
            let first = view.acquire(now).expect("a slot");
            let before = report(&live, "fra", now);
            let print = fingerprint(&live);
            let second = view.acquire(now).expect("a slot");
            assert_ne!(fingerprint(&live), print, "the counters moved");
            let after = report(&live, "fra", now);
            assert_eq!(large_change(&live, &before, &after), at_once, "affinity: {affinity:?}");
            drop((first, second));
        }
    }
}
