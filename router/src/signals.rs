//! Process signals: the stop signals every long-running command waits for.

/// Catch SIGTERM and SIGINT from now on; the returned future ends at the
/// first of them. Call it before anything starts serving: until then a
/// signal still has its default action and ends the process at once,
/// cutting whatever was in flight.
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            // Without signal handlers, only Ctrl-C via tokio's fallback.
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Catch SIGHUP from now on (a reload request); `None`, with a warning, if
/// the handler cannot be installed.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /reload or the file watch");
            None
        }
    }
}
