//! Waking pools that scaled to zero: single flight per pool. The wake hook
//! is called once, then again with backoff while no replica is ready
//! ([`crate::core::wake`] says when); meanwhile the pool's replicas are
//! probed fast (every 50–100 ms) so that the first held request leaves as
//! soon as a replica answers. An orchestrator may also push readiness
//! (`POST /pools/{id}/ready`), which probes at once. A wake that never
//! completes is given up; held requests are answered by their own
//! deadlines either way.

use std::sync::Arc;

use stoke_config::PoolId;

use super::cluster::{self, Claim};
use super::hooks::{self, Action, Depth};
use super::probe;
use crate::clock;
use crate::core::wake::{resend_after, WakeSchedule, WakeStep, FAST_PROBE};
use crate::metrics as m;
use crate::otel::WakeTrace;
use crate::state::{Live, PoolView, Router};

/// Why a wake starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A request is held for the pool.
    Request,
    /// Requests keep being routed away from it because it sleeps.
    Demand,
    /// Its home edge expects a busy period to start soon
    /// (`idle_timeout = "auto"`).
    Prewarm,
}

impl Reason {
    /// As sent to the hook and logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Request => "request",
            Reason::Demand => "demand",
            Reason::Prewarm => "prewarm",
        }
    }
}

/// Wake `pool` unless it is warm, has no scale settings, or a wake is
/// under way; true if this call started one.
pub fn start(router: &Arc<Router>, live: &Live, pool: PoolId, reason: Reason) -> bool {
    let view = live.pool(pool);
    let Some(schedule) = begin(view, clock::now(), reason) else { return false };
    tracing::info!(pool = %view.state.id, reason = reason.as_str(), "waking pool");
    let traced = router.tracer().as_ref().map(WakeTrace::begin);
    view.state.set_wake_span(traced.as_ref().map(|t| t.id));
    tokio::spawn(run(router.clone(), view.state.id.clone(), reason, schedule, traced));
    true
}

/// Begin a wake of `view` at `now` for `reason` unless it is warm, cannot
/// wake, or a wake is under way: the schedule the wake loop then follows.
pub fn begin(view: &PoolView, now: std::time::Instant, reason: Reason) -> Option<WakeSchedule> {
    if view.is_warm() || !view.scales || !view.state.begin_wake(now) {
        return None;
    }
    match reason {
        Reason::Request => view.state.note_wake(true),
        Reason::Demand => view.state.note_wake(false),
        Reason::Prewarm => {}
    }
    Some(WakeSchedule::new(now))
}

/// The wake loop of one pool, until a replica is ready or it gives up.
/// In a cluster, each hook call is claimed first: only the edge that holds
/// the claim calls it, the others probe and try again when the claim runs
/// out.
async fn run(
    router: Arc<Router>,
    pool_id: Arc<str>,
    reason: Reason,
    mut schedule: WakeSchedule,
    mut traced: Option<WakeTrace>,
) {
    let cluster = cluster::of(&router);
    let mut calls = 0;
    // The wake's span ends with it, however it ends.
    let mut end = |state: &crate::state::PoolState, result: &'static str, calls: u32| {
        state.set_wake_span(None);
        if let Some(t) = traced.take() {
            t.end(&pool_id, reason.as_str(), result, calls);
        }
    };
    // Whether this edge called the hook in this wake (then it announces
    // the ready pool, and releases a claim it gives up).
    let mut claimed = false;
    loop {
        let live = router.live();
        let Some(pid) = live.snapshot.network.pool_id(&pool_id) else {
            // The pool left the config.
            if let Some(view) = live.pools.iter().find(|p| *p.state.id == *pool_id) {
                view.state.end_wake(None);
                end(&view.state, "removed", calls);
            }
            return;
        };
        let view = live.pool(pid).clone();
        let pool = live.snapshot.network.pool(pid);
        let Some(scale) = &pool.scale else {
            view.state.end_wake(None);
            end(&view.state, "removed", calls);
            return;
        };
        let now = clock::now();
        match schedule.step(now, view.is_warm(), view.state.expected_wake()) {
            WakeStep::Ready { took } => {
                let depth = view.state.wake_depth();
                view.state.end_wake(Some(took));
                view.state.woke(now);
                view.state.set_wake_error(None);
                metrics::counter!(m::WAKEUPS_TOTAL, "pool" => pool_id.to_string(), "result" => "ready").increment(1);
                metrics::histogram!(m::WAKE_DURATION, "pool" => pool_id.to_string()).record(took.as_secs_f64());
                if depth == "light" {
                    metrics::counter!(m::LIGHT_WAKEUPS_TOTAL, "pool" => pool_id.to_string()).increment(1);
                }
                tracing::info!(pool = %pool_id, took_ms = took.as_millis() as u64, depth, "pool awake");
                end(&view.state, "ready", calls);
                view.dispatch(now);
                if let (Some(c), true) = (&cluster, claimed) {
                    c.wake_ready(&pool_id).await;
                }
                return;
            }
            WakeStep::GiveUp { after } => {
                view.state.end_wake(None);
                let why = view.state.wake_error().unwrap_or_else(|| "the hook answered".to_owned());
                view.state.set_wake_error(Some(format!(
                    "no replica became ready within {} s ({why}); the next request wakes it again",
                    after.as_secs()
                )));
                metrics::counter!(m::WAKEUPS_TOTAL, "pool" => pool_id.to_string(), "result" => "timeout").increment(1);
                tracing::warn!(pool = %pool_id, after_s = after.as_secs(), "wake abandoned: no replica became ready");
                end(&view.state, "timeout", calls);
                if let (Some(c), true) = (&cluster, claimed) {
                    c.release(&pool_id).await;
                }
                return;
            }
            WakeStep::Call { attempt } => {
                let call = match &cluster {
                    None => true,
                    Some(c) => {
                        // The claimant renews before its lease runs out: at
                        // its next resend, which comes a margin earlier.
                        let lease = resend_after(view.state.expected_wake(), attempt) + cluster::claim::LEASE_MARGIN;
                        match c.claim_wake(&pool_id, lease).await {
                            Claim::Won => {
                                claimed = true;
                                true
                            }
                            Claim::Alone => true,
                            Claim::Lost { holder, retry_in } => {
                                tracing::debug!(pool = %pool_id, holder = %holder, retry_ms = retry_in.as_millis() as u64, "another edge wakes the pool");
                                schedule.defer(clock::now() + retry_in.clamp(FAST_PROBE, MAX_CLAIM_WAIT));
                                false
                            }
                        }
                    }
                };
                if call {
                    calls += 1;
                    call_hook(&live, &view, scale, &pool_id, reason, attempt);
                }
            }
            WakeStep::Probe => {}
        }
        probe_pool(&view, &pool.health, &pool_id).await;
        tokio::time::sleep(FAST_PROBE.mul_f64(0.75 + fastrand::f64() * 0.5)).await;
    }
}

/// Call the wake hook of `view` (the `attempt`-th call). It runs beside
/// the fast probes, so a slow hook does not delay noticing a replica that
/// is already up.
fn call_hook(
    live: &Live,
    view: &PoolView,
    scale: &stoke_config::Scale,
    pool_id: &Arc<str>,
    reason: Reason,
    attempt: u32,
) {
    let edge = live.snapshot.edge_location().id.clone();
    let (id, state) = (pool_id.clone(), view.state.clone());
    let count = view.replicas.len() as u32;
    // From light sleep: each sleeping replica's own wake. From deep sleep
    // (or a light one whose replicas stopped since): the pool's.
    let asleep: Vec<Arc<str>> = view.replicas.iter().filter(|r| r.is_asleep()).map(|r| r.addr_text.clone()).collect();
    let (hook, depth, addrs) = match &scale.light {
        Some(light) if !asleep.is_empty() => (light.wake.clone(), Depth::Light, asleep),
        _ => (scale.wake.clone(), Depth::Deep, view.replicas.iter().map(|r| r.addr_text.clone()).collect()),
    };
    tokio::spawn(async move {
        let what = hooks::Call {
            action: Action::Wake,
            pool: &id,
            edge: &edge,
            reason: reason.as_str(),
            replicas: count,
            depth,
            replica_addrs: &addrs,
        };
        match hooks::call(&hook, &what).await {
            Ok(()) => {
                state.set_wake_error(None);
                metrics::counter!(m::WAKEUPS_TOTAL, "pool" => id.to_string(), "result" => "called").increment(1);
            }
            Err(e) => {
                state.set_wake_error(Some(format!("{} wake hook call {attempt} failed: {e}", depth.as_str())));
                metrics::counter!(m::WAKEUPS_TOTAL, "pool" => id.to_string(), "result" => "hook_error").increment(1);
                tracing::warn!(pool = %id, attempt, error = %e, "wake hook failed");
            }
        }
    });
}

/// Longest an edge waits before asking again for a claim another edge
/// holds (a claim's lease can be long when the pool wakes slowly).
pub(crate) const MAX_CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Probe every replica of a pool once, at the same time; dispatch held
/// requests if one became ready.
pub async fn probe_pool(view: &Arc<PoolView>, check: &stoke_config::HealthCheck, pool_id: &str) {
    let probes = view.replicas.iter().map(|r| async move {
        let (result, _) = probe::probe_and_measure(view, r, check).await;
        probe::apply(r, pool_id, result, 0)
    });
    futures_util::future::join_all(probes).await;
    view.note_depth();
    if view.is_warm() {
        view.dispatch(clock::now());
    }
}
