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
}

/// Reloads one edge's config.
#[derive(Debug)]
pub struct Reloader {
    source: ConfigSource,
    router: Arc<Router>,
    certs: Option<Arc<CertResolver>>,
    last: Mutex<ReloadOutcome>,
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
            }),
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

    /// Reload now. Returns the new outcome; on error the running snapshot
    /// stays.
    pub async fn reload(&self, trigger: &'static str) -> ReloadOutcome {
        let _one_at_a_time = self.serial.lock().await;
        let source = self.source.clone();
        // Parsing a large network takes milliseconds: keep it off the
        // runtime's worker threads.
        let loaded = tokio::task::spawn_blocking(move || {
            stoke_config::load_snapshot(&source.path, source.location.as_deref()).map_err(|e| e.lines()).and_then(
                |snapshot| {
                    let certs = CertStore::build(&snapshot.network.tls).map_err(|e| vec![e])?;
                    Ok((snapshot, certs))
                },
            )
        })
        .await
        .unwrap_or_else(|e| Err(vec![format!("reload task failed: {e}")]));

        let outcome = match loaded {
            Ok((snapshot, certs)) => {
                let warnings = listener_changes(&self.router.live().snapshot.network.edge, &snapshot.network.edge);
                let no_tls_yet = self.certs.is_none() && !certs.is_empty();
                let live = self.router.swap(snapshot);
                if let Some(resolver) = &self.certs {
                    resolver.swap(certs);
                }
                let mut warnings = warnings;
                if no_tls_yet {
                    warnings.push(
                        "certificates were added, but TLS listeners start only at startup: restart to serve them"
                            .into(),
                    );
                }
                for w in &warnings {
                    tracing::warn!("reload: {w}");
                }
                tracing::info!(version = live.version, trigger, "config reloaded: {}", live.snapshot.summary());
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
                metrics::gauge!(m::CONFIG_SNAPSHOT_VERSION).set(live.version as f64);
                ReloadOutcome {
                    result: "ok",
                    trigger,
                    at_ms: unix_ms(),
                    version: live.version,
                    errors: Vec::new(),
                    warnings,
                }
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(trigger, "reload rejected, the running config stays: {e}");
                }
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "error").increment(1);
                ReloadOutcome {
                    result: "error",
                    trigger,
                    at_ms: unix_ms(),
                    version: self.router.live().version,
                    errors,
                    warnings: Vec::new(),
                }
            }
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
