//! The public TCP listeners. Sockets are bound here (so that port 0 works
//! and the real address is known) and handed to pingora's own accept loop
//! as inherited file descriptors, so that connections get pingora's buffers,
//! socket digests and TLS handshake exactly as in a stock pingora server.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::Fds;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service as ListeningService;
use pingora::services::Service as _;
use tokio::sync::watch;

use super::engine::Engine;
use super::session::Http;
use crate::tls::CertResolver;

/// The HTTP/2 connection preface (RFC 9113 §3.4), which an h2c client
/// sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Once per connection: caps the connections served at once, hands HTTP/2
/// connections to pingora's HTTP/2 accept loop (a task per stream, each
/// through [`Streams`]), and runs the HTTP/1.1 keep-alive loop itself, each
/// request through the forwarding engine. pingora's own loop (its
/// `ServerApp` for an `HttpServerApp`) moves each session into a boxed
/// future of its own; here the session stays where it is
/// (`benches/README.md`, the forwarding engine).
pub struct Connections {
    engine: Arc<Engine>,
    h2: Arc<Streams>,
    active: Arc<AtomicUsize>,
}

#[async_trait]
impl ServerApp for Connections {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let router = self.engine.router();
        let max = router.live().snapshot.network.edge.max_connections;
        let Some(_counted) = Counted::take(&self.active, max) else {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL).increment(1);
            tracing::debug!(max, "connection refused: max_connections reached");
            return None;
        };
        // A client that says nothing for the header timeout, or closes
        // before its first bytes, is let go here.
        let wait = router.live().snapshot.network.edge.client_header_timeout;
        if speaks_h2(&mut stream, wait).await? {
            // pingora's HTTP/2 accept loop (it sees the same preface again)
            // spawns a task per stream.
            return self.h2.process_new(stream, shutdown).await;
        }
        let mut session = ServerSession::new_http1(stream);
        let mut stopping = shutdown.clone();
        let mut reused = false;
        loop {
            if *shutdown.borrow() {
                // Stop a connection of a server that is stopping from being reused.
                session.set_keepalive(None);
            } else {
                let edge = &router.live().snapshot.network.edge;
                // pingora bounds each read of a request header by the
                // keep-alive timeout: a new connection gets the header
                // timeout, a reused one the keep-alive timeout.
                let wait = if reused { edge.keepalive_timeout } else { edge.client_header_timeout };
                session.set_keepalive(Some(wait.as_secs().max(1)));
            }
            let read = tokio::select! {
                biased;
                read = session.read_request() => read,
                // A connection waiting for its next request ends with the server.
                _ = stopping.wait_for(|s| *s), if reused => return None,
            };
            if !accept_head(&mut session, read).await {
                return None;
            }
            let held = router.bodies.account();
            if !self.engine.serve(&mut Http::new(&mut session, held)).await {
                session.shutdown().await;
                return None;
            }
            let (stream, pipelined) = session.finish().await.ok()??.into_parts();
            session = ServerSession::new_http1(stream);
            if let Some(prefix) = pipelined {
                session.set_pipelined_prefix(prefix);
            }
            reused = true;
        }
    }
}

/// Whether a request head was read (`read`) that the engine can take; a
/// malformed one is answered 400, `CONNECT` 405.
async fn accept_head(session: &mut ServerSession, read: pingora::Result<bool>) -> bool {
    match read {
        Ok(true) => {}
        Ok(false) => return false,
        Err(e) => {
            if matches!(e.etype(), pingora::ErrorType::InvalidHTTPHeader) {
                tracing::debug!(error = %e, "malformed request head");
                let _ = session.respond_error(400).await;
            }
            session.shutdown().await;
            return false;
        }
    }
    if session.req_header().method == http::Method::CONNECT {
        let _ = session.respond_error(405).await;
        session.shutdown().await;
        return false;
    }
    true
}

/// The HTTP/2 streams of a connection, each in a task of its own from
/// pingora's HTTP/2 accept loop, each through the forwarding engine.
pub struct Streams {
    engine: Arc<Engine>,
    /// h2c on: pingora's accept loop looks for the preface itself.
    options: HttpServerOptions,
}

#[async_trait]
impl HttpServerApp for Streams {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let read = session.read_request().await;
        if !accept_head(&mut session, read).await {
            return None;
        }
        let held = self.engine.router().bodies.account();
        if !self.engine.serve(&mut Http::new(&mut session, held)).await {
            session.shutdown().await;
            return None;
        }
        let _ = session.finish().await;
        None
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }
}

/// Whether `stream` speaks HTTP/2: by ALPN over TLS, by the h2c preface
/// (prior knowledge) on a plain connection, which is peeked at, not read.
/// `None` if the client sends nothing for `wait` or closes first.
pub async fn speaks_h2(stream: &mut Stream, wait: std::time::Duration) -> Option<bool> {
    if stream.get_ssl_digest().is_some() {
        return Some(matches!(stream.selected_alpn_proto(), Some(ALPN::H2)));
    }
    let mut preface = [0u8; H2_PREFACE.len()];
    let peeked = tokio::time::timeout(wait, stream.try_peek(&mut preface)).await.ok()?.ok()?;
    Some(peeked && preface == H2_PREFACE)
}

/// One connection counted against `max_connections` (TCP and QUIC share
/// the count), released when dropped: on every path out of a connection's
/// task, a panic or an abort included.
pub struct Counted(Arc<AtomicUsize>);

impl Counted {
    /// Count one more connection on `active` if fewer than `max` are.
    pub fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        active.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Counted(active.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Idle upstream connections kept, over all replicas.
pub const UPSTREAM_KEEPALIVE_POOL: usize = 1024;

/// The read buffer pingora puts in front of each accepted connection:
/// none. Its default (64 KiB, zeroed when allocated) was a third of what an
/// open stream cost, and buffers nothing the protocol layers above do not
/// buffer again: the HTTP/1 session reads its header into a buffer of its
/// own, rustls and h2 read records and frames into theirs.
pub const L4_READ_BUFFER: usize = 0;

/// Backlog of the public listeners.
pub const BACKLOG: i32 = 1024;

/// The connections of every public TCP listener, served by `engine`;
/// `connections` counts them (TCP and QUIC) against `max_connections`.
pub fn app(engine: Arc<Engine>, connections: Arc<AtomicUsize>) -> Connections {
    let mut options = HttpServerOptions::default();
    // The plain listener speaks HTTP/1.1 and h2c (prior knowledge); on TLS
    // connections pingora ignores this and follows ALPN.
    options.h2c = true;
    let h2 = Arc::new(Streams { engine: engine.clone(), options });
    Connections { engine, h2, active: connections }
}

/// Bind `addr` (port 0: any free port) with `SO_REUSEADDR`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(BACKLOG as u32)?;
    listener.into_std()
}

/// A bound socket and, for HTTPS, the certificates to serve on it.
pub struct Endpoint {
    /// The bound socket.
    pub socket: TcpListener,
    /// TLS certificates (HTTP/2 and HTTP/1.1 by ALPN) or plain.
    pub tls: Option<Arc<CertResolver>>,
}

/// Serve `app` on `endpoints` until `shutdown` turns true. Returns when
/// every listener has stopped accepting; connections still open finish on
/// their own (the caller waits for in-flight requests).
pub async fn serve(app: Connections, endpoints: Vec<Endpoint>, shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let mut service = ListeningService::new("stoke edge".to_owned(), app);
    let mut fds = Fds::new();
    for ep in endpoints {
        let addr = ep.socket.local_addr()?.to_string();
        let mut config = ListenerConfig::tcp(addr.clone())
            .l4_buffer(L4BufferSettings::new(L4_READ_BUFFER, DEFAULT_L4_WRITE_BUFFER_SIZE));
        if let Some(resolver) = ep.tls {
            let mut tls = TlsSettings::intermediate("", "").map_err(std::io::Error::other)?;
            tls.set_cert_resolver(resolver);
            tls.set_alpn(ALPN::H2H1);
            config = config.tls(tls);
        }
        service.add_listener(config);
        // pingora adopts an inherited socket registered under its address.
        fds.add(addr, ep.socket.into_raw_fd());
    }
    service.start_service(Some(Arc::new(Mutex::new(fds))), shutdown, 1).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_released_however_its_task_ends() {
        let active = Arc::new(AtomicUsize::new(0));
        let a = Counted::take(&active, 2).expect("first");
        let _b = Counted::take(&active, 2).expect("second");
        assert!(Counted::take(&active, 2).is_none(), "the cap holds");
        assert_eq!(active.load(Ordering::Acquire), 2, "a refused connection is not counted");
        drop(a);
        // A connection whose task panics releases its place too.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _c = Counted::take(&active, 2).expect("room again");
            panic!("a bug in a connection's task");
        }));
        assert!(panicked.is_err());
        assert_eq!(active.load(Ordering::Acquire), 1);
    }
}
