//! Process signals, caught from the first moment: SIGTERM and SIGINT stop
//! a long-running command (a second one stops it without waiting for the
//! drain), SIGHUP asks for a reload. [`install`] (the
//! binary's first act) installs the handlers on a thread of their own, so
//! that no signal finds its default action — ending the process, in-flight
//! requests with it — while the config loads or the edge starts; a stop
//! that arrives then is kept and acted on as soon as someone waits for it,
//! and so is a reload.

use std::sync::OnceLock;

use tokio::sync::watch;

struct Caught {
    stop: watch::Sender<u32>,
    hangups: watch::Sender<u64>,
}

static CAUGHT: OnceLock<Caught> = OnceLock::new();

/// Install the handlers (once; later calls do nothing). Returns once they
/// are in place.
pub fn install() {
    let _ = caught();
}

fn caught() -> &'static Caught {
    CAUGHT.get_or_init(|| {
        let (stop, _) = watch::channel(0);
        let (hangups, _) = watch::channel(0);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, hup_tx) = (stop.clone(), hangups.clone());
        let spawned = std::thread::Builder::new().name("stoke-signals".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_io().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let handlers =
                    (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()));
                let (mut term, mut int, mut hup) = match handlers {
                    (Ok(t), Ok(i), Ok(h)) => (t, i, h),
                    (t, i, h) => {
                        let e = [t.err(), i.err(), h.err()].into_iter().flatten().next();
                        let _ = ready_tx.send(Err(e.map_or_else(|| "unknown".to_owned(), |e| e.to_string())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        _ = term.recv() => { stop_tx.send_modify(|n| *n += 1); }
                        _ = int.recv() => { stop_tx.send_modify(|n| *n += 1); }
                        _ = hup.recv() => { hup_tx.send_modify(|n| *n += 1); }
                    }
                }
            });
        });
        let installed = match spawned {
            Ok(_) => ready_rx.recv().unwrap_or_else(|_| Err("the signal thread ended".to_owned())),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = installed {
            eprintln!("stoke: cannot catch signals ({e}); SIGTERM and SIGHUP keep their default action");
        }
        Caught { stop, hangups }
    })
}

/// Resolves at the first SIGTERM or SIGINT since [`install`], even one that
/// came before this was called.
pub fn stop_signal() -> impl std::future::Future<Output = ()> {
    stops(1)
}

/// Resolves at the second SIGTERM or SIGINT since [`install`]: stop now,
/// whatever is still draining.
pub fn second_stop_signal() -> impl std::future::Future<Output = ()> {
    stops(2)
}

fn stops(n: u32) -> impl std::future::Future<Output = ()> {
    let mut stop = caught().stop.subscribe();
    async move {
        let _ = stop.wait_for(|s| *s >= n).await;
    }
}

/// SIGHUPs since [`install`]: the value counts them, and `changed()` wakes
/// at each (one that came before this was called included).
pub fn hangups() -> watch::Receiver<u64> {
    let mut rx = caught().hangups.subscribe();
    if *rx.borrow() > 0 {
        rx.mark_changed();
    }
    rx
}
