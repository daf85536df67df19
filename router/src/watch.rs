//! Reload triggers besides `POST /reload`: a debounced watch of the config
//! file, and SIGHUP.
//!
//! The watch is on the file's directory, so that editors that write a
//! temporary file and rename it over the config, and those that truncate
//! and rewrite it in place, are both seen. Events are debounced: a reload
//! starts only once the file has been quiet for [`DEBOUNCE`], so a file
//! being written is not read half-way (and if it were, it would fail
//! validation and the running config would stay).

use std::ffi::OsString;
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::reload::Reloader;

/// Quiet time after the last change before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Reload whenever the config file changes, until `stop`.
pub async fn watch_file(reloader: Arc<Reloader>, mut stop: watch::Receiver<bool>) {
    let path = reloader.path().to_path_buf();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name: Option<OsString> = path.file_name().map(|n| n.to_owned());
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
            let _ = tx.try_send(());
        }
    };
    let mut watcher = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload");
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory; reload with SIGHUP or POST /reload");
        return;
    }
    tracing::info!(file = %path.display(), "watching the config file for changes");
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        // Debounce: wait until the file has been quiet for a while.
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                _ = tokio::time::sleep(DEBOUNCE) => break,
            }
        }
        reloader.reload("file").await;
    }
}

/// Reload on SIGHUP, until `stop`.
pub async fn on_sighup(reloader: Arc<Reloader>, mut stop: watch::Receiver<bool>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP");
        return;
    };
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        reloader.reload("signal").await;
    }
}
