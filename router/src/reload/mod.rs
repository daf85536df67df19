//! Live reload: read, validate and compile the config file off the request
//! path, then swap it in atomically. A file that fails leaves the running
//! snapshot in place, and its problems are reported (log, metric, admin API).

pub mod watch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::metrics as m;
use crate::state::Router;
use crate::tls::{CertResolver, CertStore};

/// Where the config comes from.
#[derive(Clone, Debug)]
pub struct ConfigSource {
    /// The file.
    pub path: PathBuf,
    /// `--location`, if given.
    pub location: Option<String>,
}

/// The outcome of the last reload attempt.
#[derive(Clone, Debug, Serialize)]
pub struct ReloadOutcome {
    /// `"ok"` or `"error"`.
    pub result: &'static str,
    /// What triggered it: `startup`, `file`, `signal` or `admin`.
    pub trigger: &'static str,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// The live version after it.
    pub version: u64,
    /// Every problem, as `FILE:LINE:COL: message`.
    pub errors: Vec<String>,
    /// Changes that need a restart to take effect (listener addresses).
    pub warnings: Vec<String>,
    /// The cluster's config version now live, when the config came from
    /// a rollout (`stoke push`); `None` while it is the local file.
    pub cluster_version: Option<u64>,
}

/// Where the live config came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The local file.
    File,
    /// Version `version` of the cluster's rollout, with the file's hash.
    Cluster {
        /// The cluster's version number.
        version: u64,
        /// The hash of the file's text (its `stoke check` fingerprint).
        hash: String,
    },
}

/// Reloads one edge's config.
#[derive(Debug)]
pub struct Reloader {
    source: ConfigSource,
    router: Arc<Router>,
    certs: Option<Arc<CertResolver>>,
    last: Mutex<ReloadOutcome>,
    origin: Mutex<Origin>,
    serial: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader for `router`, whose first snapshot came from `source`.
    pub fn new(source: ConfigSource, router: Arc<Router>, certs: Option<Arc<CertResolver>>) -> Arc<Self> {
        let version = router.live().version;
        metrics::gauge!(m::CONFIG_SNAPSHOT_VERSION).set(version as f64);
        Arc::new(Reloader {
            source,
            router,
            certs,
            last: Mutex::new(ReloadOutcome {
                result: "ok",
                trigger: "startup",
                at_ms: unix_ms(),
                version,
                errors: Vec::new(),
                warnings: Vec::new(),
                cluster_version: None,
            }),
            origin: Mutex::new(Origin::File),
            serial: tokio::sync::Mutex::new(()),
        })
    }

    /// The config file.
    pub fn path(&self) -> &std::path::Path {
        &self.source.path
    }

    /// The outcome of the last attempt.
    pub fn last(&self) -> ReloadOutcome {
        self.last.lock().map(|l| l.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Where the live config came from.
    pub fn origin(&self) -> Origin {
        self.origin.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reload the local file now. Returns the new outcome; on error the
    /// running snapshot stays. While the config is a cluster rollout's
    /// version, the file is not read (the rollout decides what this edge
    /// runs) and the answer says so.
    pub async fn reload(&self, trigger: &'static str) -> ReloadOutcome {
        if let Origin::Cluster { version, .. } = self.origin() {
            let error = format!(
                "this edge runs version {version} of the cluster's config (stoke push); the local file is not \
                 read while a rollout is in force: push the change with stoke push"
            );
            tracing::warn!(trigger, "reload ignored: {error}");
            return self.rejected(trigger, vec![error]);
        }
        self.load_file(trigger).await
    }

    /// Go back to the local file (a rollout sent this edge back to it).
    pub async fn return_to_file(&self, trigger: &'static str) -> ReloadOutcome {
        self.load_file(trigger).await
    }

    async fn load_file(&self, trigger: &'static str) -> ReloadOutcome {
        let source = self.source.clone();
        self.apply(trigger, Origin::File, move || {
            stoke_config::load_snapshot(&source.path, source.location.as_deref()).map_err(|e| e.lines())
        })
        .await
    }

    /// Check `text` (a whole network's file) as this edge would run it,
    /// relative paths resolved beside the local file, and make it live as
    /// the cluster's `version`; on error the running snapshot stays.
    pub async fn apply_cluster(&self, text: String, version: u64, hash: String) -> ReloadOutcome {
        let (source, want) = (self.source.clone(), hash.clone());
        self.apply("cluster", Origin::Cluster { version, hash }, move || {
            let network = stoke_config::load_str(&text, &source.path).map_err(|e| e.lines())?;
            if network.source.hash != want {
                return Err(vec![format!(
                    "version {version}'s text hashes to {}, not to the {want} it was published with",
                    network.source.hash
                )]);
            }
            network.for_edge(source.location.as_deref()).map_err(|e| e.lines())
        })
        .await
    }

    /// Check `text` as [`Reloader::apply_cluster`] would, without applying it.
    pub async fn check_text(&self, text: String) -> Result<(), Vec<String>> {
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || {
            let snapshot = stoke_config::load_str(&text, &source.path)
                .and_then(|n| n.for_edge(source.location.as_deref()))
                .map_err(|e| e.lines())?;
            CertStore::build(&snapshot.network.tls).map_err(|e| vec![e])?;
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(vec![format!("check task failed: {e}")]))
    }

    async fn apply(
        &self,
        trigger: &'static str,
        origin: Origin,
        load: impl FnOnce() -> Result<stoke_config::Snapshot, Vec<String>> + Send + 'static,
    ) -> ReloadOutcome {
        let _one_at_a_time = self.serial.lock().await;
        // Parsing a large network takes milliseconds: keep it off the
        // runtime's worker threads.
        let loaded = tokio::task::spawn_blocking(move || {
            load().and_then(|snapshot| {
                let certs = CertStore::build(&snapshot.network.tls).map_err(|e| vec![e])?;
                Ok((snapshot, certs))
            })
        })
        .await
        .unwrap_or_else(|e| Err(vec![format!("reload task failed: {e}")]));

        let cluster_version = match &origin {
            Origin::Cluster { version, .. } => Some(*version),
            Origin::File => None,
        };
        let outcome = match loaded {
            Ok((snapshot, certs)) => {
                let old = self.router.live();
                let mut warnings = listener_changes(&old.snapshot.network.edge, &snapshot.network.edge);
                if old.snapshot.network.cluster != snapshot.network.cluster {
                    warnings.push("[cluster] changed; the cluster connection changes only at restart".into());
                }
                drop(old);
                let no_tls_yet = self.certs.is_none() && !certs.is_empty();
                let live = self.router.swap(snapshot);
                if let Some(resolver) = &self.certs {
                    resolver.swap(certs);
                }
                *self.origin.lock().unwrap_or_else(|e| e.into_inner()) = origin;
                if no_tls_yet {
                    warnings.push(
                        "certificates were added, but TLS listeners start only at startup: restart to serve them"
                            .into(),
                    );
                }
                for w in &warnings {
                    tracing::warn!("reload: {w}");
                }
                tracing::info!(
                    version = live.version,
                    trigger,
                    cluster_version,
                    "config reloaded: {}",
                    live.snapshot.summary()
                );
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
                metrics::gauge!(m::CONFIG_SNAPSHOT_VERSION).set(live.version as f64);
                ReloadOutcome {
                    result: "ok",
                    trigger,
                    at_ms: unix_ms(),
                    version: live.version,
                    errors: Vec::new(),
                    warnings,
                    cluster_version,
                }
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(trigger, cluster_version, "reload rejected, the running config stays: {e}");
                }
                return self.rejected(trigger, errors);
            }
        };
        if let Ok(mut last) = self.last.lock() {
            *last = outcome.clone();
        }
        outcome
    }

    /// Record and return a rejected reload: the running config stays.
    fn rejected(&self, trigger: &'static str, errors: Vec<String>) -> ReloadOutcome {
        metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "error").increment(1);
        let cluster_version = match self.origin() {
            Origin::Cluster { version, .. } => Some(version),
            Origin::File => None,
        };
        let outcome = ReloadOutcome {
            result: "error",
            trigger,
            at_ms: unix_ms(),
            version: self.router.live().version,
            errors,
            warnings: Vec::new(),
            cluster_version,
        };
        if let Ok(mut last) = self.last.lock() {
            *last = outcome.clone();
        }
        outcome
    }
}

/// Listener settings that changed: they need a restart.
fn listener_changes(old: &stoke_config::EdgeSettings, new: &stoke_config::EdgeSettings) -> Vec<String> {
    let mut out = Vec::new();
    for (name, a, b) in [("http", old.http, new.http), ("https", old.https, new.https), ("h3", old.h3, new.h3)] {
        if a != b {
            out.push(format!("[edge].{name} changed from {a:?} to {b:?}; listeners change only at restart"));
        }
    }
    if old.admin != new.admin {
        out.push(format!("[edge].admin changed from {} to {}; listeners change only at restart", old.admin, new.admin));
    }
    if old.threads != new.threads {
        out.push("[edge].threads changed; it takes effect at restart".into());
    }
    out
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
