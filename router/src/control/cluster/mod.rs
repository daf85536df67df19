//! The network acting as one, over NATS (`[cluster]`): each edge publishes
//! its per-pool load and reads the others' ([`load`]), claims a wake in a
//! JetStream KV bucket before calling a pool's wake hook so that one edge
//! calls it for the whole network ([`claim`]), and tells the others when
//! the pool is ready.
//!
//! The cluster only improves decisions, it never makes them: every call is
//! bounded by `[cluster].timeout` and fails open to what the edge would do
//! alone. A call that times out marks the edge alone until its connection
//! comes back, so an outage delays a wake by the timeout once, not per call.
//! Nothing here is on a request's path: requests read atomics that the
//! receiver keeps up to date.
//!
//! | subject or bucket | carries |
//! | --- | --- |
//! | `{name}.load.{edge}` | an edge's report: per pool in flight, held, routed away, per replica in flight |
//! | `{name}.ready.{pool}` | the wake's claimant saw a replica ready |
//! | `{name}-wakes` (KV) | one claim per pool: which edge calls the hook, until when |
//! | `{name}-config` (KV) | config versions, the rollout in force, each edge's report ([`rollout`]) |

pub mod claim;
pub mod load;
pub mod rollout;

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use stoke_config::ClusterSettings;
use tokio::sync::{watch, OnceCell};

use crate::clock;
use crate::metrics as m;
use crate::state::Router;

pub use claim::Claim;

/// How long an edge whose cluster call failed decides alone before it
/// tries the cluster again, if its connection did not drop meanwhile.
pub const RETRY_ALONE: Duration = Duration::from_secs(10);

/// How often the client pings its server: a dead connection is noticed
/// within a few of these.
const PING_EVERY: Duration = Duration::from_secs(2);

/// This edge's membership of the cluster.
pub struct Cluster {
    settings: ClusterSettings,
    /// This edge's location id.
    edge: Arc<str>,
    client: async_nats::Client,
    js: jetstream::Context,
    kv: OnceCell<jetstream::kv::Store>,
    /// A call timed out or failed: decide alone until the connection
    /// comes back, or [`RETRY_ALONE`] has passed (a leaf whose link to the
    /// hub broke keeps its own connection up).
    alone_since: Mutex<Option<Instant>>,
    /// The latest report of each other edge, with when it arrived.
    peers: Mutex<HashMap<Arc<str>, load::Received>>,
    stats: Stats,
    /// This edge's side of config rollouts.
    follower: Arc<rollout::Follower>,
}

/// Counters for `/state` (the same figures go to `/metrics`).
#[derive(Debug, Default)]
struct Stats {
    claims_won: AtomicU64,
    claims_lost: AtomicU64,
    claims_alone: AtomicU64,
    published: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("name", &self.settings.name).field("edge", &self.edge).finish()
    }
}

/// The cluster of `router`, if it has one.
pub fn of(router: &Router) -> Option<Arc<Cluster>> {
    router.cluster().and_then(|c| c.clone().downcast::<Cluster>().ok())
}

impl Cluster {
    /// Join the cluster of `router`'s config, if it has `[cluster]`: the
    /// connection is made in the background (retried for ever), so an edge
    /// whose NATS server is down starts and serves alone. Spawns the
    /// publisher, which stops with `draining` (a process that drains after
    /// an upgrade leaves this edge's report to the new one), and the
    /// receivers and claims, which stop with `shutdown`.
    pub async fn join(
        router: &Arc<Router>,
        draining: watch::Receiver<bool>,
        shutdown: watch::Receiver<bool>,
    ) -> Option<Arc<Cluster>> {
        let live = router.live();
        let settings = live.snapshot.network.cluster.clone()?;
        let edge: Arc<str> = live.snapshot.edge_location().id.as_str().into();
        drop(live);
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let options = async_nats::ConnectOptions::new()
            .name(format!("stoke {edge}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .ping_interval(PING_EVERY)
            .connection_timeout(settings.timeout.max(Duration::from_secs(1)))
            .request_timeout(Some(settings.timeout))
            // Come back quickly: an edge alone makes one wake call per edge.
            .reconnect_delay_callback(|attempts| Duration::from_millis(100 * (attempts as u64).min(10)))
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            });
        let client = match options.connect(settings.nats.clone()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the NATS client; this edge decides alone");
                return None;
            }
        };
        // Through a leaf node, JetStream is the hub's, reached by its domain.
        let js = match &settings.domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        let cluster = Arc::new(Cluster {
            settings,
            edge,
            client,
            js,
            kv: OnceCell::new(),
            alone_since: Mutex::new(None),
            peers: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            follower: Arc::default(),
        });
        router.set_cluster(cluster.clone() as Arc<dyn Any + Send + Sync>);
        tracing::info!(
            name = %cluster.settings.name,
            nats = ?cluster.settings.nats,
            timeout_ms = cluster.settings.timeout.as_millis() as u64,
            "joining the cluster"
        );
        tokio::spawn(cluster.clone().watch_events(events, shutdown.clone()));
        tokio::spawn(load::publish(router.clone(), cluster.clone(), draining));
        tokio::spawn(load::receive(router.clone(), cluster.clone(), shutdown.clone()));
        tokio::spawn(claim::prepare(cluster.clone(), shutdown.clone()));
        tokio::spawn(claim::receive_ready(router.clone(), cluster.clone(), shutdown));
        Some(cluster)
    }

    /// The cluster's name (the prefix of its subjects and bucket).
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// This edge's side of config rollouts (`/state.rollout`).
    pub fn follower(&self) -> &rollout::Follower {
        &self.follower
    }

    /// The config bucket (versions, the rollout, the edges' reports).
    pub async fn config_store(&self) -> Result<async_nats::jetstream::kv::Store, String> {
        rollout::open_bucket(&self.js, &self.settings.name).await
    }

    /// Whether cluster calls are made now: connected, and no call has
    /// failed since the connection was made.
    pub fn is_up(&self) -> bool {
        let alone = self.alone_since.lock().unwrap_or_else(|e| e.into_inner());
        alone.is_none_or(|since| since.elapsed() >= RETRY_ALONE) && self.is_connected()
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A cluster call failed or timed out: decide alone until the
    /// connection is made again.
    fn go_alone(&self, why: &str) {
        let mut alone = self.alone_since.lock().unwrap_or_else(|e| e.into_inner());
        if alone.is_none() {
            tracing::warn!(why, "cluster call failed; this edge decides alone until NATS reconnects");
        }
        *alone = Some(Instant::now());
    }

    async fn watch_events(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<async_nats::Event>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        metrics::gauge!(m::CLUSTER_CONNECTED).set(0.0);
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                _ = shutdown.wait_for(|s| *s) => None,
            };
            let Some(event) = event else { return };
            match event {
                async_nats::Event::Connected => {
                    *self.alone_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    metrics::gauge!(m::CLUSTER_CONNECTED).set(1.0);
                    tracing::info!(name = %self.settings.name, "connected to the cluster");
                }
                async_nats::Event::Disconnected => {
                    metrics::gauge!(m::CLUSTER_CONNECTED).set(0.0);
                    tracing::warn!(name = %self.settings.name, "lost the cluster connection; deciding alone");
                }
                other => tracing::debug!(event = %other, "cluster event"),
            }
        }
    }

    /// `[cluster]` in `/state`: connection, peers heard from, claims and
    /// publishes.
    pub fn state_json(&self) -> serde_json::Value {
        let now = clock::now();
        let peers = self.fresh_peers(now);
        let s = &self.stats;
        serde_json::json!({
            "name": self.settings.name,
            "nats": self.settings.nats,
            "connected": self.is_connected(),
            "alone": !self.is_up(),
            "claims_ready": self.claims_ready(),
            "peers": peers,
            "claims": {
                "won": s.claims_won.load(Ordering::Relaxed),
                "lost": s.claims_lost.load(Ordering::Relaxed),
                "alone": s.claims_alone.load(Ordering::Relaxed),
            },
            "publishes": s.published.load(Ordering::Relaxed),
            "publishes_dropped": s.dropped.load(Ordering::Relaxed),
        })
    }

    /// Edges whose last report is fresh at `now`: their id, the report's
    /// age and the RTTs they measured to each pool.
    pub fn fresh_peers(&self, now: Instant) -> Vec<serde_json::Value> {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh: Vec<_> =
            peers.iter().filter(|(_, r)| now.saturating_duration_since(r.at) <= load::FRESH).collect();
        fresh.sort_by(|a, b| a.0.cmp(b.0));
        fresh
            .into_iter()
            .map(|(edge, r)| {
                serde_json::json!({
                    "edge": &**edge,
                    "age_ms": now.saturating_duration_since(r.at).as_millis() as u64,
                    "rtt_ms": r.report.rtt_ms,
                })
            })
            .collect()
    }

    /// Subscribe to `subject`, retrying every second until it works or
    /// `shutdown` (`None`). Made once: the client renews it on reconnect.
    async fn subscribe(&self, subject: String, shutdown: &mut watch::Receiver<bool>) -> Option<async_nats::Subscriber> {
        loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(subject, error = %e, "cannot subscribe; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.wait_for(|s| *s) => return None,
                    }
                }
            }
        }
    }

    fn subject(&self, kind: &str, tail: &str) -> String {
        format!("{}.{kind}.{tail}", self.settings.name)
    }

    /// Run `call` within the cluster timeout; `None` (and alone) if it
    /// does not answer in time.
    async fn bounded<T>(&self, what: &str, call: impl std::future::Future<Output = T>) -> Option<T> {
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(v) => Some(v),
            Err(_) => {
                self.go_alone(&format!("{what}: no answer within {:?}", self.settings.timeout));
                None
            }
        }
    }
}

/// Open the KV bucket `bucket`, creating it if it is not there (creating
/// is idempotent: edges starting together all succeed). One value per key,
/// each kept for `max_age` (zero: for ever).
///
/// The bucket's stream is made directly, as a KV bucket is laid out,
/// rather than with the client's `create_key_value`: that one reads the
/// account's info first, in a shape NATS 2.9 does not send.
async fn open_kv(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
) -> Result<jetstream::kv::Store, String> {
    use jetstream::stream;
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let created = js
        .create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(description.to_owned()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await;
    match (created, js.get_key_value(bucket).await) {
        (_, Ok(store)) => Ok(store),
        // Another edge made it meanwhile, and this one's create was
        // refused: the bucket is there all the same.
        (Err(e), Err(_)) => Err(format!("cannot create the KV bucket {bucket}: {e}")),
        (Ok(_), Err(e)) => Err(format!("cannot open the KV bucket {bucket}: {e}")),
    }
}
