//! The edge's routing state: the live snapshot, swapped atomically on
//! reload, and the pool states it is bound to.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use stoke_config::Snapshot;
use tokio::sync::watch;

use crate::access::RateLimiter;
use crate::otel::Tracer;

use super::bind::StateStore;
use super::budget::BodyBudget;
use super::live::Live;

/// The edge's routing state: the live snapshot and the pool states.
#[derive(Debug)]
pub struct Router {
    live: ArcSwap<Live>,
    store: StateStore,
    version: AtomicU64,
    changes: watch::Sender<u64>,
    /// Token buckets of the routes' rate limits (kept across reloads).
    pub limiter: RateLimiter,
    /// Request body bytes held in memory, edge-wide.
    pub bodies: Arc<BodyBudget>,
    /// The cluster this edge is part of, set once at start. Typed by
    /// `control::cluster`, which this layer does not depend on.
    cluster: OnceLock<Extension>,
    /// The request tracer, while `[tracing]` is configured.
    tracer: ArcSwapOption<Tracer>,
}

/// A value a higher layer attaches to the router.
struct Extension(Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Extension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Extension")
    }
}

impl Router {
    /// A router serving `snapshot` as version 1.
    pub fn new(snapshot: Snapshot) -> Arc<Router> {
        let store = StateStore::default();
        let bodies = BodyBudget::new(snapshot.network.edge.max_buffered_bodies);
        let (live, _, _) = store.bind(1, Arc::new(snapshot), crate::clock::now());
        let (changes, _) = watch::channel(1);
        let tracer = ArcSwapOption::empty();
        retrace(&tracer, &live.snapshot);
        Arc::new(Router {
            live: ArcSwap::from_pointee(live),
            store,
            version: AtomicU64::new(1),
            changes,
            limiter: RateLimiter::default(),
            bodies,
            cluster: OnceLock::new(),
            tracer,
        })
    }

    /// The request tracer, if `[tracing]` is configured.
    #[inline]
    pub fn tracer(&self) -> arc_swap::Guard<Option<Arc<Tracer>>> {
        self.tracer.load()
    }

    /// Attach the cluster handle (once; later calls are ignored).
    pub fn set_cluster(&self, cluster: Arc<dyn Any + Send + Sync>) {
        let _ = self.cluster.set(Extension(cluster));
    }

    /// The cluster handle, if one was attached.
    pub fn cluster(&self) -> Option<&Arc<dyn Any + Send + Sync>> {
        self.cluster.get().map(|e| &e.0)
    }

    /// Rank the pools again by the RTTs the probes measured: the live
    /// snapshot and state, with the new ranking, replace the old unless a
    /// reload replaced them first (that one ranked itself). Requests under
    /// way keep the ranking they started with.
    pub fn rerank(&self) {
        let old = self.live();
        let Some(new) = old.reranked() else { return };
        let _ = self.live.compare_and_swap(&old, Arc::new(new));
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
        let now = crate::clock::now();
        let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        let old = self.live();
        self.bodies.set_max(snapshot.network.edge.max_buffered_bodies);
        let (live, removed, diff) = self.store.bind(version, Arc::new(snapshot), now);
        retrace(&self.tracer, &live.snapshot);
        if !diff.is_empty() {
            tracing::info!(
                version,
                added_pools = ?diff.added_pools,
                removed_pools = ?diff.removed_pools,
                added_replicas = diff.added_replicas.len(),
                removed_replicas = diff.removed_replicas.len(),
                "pools changed"
            );
        }
        let live = Arc::new(live);
        self.live.store(live.clone());
        for state in removed {
            if let Some(view) = old.pools.iter().find(|v| Arc::ptr_eq(&v.state, &state)) {
                view.close();
            }
        }
        // Capacity may have changed (replicas added, limits raised).
        for view in live.pools.iter() {
            view.dispatch(now);
        }
        self.changes.send_replace(version);
        live
    }
}

/// Start, restart or stop the tracer for `snapshot`'s `[tracing]`: one
/// with the same settings stays (its queue and export task with it).
/// Without a Tokio runtime (no export task can run) there is none.
fn retrace(tracer: &ArcSwapOption<Tracer>, snapshot: &Snapshot) {
    let wanted = snapshot.network.tracing.as_ref();
    let current = tracer.load();
    if current.as_ref().map(|t| t.settings()) == wanted {
        return;
    }
    let new = match wanted {
        Some(settings) if tokio::runtime::Handle::try_current().is_ok() => {
            match Tracer::start(settings, &snapshot.edge_location().id) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "tracing stays off");
                    None
                }
            }
        }
        _ => None,
    };
    tracer.store(new);
}
