//! A snapshot bound to live state: what a request runs against from start
//! to end, even if a reload happens meanwhile.

use std::sync::Arc;
use std::time::Instant;

use stoke_config::{PoolId, ServiceId, Snapshot};

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
    pub route_labels: Box<[metrics::SharedString]>,
    /// API keys of routes with `auth`, by route index.
    pub route_keys: Box<[Option<crate::access::KeySet>]>,
    /// Whether any pool has `[pool.affinity]` (if none has, requests need
    /// no affinity keys).
    pub any_affinity: bool,
}

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
        place(self.snapshot.candidates(service), |p| self.status(p, now))
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
}
