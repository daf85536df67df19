//! One wake per pool across all edges. Before an edge calls a pool's wake
//! hook it claims the wake in the `{name}-wakes` KV bucket: the key is the
//! pool, the value says which edge holds the claim and until when (wall
//! clock). Creating the key wins; an existing claim that is this edge's
//! own, or whose time is up, is taken over by an update that names the
//! revision read, so two edges taking over at once cannot both win. The
//! claimant renews its claim each time it resends the hook; the others hold
//! their requests, probe the pool fast, and try again when the claim runs
//! out, so a claimant that dies is replaced within one lease.
//!
//! When a replica is ready the claimant marks the claim `ready` for a
//! short while (an edge that saw the pool cold a moment ago does not wake
//! it again) and publishes `{name}.ready.{pool}`, on which the others probe
//! at once. The home edge deletes the claim when it puts the pool to sleep.
//!
//! NATS 2.9 has no per-key TTL, which is why the deadline is in the value.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Cluster;
use crate::metrics as m;
use crate::state::Router;

/// How long a claim stays marked ready after the pool woke: long enough
/// for an edge that saw the pool cold a moment ago to see it ready (its
/// probes run every 75 ms while it waits), short enough that a pool put to
/// sleep meanwhile is woken again without waiting for the mark.
pub const READY_HOLD: Duration = Duration::from_secs(1);

/// Added to the claimant's resend interval for its lease, so that it
/// renews before the others may take over.
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// Keys of the claim bucket live at most this long (claims are rewritten
/// on every wake, so this only clears pools that left the config).
const BUCKET_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What a claim attempt came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This edge holds the claim: it calls the hook.
    Won,
    /// Another edge holds it: hold, probe, and try again after `retry_in`.
    Lost {
        /// The edge that holds it.
        holder: String,
        /// Until its claim runs out.
        retry_in: Duration,
    },
    /// The cluster cannot be asked: call the hook as if alone.
    Alone,
}

/// The value of a claim key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimValue {
    /// The edge that holds the claim.
    pub edge: String,
    /// Until when, in milliseconds since the Unix epoch.
    pub until_ms: u64,
    /// `waking` or `ready`.
    pub state: String,
}

/// What to do about the claim found (`None`: no key) at `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// No claim: create one.
    Create,
    /// Ours, or its time is up: take it over at this revision.
    TakeOver(u64),
    /// Someone else's and live.
    Held {
        /// The edge that holds it.
        holder: String,
        /// Milliseconds left.
        left_ms: u64,
    },
}

/// Decide on the claim found for `me` at `now_ms`. A value that cannot be
/// read is taken over (a claim nobody can honour must not block wakes).
pub fn step(found: Option<(&[u8], u64)>, me: &str, now_ms: u64) -> Step {
    let Some((bytes, revision)) = found else { return Step::Create };
    match serde_json::from_slice::<ClaimValue>(bytes) {
        Ok(v) if v.edge != me && v.until_ms > now_ms => Step::Held { holder: v.edge, left_ms: v.until_ms - now_ms },
        _ => Step::TakeOver(revision),
    }
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A pool id as a KV key (keys allow letters, digits and `-_=./`, and
/// must not start or end with a dot).
fn key(pool: &str) -> String {
    format!("pool.{}", pool.trim_matches('.'))
}

/// Open the claim bucket of the cluster `name`, creating it if it is not
/// there (creating is idempotent: edges starting together all succeed).
///
/// The bucket's stream is made directly, as a KV bucket is laid out,
/// rather than with the client's `create_key_value`: that one reads the
/// account's info first, in a shape NATS 2.9 does not send.
pub async fn open_bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, String> {
    super::open_kv(js, &format!("{name}-wakes"), "stoke: one wake per pool across all edges", BUCKET_MAX_AGE).await
}

/// How long [`prepare`] waits between tries while the bucket cannot be
/// opened.
const PREPARE_RETRY: Duration = Duration::from_secs(1);

/// Open the claim bucket as soon as the cluster is reached, retrying
/// until it opens or `shutdown`. Opening it on the first wake instead
/// costs five round trips, one of which creates a file-backed stream; on a
/// busy server that takes longer than the cluster timeout, and an edge
/// whose claim timed out wakes the pool alone.
pub async fn prepare(cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let wait = if !cluster.is_connected() {
            Duration::from_millis(100)
        } else {
            match cluster.store().await {
                Ok(_) => {
                    tracing::debug!(name = %cluster.settings.name, "the wake-claim bucket is open");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the wake-claim bucket yet; retrying");
                    PREPARE_RETRY
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

impl Cluster {
    /// Whether the claim bucket is open (claims cost two round trips).
    pub fn claims_ready(&self) -> bool {
        self.kv.initialized()
    }

    async fn store(&self) -> Result<&kv::Store, String> {
        self.kv.get_or_try_init(|| open_bucket(&self.js, &self.settings.name)).await
    }

    /// Claim the wake of `pool` for `lease`: [`Claim::Won`] if this edge is
    /// to call the hook. Bounded by the cluster timeout; fails open.
    pub async fn claim_wake(&self, pool: &str, lease: Duration) -> Claim {
        let claim = if self.is_up() {
            match self.bounded("claiming a wake", self.try_claim(pool, lease)).await {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    self.go_alone(&e);
                    Claim::Alone
                }
                None => Claim::Alone,
            }
        } else {
            Claim::Alone
        };
        let (counter, result) = match &claim {
            Claim::Won => (&self.stats.claims_won, "won"),
            Claim::Lost { .. } => (&self.stats.claims_lost, "lost"),
            Claim::Alone => (&self.stats.claims_alone, "alone"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::CLUSTER_CLAIMS_TOTAL, "result" => result).increment(1);
        claim
    }

    async fn try_claim(&self, pool: &str, lease: Duration) -> Result<Claim, String> {
        let store = self.store().await?;
        let key = key(pool);
        // Two rounds: a claim can be deleted or taken between read and write.
        for _ in 0..2 {
            let now_ms = unix_ms();
            let value = self.claim_value(now_ms + lease.as_millis() as u64, "waking")?;
            let entry = store.entry(key.as_str()).await.map_err(|e| format!("reading claim {key}: {e}"))?;
            let found = entry.as_ref().map(|e| (&e.value[..], e.revision));
            match step(found, &self.edge, now_ms) {
                Step::Create => match store.create(key.as_str(), value).await {
                    Ok(_) => return Ok(Claim::Won),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(format!("creating claim {key}: {e}")),
                },
                Step::TakeOver(revision) => match store.update(key.as_str(), value, revision).await {
                    Ok(_) => return Ok(Claim::Won),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(format!("taking over claim {key}: {e}")),
                },
                Step::Held { holder, left_ms } => {
                    return Ok(Claim::Lost { holder, retry_in: Duration::from_millis(left_ms) })
                }
            }
        }
        // Lost two races in a row: another edge is claiming right now.
        Ok(Claim::Lost { holder: String::new(), retry_in: LEASE_MARGIN })
    }

    fn claim_value(&self, until_ms: u64, state: &str) -> Result<bytes::Bytes, String> {
        let v = ClaimValue { edge: self.edge.to_string(), until_ms, state: state.to_owned() };
        serde_json::to_vec(&v).map(Into::into).map_err(|e| format!("encoding a claim: {e}"))
    }

    /// The wake this edge claimed is done: mark the claim ready for a
    /// moment and tell the other edges to probe.
    pub async fn wake_ready(&self, pool: &str) {
        if !self.is_up() {
            return;
        }
        let mark = async {
            let store = self.store().await?;
            let key = key(pool);
            let entry = store.entry(key.as_str()).await.map_err(|e| e.to_string())?;
            // Only a claim that is still ours: another edge may have taken
            // it over after our lease ran out.
            if let Some(e) = entry {
                let ours = serde_json::from_slice::<ClaimValue>(&e.value).is_ok_and(|v| *v.edge == *self.edge);
                if ours {
                    let value = self.claim_value(unix_ms() + READY_HOLD.as_millis() as u64, "ready")?;
                    store.update(key.as_str(), value, e.revision).await.map_err(|e| e.to_string())?;
                }
            }
            self.client
                .publish(self.subject("ready", pool), self.edge.as_bytes().to_vec().into())
                .await
                .map_err(|e| e.to_string())
        };
        if let Some(Err(e)) = self.bounded("announcing a ready pool", mark).await {
            tracing::debug!(pool, error = %e, "could not announce the pool ready");
        }
    }

    /// The pool went to sleep (or its wake was given up): the next wake
    /// starts with a fresh claim.
    pub async fn release(&self, pool: &str) {
        if !self.is_up() {
            return;
        }
        let delete = async {
            let store = self.store().await?;
            store.delete(key(pool)).await.map_err(|e| e.to_string())
        };
        if let Some(Err(e)) = self.bounded("releasing a wake claim", delete).await {
            tracing::debug!(pool, error = %e, "could not release the wake claim");
        }
    }
}

/// Probe a pool at once when another edge says it is ready, until
/// `shutdown`.
pub async fn receive_ready(router: Arc<Router>, cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let prefix = cluster.subject("ready", "");
    let Some(mut sub) = cluster.subscribe(format!("{prefix}>"), &mut shutdown).await else { return };
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Some(msg) = msg else { return };
        if msg.payload[..] == *cluster.edge.as_bytes() {
            continue;
        }
        let Some(pool) = msg.subject.strip_prefix(prefix.as_str()) else { continue };
        let live = router.live();
        let Some(pid) = live.snapshot.network.pool_id(pool) else { continue };
        let view = live.pool(pid).clone();
        if view.is_warm() {
            continue;
        }
        let check = live.snapshot.network.pool(pid).health.clone();
        let pool = pool.to_owned();
        tracing::debug!(pool = %pool, "another edge saw the pool ready: probing");
        tokio::spawn(async move { super::super::wake::probe_pool(&view, &check, &pool).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(edge: &str, until_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&ClaimValue { edge: edge.to_owned(), until_ms, state: "waking".to_owned() }).expect("json")
    }

    #[test]
    fn no_claim_is_created_a_live_one_is_respected_a_dead_one_taken_over() {
        assert_eq!(step(None, "fra", 1000), Step::Create);
        let par = value("par", 5000);
        assert_eq!(step(Some((&par, 7)), "fra", 1000), Step::Held { holder: "par".to_owned(), left_ms: 4000 });
        assert_eq!(step(Some((&par, 7)), "fra", 5000), Step::TakeOver(7), "its time is up");
        assert_eq!(step(Some((&par, 7)), "par", 1000), Step::TakeOver(7), "our own claim is renewed");
        assert_eq!(step(Some((b"garbage", 9)), "fra", 1000), Step::TakeOver(9), "unreadable claims do not block");
    }

    #[test]
    fn keys_are_valid_kv_keys() {
        assert_eq!(key("fra-h100"), "pool.fra-h100");
        assert_eq!(key(".odd."), "pool.odd");
    }
}
