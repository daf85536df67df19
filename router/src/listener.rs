//! The public TCP listeners: our own accept loop (so that we bind port 0,
//! count connections and drain them at shutdown) handing each connection to
//! pingora's HTTP/1.1 + HTTP/2 server and proxy.

use std::sync::Arc;
use std::time::Duration;

use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::proxy::EdgeProxy;
use crate::routing::Router;

/// Longest a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pingora application every public listener shares.
pub type App = HttpProxy<EdgeProxy>;

/// Build the proxy application over `router`.
pub fn app(router: Arc<Router>, threads: usize) -> Arc<App> {
    let conf = ServerConf { threads: threads.max(1), ..ServerConf::default() };
    let mut proxy = pingora::proxy::http_proxy(&Arc::new(conf), EdgeProxy::new(router));
    let mut options = HttpServerOptions::default();
    // The plain listener speaks HTTP/1.1 and h2c (prior knowledge).
    options.h2c = true;
    proxy.server_options = Some(options);
    Arc::new(proxy)
}

/// Keeps one connection counted; dropped when the connection ends.
#[derive(Clone)]
pub struct ConnGuard(#[allow(dead_code)] mpsc::Sender<()>);

/// Counts open connections so that shutdown can wait for them.
pub struct Drain {
    tx: Option<mpsc::Sender<()>>,
    rx: mpsc::Receiver<()>,
}

impl Default for Drain {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(1);
        Drain { tx: Some(tx), rx }
    }
}

impl Drain {
    /// A guard to hold for the life of a connection or task.
    pub fn guard(&self) -> ConnGuard {
        ConnGuard(self.tx.clone().expect("guard taken after wait"))
    }

    /// Wait until every guard is dropped, or `timeout` passes; returns
    /// whether everything finished.
    pub async fn wait(mut self, timeout: Duration) -> bool {
        self.tx = None;
        tokio::time::timeout(timeout, self.rx.recv()).await.is_ok()
    }
}

/// Accept connections on `listener` until `shutdown` turns true. With an
/// `acceptor` every connection is TLS first (ALPN picks HTTP/2 or 1.1).
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    acceptor: Option<Arc<Acceptor>>,
    mut shutdown: watch::Receiver<bool>,
    guard: ConnGuard,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of file descriptors: give others a moment to close.
                if e.raw_os_error() == Some(24) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (app, acceptor, shutdown, guard) = (app.clone(), acceptor.clone(), shutdown.clone(), guard.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let l4: L4Stream = tcp.into();
            let stream: Stream = match acceptor {
                None => Box::new(l4),
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.tls_handshake(l4)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            let mut next = app.process_new(stream, &shutdown).await;
            while let Some(stream) = next {
                next = app.process_new(stream, &shutdown).await;
            }
        });
    }
}
