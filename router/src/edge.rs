//! One edge: binds the listeners, probes the replicas, serves until told to
//! stop, then drains. Runs on the caller's tokio runtime, so that tests can
//! run several edges in one process and the CLI runs one per process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use stoke_config::Snapshot;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{Admin, AdminError};
use crate::control::{probe, sleep};
use crate::drain::Drain;
use crate::proxy::listener::{self, Endpoint};
use crate::reload::watch::FileWatch;
use crate::reload::{ConfigSource, Reloader};
use crate::state::Router;
use crate::tls::{CertResolver, CertStore};
use crate::upgrade::{Handover, Inherited, Kind, Listening, Next, Process};

/// Why an edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr} ({which}): {source}")]
    Bind {
        /// Which listener.
        which: &'static str,
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A certificate or key cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The config file cannot be loaded.
    #[error("{0}")]
    Config(#[from] stoke_config::ConfigError),
    /// The admin listener cannot start.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The HTTP/3 listener cannot start.
    #[error(transparent)]
    H3(#[from] crate::h3::H3Error),
    /// The upgrade socket cannot be used.
    #[error(transparent)]
    Upgrade(#[from] crate::upgrade::UpgradeError),
}

/// `listener` on the current tokio runtime.
fn tokio_listener(listener: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// Where a running edge listens.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// Plain HTTP/1.1 + h2c.
    pub http: Option<SocketAddr>,
    /// TLS: HTTP/1.1 + HTTP/2.
    pub https: Option<SocketAddr>,
    /// QUIC: HTTP/3 (UDP).
    pub h3: Option<SocketAddr>,
    /// The admin API.
    pub admin: SocketAddr,
}

/// A running edge.
pub struct Edge {
    /// The routing core (live snapshot and pool states).
    pub router: Arc<Router>,
    /// Bound addresses (port 0 in the config becomes the real port here).
    pub bound: Bound,
    shutdown: watch::Sender<bool>,
    halt: watch::Sender<bool>,
    listeners: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
    drain: Drain,
    drain_timeout: Duration,
    certs: Option<Arc<CertResolver>>,
    ready: Arc<AtomicBool>,
    reloader: Option<Arc<Reloader>>,
    admin_stop: watch::Sender<bool>,
    quic: Option<quinn::Endpoint>,
    taken: watch::Receiver<bool>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// After the drain, how long idle client connections are kept for a
/// request that may be on its way.
const IDLE_DRAIN: Duration = Duration::from_secs(2);

/// How long a starting edge waits for the cluster's config once it is
/// connected (the KV calls of one round), beyond the connection itself.
const CATCH_UP_CALLS: Duration = Duration::from_secs(3);

/// Timeouts up to this long use pingora's fast timer; longer ones tokio's.
const FAST_TIMER_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

impl Edge {
    /// Start an edge for `snapshot` (no reload source): probe every
    /// replica once, then bind and serve.
    pub async fn start(snapshot: Snapshot) -> Result<Edge, StartError> {
        Self::start_inner(snapshot, None, None).await
    }

    /// Start an edge from a config file, reloaded when it changes and on
    /// `POST /reload` (SIGHUP is the caller's, as signals are per process).
    pub async fn start_from(source: ConfigSource) -> Result<Edge, StartError> {
        Self::start_upgrade(source, None).await
    }

    /// Start an edge from a config file on the listening sockets `inherited`
    /// from the running process (where the config still names them; others
    /// are bound), then tell that process to stop accepting and drain.
    pub async fn start_upgrade(source: ConfigSource, inherited: Option<Inherited>) -> Result<Edge, StartError> {
        let path = source.path.clone();
        let location = source.location.clone();
        let snapshot = tokio::task::spawn_blocking(move || stoke_config::load_snapshot(&path, location.as_deref()))
            .await
            .map_err(|e| StartError::Tls(format!("loading the config failed: {e}")))??;
        Self::start_inner(snapshot, Some(source), inherited).await
    }

    async fn start_inner(
        snapshot: Snapshot,
        source: Option<ConfigSource>,
        mut inherited: Option<Inherited>,
    ) -> Result<Edge, StartError> {
        // pingora's fast timers stay in a per-thread tree until their
        // deadline, even when the operation finished long before: every read
        // under a 300 s `read_timeout` would hold an entry for five minutes.
        // Long timeouts, which are nearly always cancelled, go to tokio's
        // timer instead, which forgets a timer when it is dropped.
        pingora::time::fast_timeout::set_fast_timeout_to_tokio_threshold(Some(FAST_TIMER_LIMIT));
        let edge_conf = snapshot.network.edge.clone();
        let certs = if snapshot.network.tls.is_empty() {
            None
        } else {
            Some(CertResolver::new(CertStore::build(&snapshot.network.tls).map_err(StartError::Tls)?))
        };
        let process = Process::new(inherited.as_ref().map_or(1, Inherited::generation));
        // The first process of a line listens for the next one before it
        // serves, so that a second `stoke serve` on the same socket fails
        // here, before it binds anything.
        let handover = match (&edge_conf.upgrade_socket, &inherited) {
            (Some(path), None) => Some(Handover::bind(path)?),
            _ => None,
        };
        let router = Router::new(snapshot);
        let reloader = source.map(|s| Reloader::new(s, router.clone(), certs.clone()));
        let ready = Arc::new(AtomicBool::new(false));
        // Refuse an unprotected admin listener before anything is bound.
        let admin = Admin::new(
            router.clone(),
            reloader.clone(),
            edge_conf.admin_token_env.as_deref(),
            edge_conf.admin,
            ready.clone(),
        )?
        .with_page(Arc::new(|| crate::admin::status::PAGE.to_owned()))
        .with_process(process.clone());
        // (After the admin API installed the metrics recorder.)
        metrics::gauge!(crate::metrics::PROCESS_GENERATION).set(process.generation as f64);
        // Know which replicas are up before the first request arrives.
        probe::probe_all(&router.live()).await;
        router.rerank();

        let mut listening = Listening::default();
        let mut endpoints = Vec::new();
        let mut bound = Bound { http: None, https: None, h3: None, admin: edge_conf.admin };
        let mut tcp = |which: Kind, addr: SocketAddr| {
            let name = which.name();
            let socket = match inherited.as_mut().and_then(|i| i.tcp(which, addr)) {
                Some(socket) => socket,
                None => listener::bind(addr).map_err(|source| StartError::Bind { which: name, addr, source })?,
            };
            let local = socket.local_addr().unwrap_or(addr);
            listening.keep(which, addr, local, &socket).map_err(|source| StartError::Bind {
                which: name,
                addr,
                source,
            })?;
            Ok::<_, StartError>((socket, local))
        };
        if let Some(addr) = edge_conf.http {
            let (socket, local) = tcp(Kind::Http, addr)?;
            bound.http = Some(local);
            endpoints.push(Endpoint { socket, tls: None });
        }
        if let (Some(addr), Some(resolver)) = (edge_conf.https, &certs) {
            let (socket, local) = tcp(Kind::Https, addr)?;
            bound.https = Some(local);
            endpoints.push(Endpoint { socket, tls: Some(resolver.clone()) });
        }
        let (admin_socket, admin_local) = tcp(Kind::Admin, edge_conf.admin)?;

        let quic = match (edge_conf.h3, &certs) {
            (Some(addr), Some(resolver)) => {
                let udp = inherited.as_mut().and_then(|i| i.udp(addr));
                let h3 = crate::h3::bind(addr, resolver.clone(), &edge_conf, udp, process.generation)?;
                let fail = |source| StartError::Bind { which: "h3", addr, source };
                listening.keep(Kind::H3, addr, h3.local, &h3.socket).map_err(fail)?;
                // Datagrams of the running process's QUIC connections go to
                // it, those of processes still draining before it to them.
                for (generation, channel) in inherited.as_mut().map(|i| i.steers(addr)).unwrap_or_default() {
                    h3.steered.forward_to(generation, channel).map_err(fail)?;
                }
                listening.steer(h3.steered.clone());
                bound.h3 = Some(h3.local);
                Some(h3.endpoint)
            }
            _ => None,
        };
        // `shutdown`: stop accepting, stop deciding to sleep pools, stop
        // reporting load (a new process reports this edge's). `halt`: stop
        // the rest (probes, the cluster's claims), once the drain is over,
        // so that requests held for a wake meanwhile still see it come.
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (halt, halt_rx) = watch::channel(false);
        // The cluster connects in the background: an edge whose NATS server
        // is down serves alone meanwhile.
        let cluster = crate::control::cluster::Cluster::join(&router, shutdown_rx.clone(), halt_rx.clone()).await;
        // A clustered edge started from a file follows the cluster's config
        // rollouts (`stoke push`); until the first push, its file is its config.
        let (caught_up, caught_up_rx) = tokio::sync::oneshot::channel();
        let rollout = cluster.zip(reloader.clone()).map(|(c, r)| {
            tokio::spawn(crate::control::cluster::rollout::follow(router.clone(), c, r, shutdown_rx.clone(), caught_up))
        });
        let drain = Drain::default();
        // HTTPS answers advertise HTTP/3 where it is served.
        let alt_svc = bound.h3.map(|a| crate::h3::alt_svc(a.port()));
        let engine = Arc::new(crate::proxy::engine::Engine::new(router.clone(), drain.clone(), alt_svc));
        // The admin API outlives the drain, so that /readyz says 503 meanwhile
        // (after an upgrade it stops accepting at once: the new process
        // answers on the same socket).
        let (admin_stop, admin_rx) = watch::channel(false);
        let admin_socket = tokio_listener(admin_socket).map_err(|source| StartError::Bind {
            which: "admin",
            addr: admin_local,
            source,
        })?;
        let (admin_addr, admin_task) = admin.with_idle(engine.idle().clone()).spawn_on(admin_socket, admin_rx)?;
        bound.admin = admin_addr;
        // An edge that joins a cluster serves the version the network
        // settled on from its first request (the listeners are bound:
        // clients wait in the backlog meanwhile), or, if the cluster does
        // not answer soon, its file until it does.
        if rollout.is_some() {
            let wait = crate::control::cluster::rollout::CATCH_UP + CATCH_UP_CALLS;
            if tokio::time::timeout(wait, caught_up_rx).await.is_err() {
                tracing::warn!(
                    ?wait,
                    "the cluster did not give its config in time; serving the local file until it does"
                );
            }
        }
        // TCP and QUIC connections count against one max_connections.
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = listener::app(engine.clone(), connections.clone());
        let listeners = tokio::spawn(listener::serve(app, endpoints, shutdown_rx.clone()));
        let mut background = vec![
            tokio::spawn(probe::run(router.clone(), halt_rx.clone())),
            tokio::spawn(sleep::run(router.clone(), shutdown_rx.clone())),
            tokio::spawn(crate::proxy::idle::run(engine.idle().clone(), halt_rx.clone())),
            admin_task,
        ];
        background.extend(rollout);
        if let Some(endpoint) = &quic {
            background.push(tokio::spawn(crate::h3::serve(
                endpoint.clone(),
                engine,
                connections.clone(),
                shutdown_rx.clone(),
            )));
        }
        if let Some(r) = &reloader {
            match FileWatch::start(r.clone()) {
                Ok(w) => background.push(tokio::spawn(w.run(shutdown_rx.clone()))),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /reload")
                }
            }
        }

        let live = router.live();
        for (listener, addr) in [("http", bound.http), ("https", bound.https), ("h3", bound.h3)] {
            if let Some(addr) = addr {
                tracing::info!(listener, addr = %addr, "listening");
            }
        }
        tracing::info!(
            edge = %live.snapshot.edge_location().id,
            version = live.version,
            generation = process.generation,
            "edge serving: {}",
            live.snapshot.summary()
        );
        ready.store(true, Ordering::Release);
        let (taken, taken_rx) = watch::channel(false);
        let next =
            Next { listening: Arc::new(listening), drain: drain.clone(), taken: Arc::new(taken), stopped: shutdown_rx };
        if let Some(h) = handover {
            tokio::spawn(h.serve(process.clone(), next));
        } else if let Some(inherited) = inherited {
            // Sockets the new config no longer names are closed here; the
            // old process closes its own once it stops accepting.
            let old = inherited.old_pid();
            inherited.serving(process.clone(), next)?;
            tracing::info!(previous = old, generation = process.generation, "took over from the running process");
        }
        Ok(Edge {
            router,
            bound,
            shutdown,
            halt,
            listeners,
            background,
            drain,
            drain_timeout: edge_conf.drain_timeout,
            certs,
            ready,
            reloader,
            admin_stop,
            quic,
            taken: taken_rx,
            connections,
        })
    }

    /// The reloader, if the edge was started from a file.
    pub fn reloader(&self) -> Option<&Arc<Reloader>> {
        self.reloader.as_ref()
    }

    /// The certificate resolver, if the edge has TLS.
    pub fn certs(&self) -> Option<&Arc<CertResolver>> {
        self.certs.as_ref()
    }

    /// Requests in progress.
    pub fn in_progress(&self) -> usize {
        self.drain.active()
    }

    /// Resolves once a new process serves on this one's listening sockets
    /// (`stoke upgrade`); then [`Edge::shutdown`] drains this one.
    pub fn taken_over(&self) -> impl std::future::Future<Output = ()> + 'static {
        let mut taken = self.taken.clone();
        async move {
            if taken.wait_for(|t| *t).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stop accepting, let in-flight requests, held requests and open
    /// streams finish (up to the drain timeout), stop background work.
    /// Returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        let taken_over = *self.taken.borrow();
        self.ready.store(false, Ordering::Release);
        self.drain.stop();
        let _ = self.shutdown.send(true);
        if taken_over {
            // The new process answers on the admin socket now.
            let _ = self.admin_stop.send(true);
        }
        // The listeners close first; keep-alive connections are told to end
        // after their current request, HTTP/2 and HTTP/3 ones get GOAWAY.
        match self.listeners.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "listener failed"),
            Err(e) => tracing::warn!(error = %e, "listener task failed"),
            Ok(Ok(())) => {}
        }
        let drained = self.drain.wait(self.drain_timeout).await;
        // Idle keep-alive connections get a moment for a request that may
        // be on its way (answered with `Connection: close`) before the
        // process ends under them.
        let idle_until = tokio::time::Instant::now() + IDLE_DRAIN;
        while self.connections.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < idle_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(endpoint) = &self.quic {
            endpoint.close(quinn::VarInt::from_u32(0x100), b"shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        let _ = self.halt.send(true);
        let _ = self.admin_stop.send(true);
        for t in &self.background {
            t.abort();
        }
        if !drained {
            tracing::warn!(
                timeout = ?self.drain_timeout,
                in_progress = self.drain.active(),
                "drain timeout passed with requests still in flight"
            );
        }
        drained
    }
}
