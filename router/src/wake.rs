//! Waking pools that scaled to zero, and putting idle pools to sleep.
//!
//! **Wake**: single flight per pool. The wake hook is called once, then
//! again with backoff while no replica is ready; meanwhile the pool's
//! replicas are probed fast (every 50–100 ms, jittered) so that the first
//! held request leaves as soon as a replica answers. An orchestrator may also
//! push readiness (`POST /pools/{id}/ready`), which probes at once. A wake
//! that never completes gives up after [`give_up_after`]; held requests are
//! answered by their own deadlines either way.
//!
//! **Route away, then warm**: a cold pool that loses requests only because
//! it sleeps is woken once [`WARM_AFTER`] requests within [`DEMAND_WINDOW`]
//! were routed away from it, so that later requests go near.
//!
//! **Sleep**: only a pool's home edge calls its sleep hook, once per idle
//! period. A pool is idle when nothing is in flight (streams included) and
//! nothing is held here for `idle_timeout`, and, where `load` is configured,
//! its replicas report no running or waiting requests for as long.

use std::sync::Arc;
use std::time::{Duration, Instant};

use stoke_config::PoolId;
use tokio::sync::watch;

use crate::health::{self, jitter};
use crate::hooks::{self, Action};
use crate::metrics as m;
use crate::routing::Router;
use crate::state::PoolView;

/// Requests routed away from a cold pool, within [`DEMAND_WINDOW`], that wake it.
pub const WARM_AFTER: usize = 3;

/// Window over which routed-away requests are counted.
pub const DEMAND_WINDOW: Duration = Duration::from_secs(60);

/// Probe interval while a pool wakes (jittered ±25 %).
pub const FAST_PROBE: Duration = Duration::from_millis(75);

/// First resend of the wake hook: after 1.5 × the expected wake time, and
/// never sooner than this.
pub const MIN_RESEND: Duration = Duration::from_secs(2);

/// Longest gap between two wake hook calls.
pub const MAX_RESEND: Duration = Duration::from_secs(60);

/// How long a wake may go unanswered before it is abandoned (the pool is
/// cold again, and the next request starts a new wake).
pub fn give_up_after(expected: Duration) -> Duration {
    (expected * 10).clamp(Duration::from_secs(60), Duration::from_secs(30 * 60))
}

/// When to call the wake hook again after `attempt` calls.
pub fn resend_after(expected: Duration, attempt: u32) -> Duration {
    let first = expected.mul_f64(1.5).max(MIN_RESEND);
    first.saturating_mul(1 << attempt.saturating_sub(1).min(6)).min(MAX_RESEND)
}

impl Router {
    /// Wake `pool` unless it is warm, has no scale settings, or a wake is
    /// under way.
    pub fn wake(self: &Arc<Self>, live: &crate::state::Live, pool: PoolId, reason: &'static str) {
        let view = live.pool(pool);
        if view.is_warm() || live.snapshot.network.pool(pool).scale.is_none() {
            return;
        }
        if !view.state.begin_wake() {
            return;
        }
        view.state.clear_demand();
        tracing::info!(pool = %view.state.id, reason, "waking pool");
        tokio::spawn(run_wake(self.clone(), view.state.id.clone(), reason));
    }
}

/// The wake loop of one pool, until a replica is ready or it gives up.
async fn run_wake(router: Arc<Router>, pool_id: Arc<str>, reason: &'static str) {
    let started = Instant::now();
    let mut calls = 0u32;
    let mut next_call = started;
    loop {
        let live = router.live();
        let Some(pid) = live.snapshot.network.pool_id(&pool_id) else {
            // The pool left the config.
            if let Some(state) = live.pools.iter().find(|p| *p.state.id == *pool_id) {
                state.state.end_wake(None);
            }
            return;
        };
        let view = live.pool(pid).clone();
        let pool = live.snapshot.network.pool(pid);
        let Some(scale) = &pool.scale else {
            view.state.end_wake(None);
            return;
        };
        let expected = view.state.expected_wake();
        if view.is_warm() {
            let took = started.elapsed();
            view.state.end_wake(Some(took));
            metrics::counter!(m::WAKEUPS_TOTAL, "pool" => pool_id.to_string(), "result" => "ready").increment(1);
            metrics::histogram!(m::WAKE_DURATION, "pool" => pool_id.to_string()).record(took.as_secs_f64());
            tracing::info!(pool = %pool_id, took_ms = took.as_millis() as u64, "pool awake");
            view.dispatch();
            return;
        }
        if started.elapsed() > give_up_after(expected) {
            view.state.end_wake(None);
            metrics::counter!(m::WAKEUPS_TOTAL, "pool" => pool_id.to_string(), "result" => "timeout").increment(1);
            tracing::warn!(pool = %pool_id, after_s = started.elapsed().as_secs(), "wake abandoned: no replica became ready");
            return;
        }
        let now = Instant::now();
        if now >= next_call {
            calls += 1;
            next_call = now + resend_after(expected, calls);
            let (hook, edge) = (scale.wake.clone(), live.snapshot.edge_location().id.clone());
            let id = pool_id.clone();
            // The call runs beside the fast probes, so a slow hook does not
            // delay noticing a replica that is already up.
            tokio::spawn(async move {
                match hooks::call(&hook, Action::Wake, &id, &edge, reason).await {
                    Ok(()) => {
                        metrics::counter!(m::WAKEUPS_TOTAL, "pool" => id.to_string(), "result" => "called")
                            .increment(1);
                    }
                    Err(e) => {
                        metrics::counter!(m::WAKEUPS_TOTAL, "pool" => id.to_string(), "result" => "hook_error")
                            .increment(1);
                        tracing::warn!(pool = %id, attempt = calls, error = %e, "wake hook failed");
                    }
                }
            });
        }
        probe_pool(&view, &pool.health, &pool_id).await;
        tokio::time::sleep(FAST_PROBE.mul_f64(0.75 + fastrand::f64() * 0.5)).await;
    }
}

/// Probe every replica of a pool once, at the same time; dispatch held
/// requests if one became ready.
pub async fn probe_pool(view: &Arc<PoolView>, check: &stoke_config::HealthCheck, pool_id: &str) {
    let probes = view.replicas.iter().map(|r| async move {
        let result = health::probe(r, check).await;
        health::apply(r, pool_id, result, 0)
    });
    futures_util::future::join_all(probes).await;
    if view.is_warm() {
        view.dispatch();
    }
}

/// Put idle pools whose home edge this is to sleep, until `shutdown`.
pub async fn run_sleeper(router: Arc<Router>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let live = router.live();
        let here = live.snapshot.location;
        let mut next_check = Duration::from_secs(5);
        for (pid, pool) in live.snapshot.network.pools.iter().enumerate() {
            let Some(scale) = &pool.scale else { continue };
            if pool.home_edge != here {
                continue;
            }
            next_check = next_check.min(scale.idle_timeout / 4);
            let view = &live.pools[pid];
            let state = &view.state;
            let idle = view.is_warm()
                && state.in_flight() == 0
                && state.queue.is_empty()
                && state.waking_since().is_none()
                && state.last_active().elapsed() >= scale.idle_timeout;
            if !idle || !state.mark_slept() {
                continue;
            }
            let Some(hook) = scale.sleep.clone() else {
                tracing::info!(pool = %state.id, "pool idle; no sleep hook configured");
                continue;
            };
            // Its replicas are about to go: take them out of rotation here
            // now rather than at the next failed probe.
            for r in view.replicas.iter() {
                r.set_ready(false);
            }
            metrics::counter!(m::SLEEPS_TOTAL, "pool" => state.id.to_string()).increment(1);
            tracing::info!(pool = %state.id, idle_s = state.last_active().elapsed().as_secs(), "putting idle pool to sleep");
            let (id, edge) = (state.id.clone(), live.snapshot.edge_location().id.clone());
            tokio::spawn(async move {
                if let Err(e) = hooks::call(&hook, Action::Sleep, &id, &edge, "idle").await {
                    tracing::warn!(pool = %id, error = %e, "sleep hook failed");
                }
            });
        }
        drop(live);
        tokio::select! {
            _ = tokio::time::sleep(jitter(next_check.max(Duration::from_millis(100)))) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resends_back_off_to_a_cap() {
        let e = Duration::from_secs(20);
        assert_eq!(resend_after(e, 1), Duration::from_secs(30));
        assert_eq!(resend_after(e, 2), Duration::from_secs(60));
        assert_eq!(resend_after(e, 9), MAX_RESEND);
        assert_eq!(resend_after(Duration::from_millis(100), 1), MIN_RESEND);
    }

    #[test]
    fn give_up_is_bounded() {
        assert_eq!(give_up_after(Duration::from_secs(1)), Duration::from_secs(60));
        assert_eq!(give_up_after(Duration::from_secs(30)), Duration::from_secs(300));
        assert_eq!(give_up_after(Duration::from_secs(3600)), Duration::from_secs(1800));
    }
}
