//! One edge: binds the listeners, probes the replicas, serves until told to
//! stop, then drains. Runs on the caller's tokio runtime, so that tests can
//! run several edges in one process and the CLI runs one per process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::HttpServerApp;
use pingora::listeners::tls::Acceptor;
use stoke_config::Snapshot;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::health;
use crate::listener::{self, Drain};
use crate::routing::Router;
use crate::tls::{self, CertResolver, CertStore};

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
}

/// Where a running edge listens.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// Plain HTTP/1.1 + h2c.
    pub http: Option<SocketAddr>,
    /// TLS: HTTP/1.1 + HTTP/2.
    pub https: Option<SocketAddr>,
}

/// A running edge.
pub struct Edge {
    /// The routing core (live snapshot and pool states).
    pub router: Arc<Router>,
    /// Bound addresses (port 0 in the config becomes the real port here).
    pub bound: Bound,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    drain: Drain,
    drain_timeout: Duration,
    certs: Option<Arc<CertResolver>>,
    app: Arc<listener::App>,
}

impl Edge {
    /// Start an edge for `snapshot`: probe every replica once, then bind
    /// and serve.
    pub async fn start(snapshot: Snapshot) -> Result<Edge, StartError> {
        let edge_conf = snapshot.network.edge.clone();
        let threads = match edge_conf.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let certs = if snapshot.network.tls.is_empty() {
            None
        } else {
            Some(CertResolver::new(CertStore::build(&snapshot.network.tls).map_err(StartError::Tls)?))
        };
        let router = Router::new(snapshot);
        // Know which replicas are up before the first request arrives.
        health::probe_all(&router.live()).await;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let drain = Drain::default();
        let app = listener::app(router.clone(), threads);
        let mut tasks = Vec::new();
        let mut bound = Bound { http: None, https: None };

        if let Some(addr) = edge_conf.http {
            let l = bind(addr, "http").await?;
            bound.http = Some(l.local_addr().unwrap_or(addr));
            tasks.push(tokio::spawn(listener::serve(l, app.clone(), None, shutdown_rx.clone(), drain.guard())));
        }
        if let (Some(addr), Some(resolver)) = (edge_conf.https, &certs) {
            let config = tls::server_config(resolver.clone(), &[b"h2", b"http/1.1"])
                .map_err(|e| StartError::Tls(e.to_string()))?;
            let acceptor = Arc::new(Acceptor::from_server_config(config));
            let l = bind(addr, "https").await?;
            bound.https = Some(l.local_addr().unwrap_or(addr));
            tasks.push(tokio::spawn(listener::serve(
                l,
                app.clone(),
                Some(acceptor),
                shutdown_rx.clone(),
                drain.guard(),
            )));
        }
        tasks.push(tokio::spawn(health::run(router.clone(), shutdown_rx.clone())));
        let live = router.live();
        tracing::info!(
            edge = %live.snapshot.edge_location().id,
            http = ?bound.http,
            https = ?bound.https,
            version = live.version,
            "edge serving: {}",
            live.snapshot.summary()
        );
        Ok(Edge {
            router,
            bound,
            shutdown,
            tasks,
            drain,
            drain_timeout: edge_conf.drain_timeout,
            certs,
            app,
        })
    }

    /// The certificate resolver, if the edge has TLS.
    pub fn certs(&self) -> Option<&Arc<CertResolver>> {
        self.certs.as_ref()
    }

    /// Stop accepting, let in-flight requests finish (up to the drain
    /// timeout), stop background work. Returns whether everything finished
    /// in time.
    pub async fn shutdown(self) -> bool {
        let _ = self.shutdown.send(true);
        // Wake keep-alive connections waiting for a next request, so that
        // they close instead of holding the drain open.
        self.app.http_cleanup().await;
        let drained = self.drain.wait(self.drain_timeout).await;
        for t in &self.tasks {
            t.abort();
        }
        if !drained {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout passed with requests still in flight");
        }
        drained
    }
}

async fn bind(addr: SocketAddr, which: &'static str) -> Result<TcpListener, StartError> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(|source| StartError::Bind { which, addr, source })?;
    // Let a restarted edge bind while old connections sit in TIME_WAIT.
    let _ = socket.set_reuseaddr(true);
    socket.bind(addr).map_err(|source| StartError::Bind { which, addr, source })?;
    socket.listen(1024).map_err(|source| StartError::Bind { which, addr, source })
}
