//! The public TCP listeners and their accept loop. Sockets are bound here
//! (so that port 0 works and the real address is known); each accepted
//! connection is pingora-core's TCP stream, with its socket digest (the
//! peer's address, TCP_INFO) and pingora's TLS handshake (rustls,
//! certificates by SNI, ALPN), then one task that serves it on hyper
//! ([`super::conn`]). There is no buffer of stoke's under hyper's: hyper
//! writes an answer's head and a small body in one `writev`.
//!
//! The loop is stoke's, not pingora's listening service: pingora's runs
//! each connection in a task sized for its TLS handshake (about 9 KB, held
//! for the connection's life) and boxes the application's future in a
//! second allocation. Here a TLS handshake is boxed and freed once done, and
//! the connection's future is the task itself (`benches/README.md`, memory
//! per open stream).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::listeners::tls::{Acceptor, TlsSettings};
use pingora::protocols::l4::listener::Listener;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use tokio::sync::watch;

use super::engine::Engine;
use crate::tls::CertResolver;
use pingora::protocols::l4::stream::Stream as L4Stream;

/// The HTTP/2 connection preface (RFC 9113 §3.4), which an h2c client
/// sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Once per connection: caps the connections served at once, tells
/// HTTP/2 from HTTP/1.1, and serves the connection on hyper
/// ([`super::conn`]), each request through the forwarding engine.
pub struct Connections {
    engine: Arc<Engine>,
    active: Arc<AtomicUsize>,
}

impl Connections {
    /// Serve one connection until it closes or is not to be reused.
    async fn serve(&self, mut stream: Stream, shutdown: &ShutdownWatch) {
        let router = self.engine.router();
        let max = router.live().snapshot.network.edge.max_connections;
        let Some(_counted) = Counted::take(&self.active, max) else {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL).increment(1);
            tracing::debug!(max, "connection refused: max_connections reached");
            return;
        };
        // A client that says nothing for the header timeout, or closes
        // before its first bytes, is let go here.
        let wait = router.live().snapshot.network.edge.client_header_timeout;
        let Some(h2) = speaks_h2(&mut stream, wait).await else { return };
        super::conn::serve(self.engine.clone(), stream, h2, shutdown.clone()).await;
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

/// How long a client has to finish its TLS handshake (pingora's listener
/// allows the same).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Backlog of the public listeners.
pub const BACKLOG: i32 = 1024;

/// The connections of every public TCP listener, served by `engine`;
/// `connections` counts them (TCP and QUIC) against `max_connections`.
pub fn app(engine: Arc<Engine>, connections: Arc<AtomicUsize>) -> Connections {
    Connections { engine, active: connections }
}

/// Bind `addr` (port 0: any free port) with `SO_REUSEADDR`, and with
/// `TCP_NODELAY`, which every accepted connection inherits (Linux), so that
/// a token stream's small writes leave at once rather than wait (Nagle)
/// for the client's delayed acknowledgement of the one before, up to 40 ms.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
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
    let app = Arc::new(app);
    let mut loops = Vec::with_capacity(endpoints.len());
    for ep in endpoints {
        let tls = match ep.tls {
            Some(resolver) => {
                let mut tls = TlsSettings::intermediate("", "").map_err(std::io::Error::other)?;
                tls.set_cert_resolver(resolver);
                tls.set_alpn(ALPN::H2H1);
                Some(Arc::new(tls.build()))
            }
            None => None,
        };
        ep.socket.set_nonblocking(true)?;
        let listener = Listener::from(tokio::net::TcpListener::from_std(ep.socket)?);
        loops.push(tokio::spawn(accept(app.clone(), listener, tls, shutdown.clone())));
    }
    for l in loops {
        let _ = l.await;
    }
    Ok(())
}

/// Accept connections on `listener` until `shutdown` turns true, each in a
/// task of its own.
async fn accept(app: Arc<Connections>, listener: Listener, tls: Option<Arc<Acceptor>>, mut shutdown: ShutdownWatch) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok(stream) => {
                let (app, tls, shutdown) = (app.clone(), tls.clone(), shutdown.clone());
                tokio::spawn(async move {
                    let stream: Stream = match tls {
                        None => Box::new(stream),
                        // Boxed: rustls's handshake future is large and
                        // done with before the first request.
                        Some(tls) => match Box::pin(handshake(stream, &tls)).await {
                            Some(stream) => stream,
                            None => return,
                        },
                    };
                    app.serve(stream, &shutdown).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of file descriptors: accept() fails at once until
                // some are freed, so wait rather than spin.
                if e.raw_os_error() == Some(EMFILE) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// `EMFILE`: the process is out of file descriptors.
const EMFILE: i32 = 24;

/// The TLS session over an accepted connection, once its handshake is
/// done; `None` if it fails or times out.
async fn handshake(stream: L4Stream, tls: &Acceptor) -> Option<Stream> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.tls_handshake(stream)).await {
        Ok(Ok(tls)) => Some(Box::new(tls)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_small_writes_at_once() {
        let socket = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let _client = std::net::TcpStream::connect(socket.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = socket.accept().expect("accept");
        assert!(accepted.nodelay().expect("getsockopt"), "TCP_NODELAY, inherited from the listener");
    }

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
