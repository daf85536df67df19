//! The sleeper: only a pool's home edge calls its sleep hook, once per idle
//! period ([`crate::core::idle`] says when a pool is idle). Where `load` is
//! configured, replicas that report running or waiting requests keep their
//! pool awake (the load scrape marks it active).

use std::sync::Arc;
use std::time::{Duration, Instant};

use stoke_config::{Hook, IdleTimeout, PoolId};
use tokio::sync::watch;

use super::hooks::{self, Action, Depth};
use super::load::parse_load;
use super::probe::jitter;
use super::wake::{self, Reason};
use crate::clock;
use crate::core::idle::{check_interval, is_idle, prewarm_at, sleep_resend_after};
use crate::metrics as m;
use crate::net::client as http_client;
use crate::state::{Live, PoolView, Router};

/// A sleep hook to call.
#[derive(Debug)]
pub struct SleepCall {
    /// The pool.
    pub pool: Arc<str>,
    /// Its sleep hook.
    pub hook: Hook,
    /// How long it was idle.
    pub idle_for: Duration,
    /// The idle window it was put to sleep after.
    pub window: Duration,
    /// Whether each replica was ready before it left rotation.
    pub was_ready: Vec<bool>,
    /// The replicas' addresses, for hooks called per replica.
    pub replicas: Vec<Arc<str>>,
}

/// A light sleep to call: the pool's replicas, out of rotation already.
#[derive(Debug)]
pub struct LightCall {
    /// The pool.
    pub pool: Arc<str>,
    /// Its light sleep hook.
    pub hook: Hook,
    /// How long it was idle.
    pub idle_for: Duration,
    /// The light window it was put to sleep after.
    pub window: Duration,
    /// The replicas being put to sleep (those that were ready).
    pub replicas: Vec<Arc<str>>,
}

/// What the sleeper is to do at one look.
#[derive(Debug, Default)]
pub struct Due {
    /// Sleep hooks to call.
    pub sleeps: Vec<SleepCall>,
    /// Light sleeps to call.
    pub lights: Vec<LightCall>,
    /// Cold pools to wake ahead of a busy period they are expected to have.
    pub prewarm: Vec<PoolId>,
    /// When to look again.
    pub next_check: Duration,
}

/// The pools of `live` whose home edge this is and that are idle at `now`,
/// not yet put to sleep in this idle period. Each is marked slept and its
/// replicas are taken out of rotation here at once (they are about to go),
/// so that no request is sent to a replica that is stopping. Also the cold
/// pools with `idle_timeout = "auto"` due for a pre-warm, and when to look
/// again.
pub fn due(live: &Live, now: Instant) -> Due {
    let here = live.snapshot.location;
    let mut due = Due::default();
    let home_pools = live.snapshot.network.pools.iter().enumerate().filter(|(_, p)| p.home_edge == here);
    let mut timeouts = Vec::new();
    for (pid, pool) in home_pools {
        let Some(scale) = &pool.scale else { continue };
        let view = &live.pools[pid];
        let light = scale.light.as_ref();
        let windows = view.state.windows(scale.idle_timeout, light.map(|l| (l.idle_timeout, l.cost)));
        timeouts.push(windows.deep);
        timeouts.extend(windows.light);
        if let IdleTimeout::Auto { .. } = scale.idle_timeout {
            if prewarm_due(view, now) {
                due.prewarm.push(PoolId(pid as u32));
            }
        }
        let mut activity = view.activity();
        // A pool in light sleep is still up: its deep sleep comes after the
        // deep window as an awake pool's does.
        activity.warm |= view.state.is_light();
        if let (Some(l), Some(window)) = (light, windows.light) {
            if is_idle(&activity, now, window) && view.is_warm() && !is_idle(&activity, now, windows.deep) {
                if let Some(call) = light_due(view, l, window, now) {
                    due.lights.push(call);
                }
                continue;
            }
        }
        let window = windows.deep;
        if !is_idle(&activity, now, window) || !view.state.mark_slept() {
            continue;
        }
        let idle_for = now.saturating_duration_since(view.state.last_active());
        let Some(hook) = scale.sleep.clone() else {
            tracing::info!(pool = %view.state.id, "pool idle; no sleep hook configured");
            continue;
        };
        let was_ready: Vec<bool> = view.replicas.iter().map(|r| r.set_ready(false)).collect();
        // A request may have picked a replica just before it left rotation:
        // then it shows in the replica's count (or its slot was refused),
        // and the pool is not idle after all.
        if view.replicas.iter().any(|r| r.in_flight_now() > 0) || !view.queue.is_empty() {
            for (r, ready) in view.replicas.iter().zip(was_ready) {
                r.set_ready(ready);
            }
            view.state.unmark_slept();
            continue;
        }
        let replicas = view.replicas.iter().map(|r| r.addr_text.clone()).collect();
        due.sleeps.push(SleepCall { pool: view.state.id.clone(), hook, idle_for, window, was_ready, replicas });
    }
    due.next_check = check_interval(timeouts);
    due
}

/// The light sleep of `view` if it is due in this idle period: its ready
/// replicas leave rotation at once (as for a deep sleep), unless a request
/// took a slot on one as they did.
fn light_due(view: &PoolView, light: &stoke_config::LightSleep, window: Duration, now: Instant) -> Option<LightCall> {
    if !view.state.mark_light_slept() {
        return None;
    }
    let ready: Vec<_> = view.replicas.iter().filter(|r| r.is_ready()).collect();
    for r in &ready {
        r.set_entering_sleep(true);
        r.set_ready(false);
    }
    if view.replicas.iter().any(|r| r.in_flight_now() > 0) || !view.queue.is_empty() {
        for r in &ready {
            r.set_entering_sleep(false);
            r.set_ready(true);
        }
        view.state.unmark_light_slept();
        return None;
    }
    Some(LightCall {
        pool: view.state.id.clone(),
        hook: light.sleep.clone(),
        idle_for: now.saturating_duration_since(view.state.last_active()),
        window,
        replicas: ready.iter().map(|r| r.addr_text.clone()).collect(),
    })
}

/// Keep a pool awake after all: a last look at its replicas' own load,
/// just before the sleep hook, found requests that other edges sent since
/// the last scrape. Its replicas return to rotation and a new idle period
/// begins.
pub fn keep(view: &Arc<PoolView>, call: &SleepCall, now: Instant) {
    for (r, ready) in view.replicas.iter().zip(&call.was_ready) {
        r.set_ready(*ready);
    }
    view.state.unmark_slept();
    view.state.touch(now);
    view.dispatch(now);
}

/// Whether a cold pool is due for a wake ahead of the busy period its
/// rhythm foretells: within its wake time (and a quarter) before it, and
/// once per period.
fn prewarm_due(view: &PoolView, now: Instant) -> bool {
    if view.is_warm() || view.state.waking_since().is_some() {
        return false;
    }
    let Some(next) = view.state.next_busy() else { return false };
    let wake = view.state.expected_wake();
    now >= prewarm_at(next, wake) && now < next + wake && view.state.mark_prewarmed(next)
}

/// Put idle pools whose home edge this is to sleep, until `shutdown`.
pub async fn run(router: Arc<Router>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let live = router.live();
        let due = due(&live, clock::now());
        for pool in due.prewarm {
            tracing::info!(pool = %live.pool(pool).state.id, "waking pool ahead of its expected busy period");
            wake::start(&router, &live, pool, Reason::Prewarm);
        }
        let edge: Arc<str> = live.snapshot.edge_location().id.as_str().into();
        drop(live);
        let next_check = due.next_check;
        for call in due.sleeps {
            tokio::spawn(sleep_unless_busy(router.clone(), call, edge.clone()));
        }
        for call in due.lights {
            tokio::spawn(light_sleep(router.clone(), call, edge.clone()));
        }
        tokio::select! {
            _ = tokio::time::sleep(jitter(next_check)) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Look at the replicas' own load once more (where the pool reports it):
/// other edges may have sent requests since the last scrape, and a sleep
/// now would cut them off. Busy: keep the pool. Quiet: call the hook.
async fn sleep_unless_busy(router: Arc<Router>, call: SleepCall, edge: Arc<str>) {
    let live = router.live();
    let Some(pid) = live.snapshot.network.pool_id(&call.pool) else { return };
    let view = live.pool(pid).clone();
    if let Some(busy) = reported_busy(&live, pid, &view).await {
        tracing::info!(pool = %call.pool, busy, "idle here, but its replicas report requests: kept awake");
        keep(&view, &call, clock::now());
        return;
    }
    drop((view, live));
    metrics::counter!(m::SLEEPS_TOTAL, "pool" => call.pool.to_string()).increment(1);
    tracing::info!(pool = %call.pool, idle_s = call.idle_for.as_secs(), window_s = call.window.as_secs_f64(), "putting idle pool to sleep");
    call_with_resends(router, call, edge).await;
}

/// The requests the pool's replicas report running or waiting, where the
/// pool reports load and some do: `None` if quiet (or not reported).
async fn reported_busy(live: &Live, pid: PoolId, view: &Arc<PoolView>) -> Option<u32> {
    let load = live.snapshot.network.pool(pid).load.clone()?;
    let timeout = load.interval.min(Duration::from_secs(2));
    let looks = view.replicas.iter().map(|r| {
        let path = load.path.clone();
        async move {
            let answer = http_client::get(r.addr, &r.addr_text, &path, timeout).await.ok()?;
            std::str::from_utf8(&answer.body).ok().and_then(|t| parse_load(t, load.format))
        }
    });
    let busy: u32 = futures_util::future::join_all(looks).await.into_iter().flatten().sum();
    (busy > 0).then_some(busy)
}

/// Put a pool's replicas to light sleep, unless a last look at their load
/// finds requests that other edges sent: each replica whose call succeeds
/// sleeps lightly; one whose call fails returns to rotation at its next
/// probe.
async fn light_sleep(router: Arc<Router>, call: LightCall, edge: Arc<str>) {
    let live = router.live();
    let Some(pid) = live.snapshot.network.pool_id(&call.pool) else { return };
    let view = live.pool(pid).clone();
    let count = view.replicas.len() as u32;
    let ours = |addr: &str| view.replicas.iter().find(|r| *r.addr_text == *addr).cloned();
    let busy = reported_busy(&live, pid, &view).await;
    // A request may also have come here while the load was read: it is
    // held (or a wake began for it), and the replicas stay awake for it.
    let wanted = !view.queue.is_empty() || view.state.waking_since().is_some();
    if busy.is_some() || wanted {
        tracing::info!(pool = %call.pool, busy = busy.unwrap_or(0), wanted, "idle here, but requests came: kept awake");
        for r in call.replicas.iter().filter_map(|a| ours(a)) {
            r.set_entering_sleep(false);
            r.set_ready(true);
        }
        view.state.unmark_light_slept();
        view.state.touch(clock::now());
        view.dispatch(clock::now());
        return;
    }
    drop(live);
    metrics::counter!(m::LIGHT_SLEEPS_TOTAL, "pool" => call.pool.to_string()).increment(1);
    tracing::info!(pool = %call.pool, idle_s = call.idle_for.as_secs(), window_s = call.window.as_secs_f64(), replicas = call.replicas.len(), "putting idle pool to light sleep");
    let what = hooks::Call {
        action: Action::Sleep,
        pool: &call.pool,
        edge: &edge,
        reason: "idle",
        replicas: count,
        depth: Depth::Light,
        replica_addrs: &call.replicas,
    };
    for (addr, result) in hooks::call_each(&call.hook, &what).await {
        let Some(r) = ours(&addr) else { continue };
        match result {
            Ok(()) => {
                r.set_asleep(true);
            }
            Err(e) => {
                tracing::warn!(pool = %call.pool, replica = %addr, error = %e, "light sleep failed; the replica stays awake")
            }
        }
        r.set_entering_sleep(false);
    }
    view.note_depth();
}

/// Call a sleep hook until it succeeds, resending with backoff while the
/// pool stays idle: activity since, a wake, or the pool leaving the config
/// ends the resends.
async fn call_with_resends(router: Arc<Router>, call: SleepCall, edge: Arc<str>) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let what = hooks::Call {
            action: Action::Sleep,
            pool: &call.pool,
            edge: &edge,
            reason: "idle",
            replicas: 0,
            depth: Depth::Deep,
            replica_addrs: &call.replicas,
        };
        match hooks::call(&call.hook, &what).await {
            Ok(()) => {
                // The next wake, from any edge, starts with a fresh claim.
                if let Some(c) = super::cluster::of(&router) {
                    c.release(&call.pool).await;
                }
                return;
            }
            Err(e) => tracing::warn!(pool = %call.pool, attempt, error = %e, "sleep hook failed; will retry"),
        }
        tokio::time::sleep(sleep_resend_after(attempt)).await;
        let live = router.live();
        let Some(pid) = live.snapshot.network.pool_id(&call.pool) else { return };
        let state = &live.pool(pid).state;
        if !state.is_slept() || state.waking_since().is_some() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn world() -> Arc<Router> {
        crate::testing::two_pools(4, "idle_timeout = \"15s\"\nwake_time = \"1s\"")
    }

    #[test]
    fn an_idle_pool_is_put_to_sleep_exactly_once_by_its_home_edge() {
        let router = world();
        let live = router.live();
        for view in live.pools.iter() {
            view.replicas[0].set_ready(true);
        }
        let t0 = live.pools[0].state.last_active();
        assert!(due(&live, t0 + 14 * S).sleeps.is_empty(), "not idle for the timeout yet");
        let Due { sleeps: calls, next_check: next, .. } = due(&live, t0 + 15 * S);
        // par-gpu is idle too, but its home edge is Paris.
        assert_eq!(calls.iter().map(|c| &*c.pool).collect::<Vec<_>>(), ["fra-gpu"]);
        assert_eq!(calls[0].idle_for, 15 * S);
        assert!(!live.pools[0].is_warm(), "its replicas leave rotation at once");
        assert!(live.pools[1].is_warm());
        assert!(next <= Duration::from_millis(3750));
        // Ready again (a probe, before the replicas stop): no second sleep
        // in the same idle period.
        live.pools[0].replicas[0].set_ready(true);
        assert!(due(&live, t0 + 16 * S).sleeps.is_empty());
        assert!(due(&live, t0 + 100 * S).sleeps.is_empty());
        // A request later opens a new idle period, with its own sleep.
        drop(live.acquire(stoke_config::PoolId(0), t0 + 101 * S));
        let last = live.pools[0].state.last_active();
        assert!(due(&live, last + 14 * S).sleeps.is_empty());
        assert_eq!(due(&live, last + 15 * S).sleeps.len(), 1);
    }

    #[test]
    fn a_pool_with_a_light_depth_sleeps_lightly_first_then_deeply() {
        let router = crate::testing::two_pools(
            4,
            "idle_timeout = \"60s\"\nwake_time = \"20s\"\nlight = { kind = \"vllm\" }\nlight_timeout = \"10s\"",
        );
        let live = router.live();
        live.pools[0].replicas[0].set_ready(true);
        let t0 = live.pools[0].state.last_active();
        let due_at = |t| due(&live, t);
        assert!(due_at(t0 + 9 * S).lights.is_empty());
        let d = due_at(t0 + 10 * S);
        assert_eq!(d.lights.iter().map(|c| &*c.pool).collect::<Vec<_>>(), ["fra-gpu"]);
        assert!(d.sleeps.is_empty(), "no deep sleep before its window");
        assert_eq!(d.lights[0].replicas.len(), 1);
        let r = &live.pools[0].replicas[0];
        assert!(!r.is_ready() && r.is_entering_sleep(), "out of rotation while the call is made");
        assert!(d.next_check <= Duration::from_millis(2500), "checks as often as the light window needs");
        // Once per idle period.
        assert!(due_at(t0 + 20 * S).lights.is_empty());
        // The call succeeded: the replica sleeps lightly.
        r.set_entering_sleep(false);
        r.set_asleep(true);
        live.pools[0].note_depth();
        assert!(live.pools[0].state.is_light());
        assert!(due_at(t0 + 59 * S).sleeps.is_empty());
        // At the deep window, the pool's own sleep hook, light sleep or not.
        let d = due_at(t0 + 60 * S);
        assert_eq!(d.sleeps.iter().map(|c| &*c.pool).collect::<Vec<_>>(), ["fra-gpu"]);
        assert!(d.lights.is_empty());
        // A request opens a new idle period, with its own light sleep.
        live.pools[0].replicas[0].set_asleep(false);
        live.pools[0].replicas[0].set_ready(true);
        live.pools[0].note_depth();
        drop(live.acquire(stoke_config::PoolId(0), t0 + 100 * S));
        let last = live.pools[0].state.last_active();
        assert_eq!(due_at(last + 10 * S).lights.len(), 1);
    }

    #[tokio::test]
    async fn a_request_held_while_the_light_sleep_is_prepared_keeps_the_replicas_awake() {
        let router = crate::testing::two_pools(
            4,
            "idle_timeout = \"60s\"\nwake_time = \"20s\"\nlight = { kind = \"vllm\" }\nlight_timeout = \"10s\"",
        );
        let live = router.live();
        let view = live.pools[0].clone();
        view.replicas[0].set_ready(true);
        let t0 = view.state.last_active();
        let call = due(&live, t0 + 10 * S).lights.pop().expect("a light sleep is due");
        assert!(!view.replicas[0].is_ready());
        // A request arrives as the home edge reads the replicas' load: it is
        // held, the pool having no ready replica at that moment.
        let ticket = view.hold(clock::now()).expect("held");
        light_sleep(router.clone(), call, "fra".into()).await;
        let r = &view.replicas[0];
        assert!(r.is_ready() && !r.is_asleep() && !r.is_entering_sleep(), "back in rotation, not put to sleep");
        assert!(!view.state.is_light());
        drop(ticket);
    }

    #[test]
    fn a_request_taking_a_slot_as_the_sleeper_looks_keeps_the_pool_awake() {
        let router = world();
        let live = router.live();
        live.pools[0].replicas[0].set_ready(true);
        let t0 = live.pools[0].state.last_active();
        // A request has taken the replica's slot, and not yet counted it
        // on the pool: the pool looks idle, but its replica is busy.
        assert!(live.pools[0].replicas[0].try_acquire(4));
        assert!(due(&live, t0 + 60 * S).sleeps.is_empty(), "no sleep for a replica a request is on");
        assert!(live.pools[0].replicas[0].is_ready(), "back in rotation");
        assert!(!live.pools[0].state.is_slept(), "the next idle check may try again");
    }

    #[test]
    fn a_busy_or_held_pool_is_not_put_to_sleep() {
        let router = world();
        let live = router.live();
        live.pools[0].replicas[0].set_ready(true);
        let t0 = live.pools[0].state.last_active();
        let slot = live.acquire(stoke_config::PoolId(0), t0).expect("slot");
        assert!(due(&live, t0 + 60 * S).sleeps.is_empty(), "a request in flight keeps it awake");
        drop(slot);
    }
}
