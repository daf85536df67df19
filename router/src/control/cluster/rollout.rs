//! Staged config rollout over the cluster (`stoke push`): a new version of
//! the network's file goes to the canary edges first; after the bake time,
//! if their health held, to every edge; if it did not, the canaries go back
//! to the previous version and the rollout stops, with the reason.
//!
//! Everything is in one JetStream KV bucket, `{name}-config`:
//!
//! | key | holds |
//! | --- | --- |
//! | `version.{N}` | version N: the file's text, its hash, the note and author, when it was pushed |
//! | `rollout` | the rollout in force: its version, the previous one, the canaries, the bake time, the phase and, when it stopped, why |
//! | `edge.{id}` | each edge's report: the version it runs, a version it could not apply and why, its gate verdict, its recent answers |
//!
//! Edges read `rollout` every [`POLL`] and apply the version the phase
//! gives them ([`Rollout::target_for`]): canaries the new one while the
//! phase is `canary`, everyone it once `all`, everyone the previous one
//! (or their local file, before any push) once `rolled_back` or `stopped`.
//! Every version is checked by the edge that applies it, as `stoke check`
//! would check it there; one that fails is not applied, and stops the
//! rollout. The canaries judge themselves ([`Gate`]) and move the phase
//! with revision-checked updates, so two canaries never race and the push
//! command need not stay for the rollout to finish. An edge whose cluster
//! is unreachable keeps the version it runs, which it validated; a canary
//! whose gate fails rolls itself back at once, NATS or not.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Cluster;
use crate::metrics as m;
use crate::reload::{Origin, Reloader};
use crate::state::{Live, Router};
use crate::tally::{self, Figures};

/// How often an edge reads the rollout record.
pub const POLL: Duration = Duration::from_secs(1);
/// How often an edge writes its report (and whenever it changes).
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// An edge whose report is older than this is not counted as present.
pub const REPORT_FRESH: Duration = Duration::from_secs(20);
/// The window of an edge's "recent" answers in its report.
pub const RECENT: Duration = Duration::from_secs(60);
/// Answers a window needs before its error shares are judged.
pub const MIN_ANSWERS: u64 = 20;
/// How far (in share of answers) the 5xx or a refusal reason may rise over
/// the baseline before the gate fails.
pub const MAX_RISE: f64 = 0.05;
/// Longest a KV call of the rollout may take (they are off the request
/// path, but a hub across the world may be slow).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// History of the tally kept for "before" windows.
const HISTORY: Duration = Duration::from_secs(600);
/// Versions kept in the bucket (with the one the network would roll back
/// to); older ones are removed by the push that stores a new one.
pub const KEEP_VERSIONS: u64 = 20;
/// A gate that fails on this many checks in a row (one a [`POLL`]) fails
/// the version before its bake is over: a file that breaks everything is
/// not served for the whole bake.
pub const EARLY_FAILURES: u32 = 5;
/// How long a starting edge waits for the cluster, to serve the version
/// the network settled on from its first request rather than its file.
pub const CATCH_UP: Duration = Duration::from_secs(2);

/// A rollout's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The canaries run the new version; the others the previous one.
    Canary,
    /// Every edge runs the new version.
    All,
    /// A canary's gate failed: every edge runs the previous version.
    RolledBack,
    /// The version failed its check on an edge, or a canary never applied
    /// it: every edge runs the previous version.
    Stopped,
}

impl Phase {
    /// The phase's name as `/state` and the push command print it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Canary => "canary",
            Phase::All => "all",
            Phase::RolledBack => "rolled_back",
            Phase::Stopped => "stopped",
        }
    }
}

/// One pushed version of the network's file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Version {
    /// Its number (1, 2, …).
    pub version: u64,
    /// The text's hash (as `/state` shows a config's hash).
    pub hash: String,
    /// What the pusher said of it.
    pub note: String,
    /// Who pushed it (`user@host`).
    pub author: String,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
    /// The file.
    pub text: String,
}

/// The rollout in force.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version being rolled out.
    pub version: u64,
    /// The version the network ran before (`None`: each edge's local file).
    pub previous: Option<u64>,
    /// The canary edges (location ids); empty: every edge at once.
    pub canary: Vec<String>,
    /// How long the canaries run it before their gates are judged.
    pub bake_ms: u64,
    /// Where it is.
    pub phase: Phase,
    /// Why it rolled back or stopped.
    pub reason: Option<String>,
    /// The pushed version's hash.
    pub hash: String,
    /// The push's note.
    pub note: String,
    /// When it was pushed, and last changed, in Unix milliseconds.
    pub started_ms: u64,
    /// When the phase last changed.
    pub updated_ms: u64,
}

impl Rollout {
    /// The version the edge `edge` is to run (`None`: its local file).
    pub fn target_for(&self, edge: &str) -> Option<u64> {
        match self.phase {
            Phase::Canary if self.canary.iter().any(|c| c == edge) => Some(self.version),
            Phase::Canary | Phase::RolledBack | Phase::Stopped => self.previous,
            Phase::All => Some(self.version),
        }
    }

    /// The version the network has settled on: what an edge that is not a
    /// canary runs, and what the next push rolls back to.
    pub fn settled(&self) -> Option<u64> {
        match self.phase {
            Phase::All => Some(self.version),
            _ => self.previous,
        }
    }

    /// Whether the rollout is still under way (its canaries baking).
    pub fn in_progress(&self) -> bool {
        self.phase == Phase::Canary
    }
}

/// A canary's judgement of a version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// The version judged.
    pub version: u64,
    /// Whether its health held.
    pub pass: bool,
    /// Why it failed (each gate that did), or what was compared.
    pub reasons: Vec<String>,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// An edge's report, `edge.{id}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The edge's location id.
    pub edge: String,
    /// The cluster version it runs (`None`: its local file).
    pub version: Option<u64>,
    /// The hash of the file it runs.
    pub hash: String,
    /// A version it could not apply, with every problem.
    pub failed: Option<(u64, Vec<String>)>,
    /// The version it bakes as a canary, and until when (Unix ms).
    pub baking: Option<(u64, u64)>,
    /// Its last gate verdict.
    pub verdict: Option<Verdict>,
    /// Its answers over the last [`RECENT`].
    pub recent: Figures,
    /// When it wrote this, in Unix milliseconds.
    pub at_ms: u64,
}

/// Open the config bucket of the cluster `name`, creating it if it is not
/// there (as the claim bucket is made: the stream directly). One value per
/// key, kept for ever.
pub async fn open_bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, String> {
    // No max age: versions and reports are kept until replaced.
    super::open_kv(js, &format!("{name}-config"), "stoke: config versions and their rollout", Duration::ZERO).await
}

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// The bucket's keys that start with `prefix`, the whole listing bounded
/// by [`CALL_TIMEOUT`]; `what` names the call in errors.
async fn list_keys(store: &kv::Store, prefix: &str, what: &str) -> Result<Vec<String>, String> {
    let mut keys = bounded(what, store.keys()).await?;
    let listed = tokio::time::timeout(CALL_TIMEOUT, async {
        let mut out = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| format!("{what}: {e}"))?;
            if k.starts_with(prefix) {
                out.push(k);
            }
        }
        Ok::<_, String>(out)
    })
    .await;
    listed.map_err(|_| format!("{what}: no answer in time"))?
}

/// The rollout record and its revision, if there is one.
pub async fn read_rollout(store: &kv::Store) -> Result<Option<(Rollout, u64)>, String> {
    let entry = bounded("reading the rollout", store.entry("rollout")).await?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => serde_json::from_slice(&e.value)
            .map(|r| Some((r, e.revision)))
            .map_err(|err| format!("the rollout record is not readable: {err}")),
        _ => Ok(None),
    }
}

/// Replace the rollout record at `revision` with `next` (revision-checked:
/// `Ok(false)` if someone changed it meanwhile).
async fn write_rollout(store: &kv::Store, next: &Rollout, revision: u64) -> Result<bool, String> {
    let body = serde_json::to_vec(next).map_err(|e| e.to_string())?;
    match tokio::time::timeout(CALL_TIMEOUT, store.update("rollout", body.into(), revision)).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
        Ok(Err(e)) => Err(format!("updating the rollout: {e}")),
        Err(_) => Err(format!("updating the rollout: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Move the rollout of `version` from `from` to `to` with `reason`, unless
/// it moved already. `Ok(true)` if this call moved it.
pub async fn advance(
    store: &kv::Store,
    version: u64,
    from: &[Phase],
    to: Phase,
    reason: Option<String>,
) -> Result<bool, String> {
    for _ in 0..5 {
        let Some((mut r, revision)) = read_rollout(store).await? else { return Ok(false) };
        if r.version != version || !from.contains(&r.phase) {
            return Ok(false);
        }
        r.phase = to;
        r.reason = reason.clone();
        r.updated_ms = unix_ms();
        if write_rollout(store, &r, revision).await? {
            return Ok(true);
        }
    }
    Err("the rollout record kept changing under this update".into())
}

/// Version `n`'s record.
pub async fn read_version(store: &kv::Store, n: u64) -> Result<Version, String> {
    let value = bounded("reading a version", store.get(format!("version.{n}"))).await?;
    let value = value.ok_or_else(|| format!("version {n} is not in the cluster's config bucket"))?;
    serde_json::from_slice(&value).map_err(|e| format!("version {n} is not readable: {e}"))
}

/// Every edge's report, by edge id.
pub async fn read_reports(store: &kv::Store) -> Result<BTreeMap<String, Report>, String> {
    let names = list_keys(store, "edge.", "listing the edges' reports").await?;
    let mut out = BTreeMap::new();
    for k in names {
        if let Some(v) = bounded("reading a report", store.get(k.clone())).await? {
            if let Ok(r) = serde_json::from_slice::<Report>(&v) {
                out.insert(r.edge.clone(), r);
            }
        }
    }
    Ok(out)
}

/// Whether `report` was written within [`REPORT_FRESH`] of `now_ms`.
pub fn is_fresh(report: &Report, now_ms: u64) -> bool {
    now_ms.saturating_sub(report.at_ms) <= REPORT_FRESH.as_millis() as u64
}

/// A push: the file and how to roll it out.
#[derive(Clone, Debug)]
pub struct Push {
    /// The network's file, as written.
    pub text: String,
    /// Its hash, from compiling it.
    pub hash: String,
    /// The canary edges.
    pub canary: Vec<String>,
    /// The bake time.
    pub bake: Duration,
    /// A note for the record.
    pub note: String,
    /// Who pushes.
    pub author: String,
}

/// Publish `push` as the next version and start its rollout. Refused while
/// another rollout's canaries bake.
pub async fn publish(store: &kv::Store, push: Push) -> Result<Rollout, String> {
    let current = read_rollout(store).await?;
    if let Some((r, _)) = current.as_ref().filter(|(r, _)| r.in_progress()) {
        return Err(format!(
            "version {} is still baking on {}; wait until it is rolled out or back (stoke push --status)",
            r.version,
            r.canary.join(", ")
        ));
    }
    // The next free version number: creating its key is the claim on it.
    let mut n = current.as_ref().map_or(1, |(r, _)| r.version + 1);
    let now = unix_ms();
    let version = loop {
        let v = Version {
            version: n,
            hash: push.hash.clone(),
            note: push.note.clone(),
            author: push.author.clone(),
            at_ms: now,
            text: push.text.clone(),
        };
        let body = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
        match tokio::time::timeout(CALL_TIMEOUT, store.create(format!("version.{n}"), body.into())).await {
            Ok(Ok(_)) => break v,
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists && n < u64::MAX => n += 1,
            Ok(Err(e)) => return Err(format!("storing version {n}: {e}")),
            Err(_) => return Err(format!("storing version {n}: no answer within {CALL_TIMEOUT:?}")),
        }
    };
    let rollout = Rollout {
        version: version.version,
        previous: current.as_ref().and_then(|(r, _)| r.settled()),
        canary: push.canary.clone(),
        bake_ms: push.bake.as_millis() as u64,
        phase: if push.canary.is_empty() { Phase::All } else { Phase::Canary },
        reason: None,
        hash: push.hash,
        note: push.note,
        started_ms: now,
        updated_ms: now,
    };
    let body = serde_json::to_vec(&rollout).map_err(|e| e.to_string())?;
    let written = match &current {
        Some((_, revision)) => write_rollout(store, &rollout, *revision).await?,
        None => match tokio::time::timeout(CALL_TIMEOUT, store.create("rollout", body.into())).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
            Ok(Err(e)) => return Err(format!("starting the rollout: {e}")),
            Err(_) => return Err(format!("starting the rollout: no answer within {CALL_TIMEOUT:?}")),
        },
    };
    if !written {
        return Err(format!(
            "another push changed the rollout while version {} was stored; push again",
            rollout.version
        ));
    }
    // Old versions go; a failure here costs only space.
    if let Err(e) = prune(store, rollout.version, rollout.previous).await {
        tracing::warn!(error = %e, "rollout: old versions were not removed");
    }
    Ok(rollout)
}

/// The rollout's status as `GET /rollout`, `/state` and `stoke push
/// --status` show it: the rollout and every edge's report.
pub async fn status(store: &kv::Store) -> Result<serde_json::Value, String> {
    let rollout = read_rollout(store).await?.map(|(r, _)| r);
    let reports = read_reports(store).await?;
    Ok(serde_json::json!({ "rollout": rollout, "edges": edges_view(&reports, unix_ms()) }))
}

/// Every edge's report as `/state` and `GET /rollout` show it.
fn edges_view(reports: &BTreeMap<String, Report>, now: u64) -> Vec<serde_json::Value> {
    reports
        .values()
        .map(|r| {
            serde_json::json!({
                "edge": r.edge,
                "version": r.version,
                "hash": r.hash,
                "present": is_fresh(r, now),
                "age_ms": now.saturating_sub(r.at_ms),
                "failed": r.failed.as_ref().map(|(v, e)| serde_json::json!({"version": v, "errors": e})),
                "baking": r.baking.map(|(v, until)| serde_json::json!({"version": v, "left_ms": until.saturating_sub(now)})),
                "verdict": r.verdict,
                "recent": r.recent,
            })
        })
        .collect()
}

/// Remove the versions older than the newest [`KEEP_VERSIONS`] from the
/// bucket, except `keep` (the version the network would roll back to).
/// Returns how many went.
pub async fn prune(store: &kv::Store, newest: u64, keep: Option<u64>) -> Result<usize, String> {
    let old: Vec<String> = list_keys(store, "version.", "listing the versions")
        .await?
        .into_iter()
        .filter(|k| {
            let n = k.strip_prefix("version.").and_then(|n| n.parse::<u64>().ok());
            n.is_some_and(|n| n + KEEP_VERSIONS <= newest && Some(n) != keep)
        })
        .collect();
    for k in &old {
        bounded("removing an old version", store.purge(k)).await?;
    }
    Ok(old.len())
}

/// A canary's bake: what its health was before the change, and when it
/// is judged.
#[derive(Clone, Debug)]
struct Bake {
    version: u64,
    /// When the version went live here.
    applied: Instant,
    until: Instant,
    until_ms: u64,
    /// The tally when it went live.
    at_apply: Figures,
    /// The answers over the bake time before it went live.
    before: Figures,
    /// Services with no reachable pool before, and pools whose wake had
    /// failed.
    unreachable: BTreeSet<String>,
    wake_failed: usize,
    /// Checks in a row, during the bake, on which the gate failed.
    failing: u32,
}

/// The health gate of a canary: what it compares.
#[derive(Debug)]
pub struct Gate<'a> {
    /// Answers over the bake time before the change.
    pub before: &'a Figures,
    /// Answers during the bake.
    pub after: &'a Figures,
    /// The other edges' answers over their last minute, pooled.
    pub others: &'a Figures,
    /// Services with no reachable pool before the change, and now.
    pub unreachable_before: &'a BTreeSet<String>,
    /// See `unreachable_before`.
    pub unreachable_now: &'a BTreeSet<String>,
    /// Pools whose last wake failed, before the change and now.
    pub wake_failed_before: usize,
    /// See `wake_failed_before`.
    pub wake_failed_now: usize,
}

impl Gate<'_> {
    /// Every gate that fails, in words (empty: the version's health held).
    ///
    /// - a service that had a reachable pool before has none now;
    /// - more pools are `wake_failed` than before;
    /// - with at least [`MIN_ANSWERS`] answers in the bake, the share of
    ///   5xx rose by more than [`MAX_RISE`] over both the canary's own
    ///   share before the change and the other edges' share (each counted
    ///   only with [`MIN_ANSWERS`] answers of its own), or the share of a
    ///   refusal reason rose by more than that over its share before.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.unreachable_now.difference(self.unreachable_before) {
            out.push(format!("service \"{s}\" has no reachable pool (it had one before)"));
        }
        if self.wake_failed_now > self.wake_failed_before {
            out.push(format!(
                "{} pools failed to wake, {} before the change",
                self.wake_failed_now, self.wake_failed_before
            ));
        }
        if self.after.answered >= MIN_ANSWERS {
            let own = judged_share(self.before, Figures::error_share);
            let others = judged_share(self.others, Figures::error_share);
            let baseline = own.max(others);
            let now = self.after.error_share();
            if now > baseline + MAX_RISE {
                out.push(format!(
                    "5xx were {:.1} % of {} answers during the bake, against {:.1} % before the change and {:.1} % on the other edges",
                    now * 100.0,
                    self.after.answered,
                    own * 100.0,
                    others * 100.0
                ));
            }
            for code in self.after.refusals.keys() {
                let before = judged_share(self.before, |f| f.refusal_share(code));
                let now = self.after.refusal_share(code);
                if now > before + MAX_RISE {
                    out.push(format!(
                        "refusals \"{code}\" were {:.1} % of answers during the bake, {:.1} % before",
                        now * 100.0,
                        before * 100.0
                    ));
                }
            }
        }
        out
    }
}

/// `share` of `f`, or 0 when `f` has too few answers to judge.
fn judged_share(f: &Figures, share: impl Fn(&Figures) -> f64) -> f64 {
    if f.answered >= MIN_ANSWERS {
        share(f)
    } else {
        0.0
    }
}

/// Services of `live` with no pool that can take a request now or after a
/// wake: every pool serving them is down (no ready replica and no wake) or
/// failed its last wake.
pub fn unreachable_services(live: &Live) -> BTreeSet<String> {
    let net = &live.snapshot.network;
    net.services
        .iter()
        .filter(|s| {
            s.pools.iter().all(|&p| {
                let view = live.pool(p);
                matches!(view.state.condition(view.is_warm(), view.scales), "down" | "wake_failed")
            })
        })
        .map(|s| s.name.clone())
        .collect()
}

/// Pools of `live` whose last wake failed.
pub fn wake_failed_pools(live: &Live) -> usize {
    live.pools.iter().filter(|v| v.state.wake_error().is_some()).count()
}

/// This edge's side of rollouts, in `/state`.
#[derive(Debug, Default)]
pub struct Follower {
    inner: Mutex<FollowerState>,
}

#[derive(Debug, Default)]
struct FollowerState {
    /// The rollout as last read.
    rollout: Option<Rollout>,
    /// Versions this edge cannot apply, with why.
    failed: BTreeMap<u64, Vec<String>>,
    /// Versions this edge rolled back from itself (its gate failed), which
    /// it does not apply again even if the record still says so.
    rejected: BTreeSet<u64>,
    bake: Option<Bake>,
    verdict: Option<Verdict>,
    /// A phase change this edge must still write (NATS was unreachable).
    pending: Option<(u64, Phase, String)>,
    last_error: Option<String>,
    /// Every edge's report as last read.
    reports: BTreeMap<String, Report>,
}

impl Follower {
    /// `/state.rollout`: the rollout as this edge last read it, its bake
    /// and verdict, and every edge's report as it last read them.
    pub fn state_json(&self) -> serde_json::Value {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        serde_json::json!({
            "rollout": s.rollout,
            "baking": s.bake.as_ref().map(|b| serde_json::json!({
                "version": b.version,
                "left_ms": b.until.saturating_duration_since(now).as_millis() as u64,
            })),
            "verdict": s.verdict,
            "failed": s.failed.iter().map(|(v, e)| serde_json::json!({"version": v, "errors": e})).collect::<Vec<_>>(),
            "last_error": s.last_error,
            "edges": edges_view(&s.reports, unix_ms()),
        })
    }
}

/// Follow the cluster's rollouts until `shutdown`: apply the version the
/// rollout gives this edge, bake it when this edge is a canary, and report.
/// `caught_up` is told once the first round is over: the version the
/// network settled on is in force, or the cluster did not answer within
/// [`CATCH_UP`] and the edge starts on its file.
pub async fn follow(
    router: Arc<Router>,
    cluster: Arc<Cluster>,
    reloader: Arc<Reloader>,
    shutdown: watch::Receiver<bool>,
    caught_up: tokio::sync::oneshot::Sender<()>,
) {
    let follower = cluster.follower.clone();
    let mut edge = Edge {
        router,
        cluster,
        reloader,
        follower,
        store: None,
        history: VecDeque::new(),
        last_report: None,
        reported_at: None,
        reports_read: None,
    };
    let connecting_until = Instant::now() + CATCH_UP;
    while !edge.cluster.is_connected() && Instant::now() < connecting_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edge.step().await;
    let _ = caught_up.send(());
    let mut shutdown = shutdown;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + POLL, POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        edge.step().await;
    }
}

struct Edge {
    router: Arc<Router>,
    cluster: Arc<Cluster>,
    reloader: Arc<Reloader>,
    follower: Arc<Follower>,
    store: Option<kv::Store>,
    /// The tally once a tick, for "before" windows.
    history: VecDeque<(Instant, Figures)>,
    last_report: Option<Report>,
    reported_at: Option<Instant>,
    /// When every edge's report was last read.
    reports_read: Option<Instant>,
}

impl Edge {
    fn me(&self) -> &str {
        &self.cluster.edge
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FollowerState> {
        self.follower.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tally over the `span` before now (as far back as it was kept).
    fn window(&self, span: Duration, now: &Figures) -> Figures {
        let since = Instant::now().checked_sub(span);
        let earlier = self
            .history
            .iter()
            .find(|(at, _)| since.is_none_or(|s| *at >= s))
            .map(|(_, f)| f.clone())
            .unwrap_or_default();
        now.since(&earlier)
    }

    async fn step(&mut self) {
        let now = Instant::now();
        let figures = tally::now();
        self.history.push_back((now, figures.clone()));
        while self.history.front().is_some_and(|(at, _)| now.duration_since(*at) > HISTORY) {
            self.history.pop_front();
        }
        self.judge_bake(&figures).await;
        if !self.cluster.is_connected() {
            return;
        }
        if self.store.is_none() {
            match open_bucket(&self.cluster.js, &self.cluster.settings.name).await {
                Ok(s) => self.store = Some(s),
                Err(e) => {
                    self.note_error(e);
                    return;
                }
            }
        }
        let Some(store) = self.store.clone() else { return };
        self.flush_pending(&store).await;
        let mut baking = false;
        match read_rollout(&store).await {
            Ok(Some((r, _))) => {
                self.state().rollout = Some(r.clone());
                self.follow_rollout(&store, &r, &figures).await;
                baking = r.in_progress();
                if baking {
                    self.promote_if_all_passed(&store, &r).await;
                }
            }
            Ok(None) => {}
            Err(e) => self.note_error(e),
        }
        self.report(&store, &figures).await;
        // The others' reports: each round while canaries bake (their gates
        // compare with them), else as often as they are written.
        if baking || self.reports_read.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            match read_reports(&store).await {
                Ok(reports) => {
                    self.state().reports = reports;
                    self.reports_read = Some(Instant::now());
                }
                Err(e) => self.note_error(e),
            }
        }
    }

    fn note_error(&self, e: String) {
        tracing::warn!(error = %e, "rollout: cluster call failed; this edge keeps the config it runs");
        self.state().last_error = Some(e);
    }

    /// The version this edge runs (`None`: its local file).
    fn running(&self) -> Option<u64> {
        match self.reloader.origin() {
            Origin::Cluster { version, .. } => Some(version),
            Origin::File => None,
        }
    }

    async fn follow_rollout(&mut self, store: &kv::Store, r: &Rollout, figures: &Figures) {
        let target = r.target_for(self.me());
        {
            let mut s = self.state();
            // A bake of a version this edge no longer runs is over.
            if s.bake.as_ref().is_some_and(|b| Some(b.version) != target) {
                s.bake = None;
            }
        }
        if target == self.running() {
            return;
        }
        if let Some(v) = target {
            let (failed, rejected) = {
                let s = self.state();
                (s.failed.contains_key(&v), s.rejected.contains(&v))
            };
            if failed || rejected {
                return;
            }
        }
        let canary_bake = r.phase == Phase::Canary && target == Some(r.version);
        let before = canary_bake.then(|| {
            let live = self.router.live();
            (
                unreachable_services(&live),
                wake_failed_pools(&live),
                self.window(Duration::from_millis(r.bake_ms), figures),
            )
        });
        let outcome = match target {
            Some(v) => match read_version(store, v).await {
                Ok(version) => self.reloader.apply_cluster(version.text, v, version.hash).await,
                Err(e) => return self.note_error(e),
            },
            None => self.reloader.return_to_file("cluster").await,
        };
        if outcome.result != "ok" {
            let Some(v) = target else {
                return self.note_error(format!("cannot go back to the local file: {}", outcome.errors.join("; ")));
            };
            tracing::error!(version = v, errors = ?outcome.errors, "rollout: this edge cannot apply the version; it keeps the config it runs");
            let first = outcome.errors.first().cloned().unwrap_or_default();
            self.state().failed.insert(v, outcome.errors);
            if v == r.version && matches!(r.phase, Phase::Canary | Phase::All) {
                let why = format!("edge {} cannot apply version {v}: {first}", self.me());
                self.move_phase(store, v, &[Phase::Canary, Phase::All], Phase::Stopped, why).await;
            }
            return;
        }
        tracing::info!(version = ?target, phase = r.phase.as_str(), "rollout: applied the cluster's config");
        metrics::gauge!(m::CONFIG_CLUSTER_VERSION).set(target.unwrap_or(0) as f64);
        if let Some((unreachable, wake_failed, before)) = before {
            let bake = Duration::from_millis(r.bake_ms);
            tracing::info!(version = r.version, bake_ms = r.bake_ms, "rollout: this edge is a canary; baking");
            self.state().bake = Some(Bake {
                version: r.version,
                applied: Instant::now(),
                until: Instant::now() + bake,
                until_ms: unix_ms() + r.bake_ms,
                at_apply: tally::now(),
                before,
                unreachable,
                wake_failed,
                failing: 0,
            });
        }
    }

    /// Check the health gate of a bake every round: at its end, or once it
    /// failed [`EARLY_FAILURES`] rounds in a row, give the verdict, and
    /// roll back at once if it failed (with or without the cluster).
    async fn judge_bake(&mut self, figures: &Figures) {
        let Some(bake) = self.state().bake.clone() else { return };
        let live = self.router.live();
        let unreachable_now = unreachable_services(&live);
        let wake_failed_now = wake_failed_pools(&live);
        drop(live);
        let after = figures.since(&bake.at_apply);
        let others = self.others_recent();
        let gate = Gate {
            before: &bake.before,
            after: &after,
            others: &others,
            unreachable_before: &bake.unreachable,
            unreachable_now: &unreachable_now,
            wake_failed_before: bake.wake_failed,
            wake_failed_now,
        };
        let failures = gate.failures();
        let pass = failures.is_empty();
        if Instant::now() < bake.until {
            let failing = {
                let mut s = self.state();
                let Some(b) = s.bake.as_mut() else { return };
                b.failing = if pass { 0 } else { b.failing + 1 };
                b.failing
            };
            if failing < EARLY_FAILURES {
                return;
            }
            tracing::warn!(
                version = bake.version,
                checks = failing,
                "rollout: the gate failed on every check of the last seconds; ending the bake early"
            );
        }
        let verdict = Verdict {
            version: bake.version,
            pass,
            reasons: if pass {
                vec![format!(
                    "{} answers in {} ms, {:.1} % 5xx",
                    after.answered,
                    bake.applied.elapsed().as_millis(),
                    after.error_share() * 100.0
                )]
            } else {
                failures.clone()
            },
            at_ms: unix_ms(),
        };
        metrics::counter!(m::ROLLOUT_VERDICTS_TOTAL, "result" => if pass { "pass" } else { "fail" }).increment(1);
        let previous = {
            let mut s = self.state();
            s.bake = None;
            s.verdict = Some(verdict.clone());
            if !pass {
                s.rejected.insert(bake.version);
            }
            s.rollout.as_ref().filter(|r| r.version == bake.version).map(|r| r.previous)
        };
        if pass {
            tracing::info!(version = bake.version, "rollout: the canary's health held");
            return;
        }
        let why = format!("canary {}: {}", self.me(), failures.join("; "));
        tracing::error!(version = bake.version, "rollout: the gate failed; rolling back: {why}");
        // Back to what the network ran before, at once.
        let back = match previous.flatten() {
            Some(p) => match &self.store {
                Some(store) => match read_version(store, p).await {
                    Ok(v) => Some(self.reloader.apply_cluster(v.text, p, v.hash).await),
                    Err(e) => {
                        self.note_error(e);
                        None
                    }
                },
                None => None,
            },
            None => Some(self.reloader.return_to_file("cluster").await),
        };
        if let Some(o) = back.filter(|o| o.result == "ok") {
            metrics::gauge!(m::CONFIG_CLUSTER_VERSION).set(o.cluster_version.unwrap_or(0) as f64);
        }
        self.state().pending = Some((bake.version, Phase::RolledBack, why));
        if let Some(store) = self.store.clone() {
            self.flush_pending(&store).await;
        }
    }

    /// The other present edges' recent answers, pooled (from their reports
    /// as last read).
    fn others_recent(&self) -> Figures {
        let now = unix_ms();
        let s = self.state();
        let canaries = s.rollout.as_ref().map(|r| r.canary.as_slice()).unwrap_or_default();
        let mut sum = Figures::default();
        for r in s.reports.values().filter(|r| r.edge != self.me() && is_fresh(r, now) && !canaries.contains(&r.edge)) {
            sum.answered += r.recent.answered;
            sum.server_errors += r.recent.server_errors;
        }
        sum
    }

    async fn flush_pending(&mut self, store: &kv::Store) {
        let pending = self.state().pending.clone();
        let Some((version, to, why)) = pending else { return };
        if self.cluster.is_connected() {
            self.move_phase(store, version, &[Phase::Canary, Phase::All], to, why).await;
        }
    }

    async fn move_phase(&mut self, store: &kv::Store, version: u64, from: &[Phase], to: Phase, why: String) {
        match advance(store, version, from, to, Some(why.clone())).await {
            Ok(moved) => {
                if moved {
                    tracing::warn!(version, phase = to.as_str(), "rollout: {why}");
                }
                self.state().pending = None;
            }
            Err(e) => {
                self.state().pending = Some((version, to, why));
                self.note_error(e);
            }
        }
    }

    /// As a canary whose gate passed: once every canary's has, the rollout
    /// goes to every edge.
    async fn promote_if_all_passed(&mut self, store: &kv::Store, r: &Rollout) {
        let mine = self.state().verdict.clone();
        if !r.canary.iter().any(|c| c == self.me()) || !mine.is_some_and(|v| v.version == r.version && v.pass) {
            return;
        }
        let reports = match read_reports(store).await {
            Ok(r) => r,
            Err(e) => return self.note_error(e),
        };
        let passed = |c: &String| {
            c == self.me()
                || reports.get(c).and_then(|rep| rep.verdict.as_ref()).is_some_and(|v| v.version == r.version && v.pass)
        };
        if r.canary.iter().all(passed) {
            match advance(store, r.version, &[Phase::Canary], Phase::All, None).await {
                Ok(true) => tracing::info!(
                    version = r.version,
                    "rollout: every canary's health held; rolling out to every edge"
                ),
                Ok(false) => {}
                Err(e) => self.note_error(e),
            }
        }
    }

    async fn report(&mut self, store: &kv::Store, figures: &Figures) {
        let (failed, baking, verdict) = {
            let s = self.state();
            (
                s.failed.iter().next_back().map(|(v, e)| (*v, e.clone())),
                s.bake.as_ref().map(|b| (b.version, b.until_ms)),
                s.verdict.clone(),
            )
        };
        let mut report = Report {
            edge: self.me().to_owned(),
            version: self.running(),
            hash: self.router.live().snapshot.network.source.hash.clone(),
            failed,
            baking,
            verdict,
            recent: Figures::default(),
            at_ms: 0,
        };
        let changed = self.last_report.as_ref() != Some(&report);
        if !changed && self.reported_at.is_some_and(|t| t.elapsed() < REPORT_EVERY) {
            return;
        }
        let comparable = report.clone();
        report.recent = self.window(RECENT, figures);
        report.at_ms = unix_ms();
        let body = match serde_json::to_vec(&report) {
            Ok(b) => b,
            Err(_) => return,
        };
        let key = format!("edge.{}", self.me().trim_matches('.'));
        match bounded("writing this edge's report", store.put(key, body.into())).await {
            Ok(_) => {
                self.last_report = Some(comparable);
                self.reported_at = Some(Instant::now());
            }
            Err(e) => self.note_error(e),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(phase: Phase) -> Rollout {
        Rollout {
            version: 3,
            previous: Some(2),
            canary: vec!["fra".into()],
            bake_ms: 1000,
            phase,
            reason: None,
            hash: String::new(),
            note: String::new(),
            started_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn each_phase_gives_each_edge_its_version() {
        assert_eq!(rollout(Phase::Canary).target_for("fra"), Some(3));
        assert_eq!(rollout(Phase::Canary).target_for("par"), Some(2));
        assert_eq!(rollout(Phase::All).target_for("par"), Some(3));
        assert_eq!(rollout(Phase::RolledBack).target_for("fra"), Some(2));
        assert_eq!(rollout(Phase::Stopped).target_for("par"), Some(2));
        let first = Rollout { previous: None, ..rollout(Phase::RolledBack) };
        assert_eq!(first.target_for("fra"), None, "before any push, back to the local file");
        assert_eq!(rollout(Phase::Canary).settled(), Some(2));
        assert_eq!(rollout(Phase::All).settled(), Some(3));
    }

    fn figures(answered: u64, errors: u64, refusals: &[(&str, u64)]) -> Figures {
        Figures {
            answered,
            server_errors: errors,
            refusals: refusals.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    #[test]
    fn the_gate_fails_on_each_of_its_signals_and_only_then() {
        let none = BTreeSet::new();
        let m: BTreeSet<String> = ["m".to_owned()].into();
        let quiet = Figures::default();
        let gate = |before: &Figures, after: &Figures, others: &Figures, now: &BTreeSet<String>, wf: usize| {
            Gate {
                before,
                after,
                others,
                unreachable_before: &none,
                unreachable_now: now,
                wake_failed_before: 0,
                wake_failed_now: wf,
            }
            .failures()
        };
        assert!(gate(&quiet, &quiet, &quiet, &none, 0).is_empty(), "no traffic, all reachable: pass");
        let f = gate(&quiet, &quiet, &quiet, &m, 0);
        assert!(f[0].contains("\"m\" has no reachable pool"), "{f:?}");
        assert!(gate(&quiet, &quiet, &quiet, &none, 1)[0].contains("failed to wake"));
        // 5xx: judged with enough answers, against own and others' shares.
        let bad = figures(100, 30, &[("upstream_unreachable", 30)]);
        let f = gate(&figures(100, 1, &[]), &bad, &figures(100, 1, &[]), &none, 0);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("5xx were 30.0 %"), "{f:?}");
        assert!(f[1].contains("\"upstream_unreachable\""), "{f:?}");
        assert!(gate(&quiet, &figures(10, 10, &[]), &quiet, &none, 0).is_empty(), "too few answers to judge");
        assert!(
            gate(&quiet, &figures(100, 30, &[]), &figures(100, 28, &[]), &none, 0).is_empty(),
            "the other edges see the same errors: not the config's doing"
        );
    }
}
