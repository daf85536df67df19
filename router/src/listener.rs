//! The public TCP listeners. Sockets are bound here (so that port 0 works
//! and the real address is known) and handed to pingora's own accept loop
//! as inherited file descriptors, so that connections get pingora's buffers,
//! socket digests and TLS handshake exactly as in a stock pingora server.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;
use std::sync::Arc;

use parking_lot::Mutex;
use pingora::apps::HttpServerOptions;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::protocols::ALPN;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::Fds;
use pingora::services::listening::Service as ListeningService;
use pingora::services::Service as _;
use tokio::sync::watch;

use crate::proxy::EdgeProxy;
use crate::routing::Router;
use crate::tls::CertResolver;

/// The pingora application every public listener shares.
pub type App = HttpProxy<EdgeProxy>;

/// Backlog of the public listeners.
pub const BACKLOG: i32 = 1024;

/// Build the proxy application over `router`; requests hold `drain` guards.
pub fn app(router: Arc<Router>, threads: usize, drain: crate::drain::Drain) -> App {
    let conf = ServerConf { threads: threads.max(1), ..ServerConf::default() };
    let mut proxy = pingora::proxy::http_proxy(&Arc::new(conf), EdgeProxy::new(router, drain));
    let mut options = HttpServerOptions::default();
    // The plain listener speaks HTTP/1.1 and h2c (prior knowledge); on TLS
    // connections pingora ignores this and follows ALPN.
    options.h2c = true;
    proxy.server_options = Some(options);
    proxy
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
pub async fn serve(app: App, endpoints: Vec<Endpoint>, shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let mut service = ListeningService::new("stoke edge".to_owned(), app);
    let mut fds = Fds::new();
    for ep in endpoints {
        let addr = ep.socket.local_addr()?.to_string();
        let mut config = ListenerConfig::tcp(addr.clone());
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
