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

use super::Reloader;

/// Quiet time after the last change before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// A watch on the config file, set up before the edge starts serving so
/// that no change after that is missed.
pub struct FileWatch {
    reloader: Arc<Reloader>,
    // Kept alive for the life of the watch.
    _watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<()>,
}

impl FileWatch {
    /// Watch the directory of the reloader's file.
    pub fn start(reloader: Arc<Reloader>) -> notify::Result<FileWatch> {
        let path = reloader.path().to_path_buf();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name: Option<OsString> = path.file_name().map(|n| n.to_owned());
        let (tx, events) = mpsc::channel::<()>(16);
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            if event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                let _ = tx.try_send(());
            }
        };
        let mut watcher = notify::recommended_watcher(handler)?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        tracing::info!(file = %path.display(), "watching the config file for changes");
        Ok(FileWatch { reloader, _watcher: watcher, events })
    }

    /// Reload whenever the file changes (debounced), until `stop`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                got = self.events.recv() => if got.is_none() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            // Debounce: wait until the file has been quiet for a while.
            loop {
                tokio::select! {
                    got = self.events.recv() => if got.is_none() { return },
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                }
            }
            self.reloader.reload("file").await;
        }
    }
}

/// Reload on each SIGHUP counted by `hup` ([`crate::signals::hangups`]),
/// until `stop`; one that came while the edge started reloads once it serves.
pub async fn on_sighup(reloader: Arc<Reloader>, mut hup: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            got = hup.changed() => if got.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        reloader.reload("signal").await;
    }
}
