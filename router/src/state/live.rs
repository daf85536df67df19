//! A snapshot bound to live state: what a request runs against from start
//! to end, even if a reload happens meanwhile.

use std::sync::Arc;
use std::time::Instant;

use stoke_config::{Candidate, PoolId, ServiceId, Snapshot};

use crate::core::placement::{place, Placement, PoolStatus};

use super::hold::{PoolView, Slot};

/// A snapshot with the state of its pools.
#[derive(Debug)]
pub struct Live {
    /// Increases by one with every successful load.
    pub version: u64,
    /// The compiled config for this edge.
    pub snapshot: Arc<Snapshot>,
    /// Pools by [`PoolId`].
    pub pools: Box<[Arc<PoolView>]>,
    /// Route names as metric labels, by route index.
    pub route_labels: Arc<[metrics::SharedString]>,
    /// API keys of routes with `auth`, by route index.
    pub route_keys: Arc<[Option<crate::access::KeySet>]>,
    /// Whether any pool has `[pool.affinity]` (if none has, requests need
    /// no affinity keys).
    pub any_affinity: bool,
    /// The candidates of each service ranked by measured RTTs, once health
    /// probes have measured some (`None`: the snapshot's ranking). A new
    /// ranking comes in a new `Live` ([`super::Router::rerank`]), so the
    /// request path reads a plain field.
    pub(super) ranked: Option<Ranking>,
}

/// Each service's candidates, by service index.
pub(super) type Ranking = Box<[Box<[Candidate]>]>;

impl Live {
    /// A pool's view.
    #[inline]
    pub fn pool(&self, id: PoolId) -> &Arc<PoolView> {
        &self.pools[id.index()]
    }

    /// What placement knows of `pool` at `now`.
    #[inline]
    pub fn status(&self, pool: PoolId, now: Instant) -> PoolStatus {
        self.pool(pool).status(now)
    }

    /// Where a request for `service` goes, given the state at `now`.
    #[inline]
    pub fn place(&self, service: ServiceId, now: Instant) -> Placement {
        place(self.candidates(service), |p| self.status(p, now))
    }

    /// The pools that serve `service` with their RTTs from this edge,
    /// nearest first, as placement ranks them.
    #[inline]
    pub fn candidates(&self, service: ServiceId) -> &[Candidate] {
        match &self.ranked {
            Some(ranked) => &ranked[service.index()],
            None => self.snapshot.candidates(service),
        }
    }

    /// The RTT placement uses for `pool`: measured by health probes unless
    /// `[[rtt]]` gives it, else the snapshot's estimate.
    pub fn rtt_us(&self, pool: PoolId) -> u32 {
        let net = &self.snapshot.network;
        let (from, to) = (self.snapshot.location.index(), net.pool(pool).location.index());
        match self.pool(pool).state.rtt() {
            Some(m) if net.edge.measure_rtt && !net.rtt.is_given(from, to) => {
                u32::try_from(m.as_micros()).unwrap_or(u32::MAX)
            }
            _ => net.rtt.micros(from, to),
        }
    }

    /// Every service's pools ranked by the RTTs measured so far; `None`
    /// if none is measured or measuring is off. Rare (when an RTT moved
    /// enough to matter), so it may allocate.
    pub(super) fn ranking(&self) -> Option<Ranking> {
        if !self.snapshot.network.edge.measure_rtt || !self.pools.iter().any(|v| v.state.rtt().is_some()) {
            return None;
        }
        let ranked: Ranking = (0..self.snapshot.candidates.len())
            .map(|s| {
                let mut c: Vec<Candidate> = self
                    .snapshot
                    .candidates(ServiceId(s as u32))
                    .iter()
                    .map(|c| Candidate { pool: c.pool, rtt_us: self.rtt_us(c.pool) })
                    .collect();
                c.sort_by_key(|c| c.rtt_us);
                c.into_boxed_slice()
            })
            .collect();
        for view in self.pools.iter() {
            if let Some(m) = view.state.rtt() {
                view.state.mark_ranked(m.as_micros() as u64);
            }
        }
        Some(ranked)
    }

    /// This snapshot and state with a new ranking, if there is one.
    pub(super) fn reranked(&self) -> Option<Live> {
        let ranked = self.ranking()?;
        Some(Live {
            version: self.version,
            snapshot: self.snapshot.clone(),
            pools: self.pools.clone(),
            route_labels: self.route_labels.clone(),
            route_keys: self.route_keys.clone(),
            any_affinity: self.any_affinity,
            ranked: Some(ranked),
        })
    }

    /// Take a slot on a replica of `pool` (power of two choices); `None` if
    /// every ready replica is full.
    #[inline]
    pub fn acquire(&self, pool: PoolId, now: Instant) -> Option<Slot> {
        self.pool(pool).acquire(now)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::placement::Decision;

    #[test]
    fn placement_reads_the_bound_state() {
        let router = crate::testing::two_pools(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        let live = router.live();
        let m = live.snapshot.network.service_id("m").expect("service");
        // The pool's own epoch: its clock keeps whole milliseconds.
        let now = live.pools[0].state.last_active();
        // Both cold: hold for the nearer (this edge's) pool, its whole wake.
        assert_eq!(live.place(m, now).decision, Decision::Hold { pool: PoolId(0), eta_us: 20_000_000 });
        // Paris warm: forward there, and Frankfurt is reported as passed over.
        live.pools[1].replicas[0].set_ready(true);
        let p = live.place(m, now);
        assert_eq!(p.decision, Decision::Forward { pool: PoolId(1) });
        assert_eq!(p.passed_over_cold, Some(PoolId(0)));
        // Frankfurt waking for 15 s of its 20: 5 s left beats nothing, but
        // Paris is free, 9 ms away.
        assert!(live.pools[0].state.begin_wake(now));
        assert_eq!(live.status(PoolId(0), now + Duration::from_secs(15)).wait_us, Some(5_000_000));
        assert_eq!(live.place(m, now).decision, Decision::Forward { pool: PoolId(1) });
    }

    #[test]
    fn measured_rtts_rank_the_pools_unless_the_file_gives_them() {
        let router = crate::testing::two_pools(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        let live = router.live();
        let m = live.snapshot.network.service_id("m").expect("service");
        let now = live.pools[0].state.last_active();
        for v in live.pools.iter() {
            v.replicas[0].set_ready(true);
        }
        assert_eq!(live.place(m, now).decision, Decision::Forward { pool: PoolId(0) }, "Frankfurt is here");
        // Frankfurt's replicas answer in 40 ms, Paris's in 2 ms.
        live.pools[0].state.observe_rtt(Duration::ZERO, Duration::from_millis(40));
        live.pools[1].state.observe_rtt(Duration::ZERO, Duration::from_millis(2));
        router.rerank();
        let stale = live;
        let live = router.live();
        assert_eq!(stale.place(m, now).decision, Decision::Forward { pool: PoolId(0) }, "a request keeps its ranking");
        assert_eq!(live.place(m, now).decision, Decision::Forward { pool: PoolId(1) }, "Paris is nearer in fact");
        assert_eq!(live.candidates(m)[0], Candidate { pool: PoolId(1), rtt_us: 2000 });
    }
}
