//! Binding a new snapshot to the states of the old one: a pool keeps its
//! state (in-flight counts, hold queue, wake progress, learned times) as
//! long as its id stays, and a replica its state (readiness, counters) as
//! long as its pool and address stay. [`diff`] says what changed — a pure
//! function of the two configs; [`StateStore::bind`] carries it out.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stoke_config::Snapshot;

use super::hold::{HoldQueue, PoolView};
use super::live::Live;
use super::pool::PoolState;
use super::replica::ReplicaState;

/// A pool as the diff sees it: its id and its replicas.
pub type PoolKey<'a> = (&'a str, &'a [SocketAddr]);

/// What a reload changes in the set of pools and replicas.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Pools in the new config only.
    pub added_pools: Vec<String>,
    /// Pools in the old config only: their held requests are answered.
    pub removed_pools: Vec<String>,
    /// Pools in both: their state carries over.
    pub kept_pools: Vec<String>,
    /// Replicas new to a kept or added pool (not ready until probed).
    pub added_replicas: Vec<(String, SocketAddr)>,
    /// Replicas gone from a kept or removed pool.
    pub removed_replicas: Vec<(String, SocketAddr)>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added_pools.is_empty()
            && self.removed_pools.is_empty()
            && self.added_replicas.is_empty()
            && self.removed_replicas.is_empty()
    }
}

/// What changes from the pools of `old` to those of `new`, in the order of
/// `new` (then `old` for what left).
pub fn diff(old: &[PoolKey<'_>], new: &[PoolKey<'_>]) -> Diff {
    let old_ids: HashMap<&str, &[SocketAddr]> = old.iter().copied().collect();
    let new_ids: HashSet<&str> = new.iter().map(|(id, _)| *id).collect();
    let mut d = Diff::default();
    for (id, replicas) in new {
        let before: HashSet<&SocketAddr> = match old_ids.get(id) {
            Some(r) => {
                d.kept_pools.push((*id).to_owned());
                r.iter().collect()
            }
            None => {
                d.added_pools.push((*id).to_owned());
                HashSet::new()
            }
        };
        let after: HashSet<&SocketAddr> = replicas.iter().collect();
        d.added_replicas.extend(replicas.iter().filter(|a| !before.contains(a)).map(|a| ((*id).to_owned(), *a)));
        if let Some(r) = old_ids.get(id) {
            d.removed_replicas.extend(r.iter().filter(|a| !after.contains(a)).map(|a| ((*id).to_owned(), *a)));
        }
    }
    for (id, replicas) in old {
        if !new_ids.contains(id) {
            d.removed_pools.push((*id).to_owned());
            d.removed_replicas.extend(replicas.iter().map(|a| ((*id).to_owned(), *a)));
        }
    }
    d
}

/// A replica's identity across snapshots: its pool's id and its address.
type ReplicaKey = (Arc<str>, SocketAddr);

/// Where pool and replica states live between snapshots.
#[derive(Debug, Default)]
pub struct StateStore {
    inner: Mutex<Bound>,
}

#[derive(Debug, Default)]
struct Bound {
    /// Pool ids with their replicas, in the order of the bound snapshot.
    keys: Vec<(Arc<str>, Vec<SocketAddr>)>,
    pools: HashMap<Arc<str>, (Arc<PoolState>, Arc<HoldQueue>)>,
    replicas: HashMap<ReplicaKey, Arc<ReplicaState>>,
}

impl StateStore {
    /// Bind `snapshot` to states at `now`: existing ones for pool ids and
    /// replica addresses seen before, new ones otherwise. Returns the new
    /// live view, the states of pools that left the config, and the diff.
    pub fn bind(&self, version: u64, snapshot: Arc<Snapshot>, now: Instant) -> (Live, Vec<Arc<PoolState>>, Diff) {
        let mut bound = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old: Vec<PoolKey<'_>> = bound.keys.iter().map(|(id, r)| (&**id, r.as_slice())).collect();
        let new: Vec<PoolKey<'_>> =
            snapshot.network.pools.iter().map(|p| (p.id.as_str(), p.replicas.as_slice())).collect();
        let diff = diff(&old, &new);
        drop(old);

        let mut next = Bound::default();
        let views = snapshot
            .network
            .pools
            .iter()
            .map(|pool| {
                let wake_time = pool.scale.as_ref().map_or(Duration::ZERO, |s| s.wake_time);
                let (state, queue) = bound
                    .pools
                    .get(pool.id.as_str())
                    .cloned()
                    .unwrap_or_else(|| (Arc::new(PoolState::new(&pool.id, wake_time, now)), Arc::default()));
                if let Some(light) = pool.scale.as_ref().and_then(|s| s.light.as_ref()) {
                    state.seed_light_wake(light.wake_time);
                }
                next.pools.insert(state.id.clone(), (state.clone(), queue.clone()));
                next.keys.push((state.id.clone(), pool.replicas.clone()));
                let replicas = pool
                    .replicas
                    .iter()
                    .map(|&addr| {
                        let key = (state.id.clone(), addr);
                        let r = bound.replicas.get(&key).cloned().unwrap_or_else(|| Arc::new(ReplicaState::new(addr)));
                        next.replicas.insert(key, r.clone());
                        r
                    })
                    .collect();
                Arc::new(PoolView {
                    label: metrics::SharedString::from(state.id.clone()),
                    state,
                    queue,
                    replicas,
                    max_concurrency: pool.max_concurrency,
                    max_queue: pool.max_queue,
                    scales: pool.scale.is_some(),
                    learns_gaps: pool
                        .scale
                        .as_ref()
                        .is_some_and(|s| matches!(s.idle_timeout, stoke_config::IdleTimeout::Auto { .. })),
                    affinity: pool.affinity.clone(),
                    replica_ids: pool
                        .replicas
                        .iter()
                        .map(|a| crate::core::affinity::hash(a.to_string().as_bytes()))
                        .collect(),
                })
            })
            .collect();
        let removed =
            diff.removed_pools.iter().filter_map(|id| bound.pools.get(id.as_str()).map(|(s, _)| s.clone())).collect();
        *bound = next;
        let route_labels = snapshot
            .network
            .routes
            .iter()
            .map(|r| metrics::SharedString::from(Arc::<str>::from(r.name.as_str())))
            .collect();
        let route_keys =
            snapshot.network.routes.iter().map(|r| r.auth.as_ref().map(crate::access::KeySet::new)).collect();
        let any_affinity = snapshot.network.pools.iter().any(|p| p.affinity.is_some());
        let mut live = Live { version, snapshot, pools: views, route_labels, route_keys, any_affinity, ranked: None };
        // RTTs measured under the last snapshot still hold.
        live.ranked = live.ranking();
        (live, removed, diff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn nothing_changes_between_equal_configs() {
        let r = [a(1), a(2)];
        let d = diff(&[("fra", &r)], &[("fra", &r)]);
        assert!(d.is_empty());
        assert_eq!(d.kept_pools, ["fra"]);
    }

    #[test]
    fn pools_and_replicas_that_come_and_go() {
        let (fra_old, fra_new, par) = ([a(1), a(2)], [a(2), a(3)], [a(9)]);
        let lon = [a(7)];
        let d = diff(&[("fra", &fra_old), ("lon", &lon)], &[("fra", &fra_new), ("par", &par)]);
        assert_eq!(d.kept_pools, ["fra"]);
        assert_eq!(d.added_pools, ["par"]);
        assert_eq!(d.removed_pools, ["lon"]);
        assert_eq!(d.added_replicas, [("fra".to_owned(), a(3)), ("par".to_owned(), a(9))]);
        assert_eq!(d.removed_replicas, [("fra".to_owned(), a(1)), ("lon".to_owned(), a(7))]);
    }

    #[test]
    fn a_replica_moved_to_another_pool_is_new_there() {
        let r = [a(1)];
        let d = diff(&[("fra", &r), ("par", &[])], &[("fra", &[]), ("par", &r)]);
        assert_eq!(d.added_replicas, [("par".to_owned(), a(1))]);
        assert_eq!(d.removed_replicas, [("fra".to_owned(), a(1))]);
    }

    #[test]
    fn the_first_bind_adds_everything() {
        let r = [a(1)];
        let d = diff(&[], &[("fra", &r)]);
        assert_eq!(d.added_pools, ["fra"]);
        assert_eq!(d.added_replicas.len(), 1);
        assert!(d.removed_pools.is_empty());
    }
}
