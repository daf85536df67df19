//! Two minimal HTTP/1.1 and h2c forwarders on pingora 0.9, identical but for
//! the forwarding itself, so that one callgrind run can tell what a
//! forwarding loop of stoke's own on pingora-core would cost against
//! pingora-proxy's `ProxyHttp` machinery (`benches/e2e/engine.sh`):
//!
//! - `engine-proxy`: pingora-proxy with a `ProxyHttp` that only names the
//!   upstream peer, as stoke's phases did before its own engine;
//! - `engine-loop`: an `HttpServerApp` that reads the request head, takes an
//!   upstream session from pingora's `Connector` (its connection pool),
//!   forwards the head and the body, and streams the answer back, as
//!   stoke's HTTP/3 path does.
//!
//! Both bind one plain listener (HTTP/1.1 and h2c by prior knowledge) with
//! stoke's listener settings, run on one tokio worker, and forward every
//! request to one upstream address over pooled HTTP/1.1 connections.

use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::sync::Arc;

use parking_lot::Mutex;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::Fds;
use pingora::services::listening::Service as ListeningService;
use pingora::services::Service as _;
use pingora::upstreams::peer::{HttpPeer, Peer, PeerOptions, Proxy};

/// Idle upstream connections kept (stoke's `UPSTREAM_KEEPALIVE_POOL`).
pub const UPSTREAM_POOL: usize = 1024;

/// The listener and upstream of a prototype, from its command line:
/// `LISTEN UPSTREAM` (both `IP:PORT`).
pub struct Args {
    /// Where to accept connections.
    pub listen: SocketAddr,
    /// Where to forward every request.
    pub upstream: SocketAddr,
}

impl Args {
    /// Parse `LISTEN UPSTREAM` from the process arguments.
    pub fn from_env() -> Result<Self, String> {
        let mut args = std::env::args().skip(1);
        let usage = "usage: engine-{proxy,loop} LISTEN UPSTREAM   (e.g. 127.0.0.1:8086 127.0.0.1:8080)";
        let listen = args.next().ok_or(usage)?.parse().map_err(|e| format!("LISTEN: {e}"))?;
        let upstream = args.next().ok_or(usage)?.parse().map_err(|e| format!("UPSTREAM: {e}"))?;
        Ok(Args { listen, upstream })
    }
}

/// The upstream peer of every request: plain HTTP/1.1, as stoke's replicas.
pub fn peer(upstream: SocketAddr) -> HttpPeer {
    HttpPeer::new(upstream, false, String::new())
}

/// The upstream peer as the loop takes pooled connections: pingora's
/// `Peer::matches_fd` asks the kernel who is at the other end of a pooled
/// connection (one `getpeername` per request) to guard against colliding
/// hashes; a pooled socket's descriptor cannot meanwhile name another
/// socket, so the check is left out, as stoke's own pool leaves it out.
#[derive(Clone)]
pub struct Replica(pub HttpPeer);

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Peer for Replica {
    fn address(&self) -> &pingora::protocols::l4::socket::SocketAddr {
        self.0.address()
    }
    fn tls(&self) -> bool {
        self.0.tls()
    }
    fn sni(&self) -> &str {
        self.0.sni()
    }
    fn reuse_hash(&self) -> u64 {
        self.0.reuse_hash()
    }
    fn get_proxy(&self) -> Option<&Proxy> {
        self.0.get_proxy()
    }
    fn get_peer_options(&self) -> Option<&PeerOptions> {
        self.0.get_peer_options()
    }
    fn get_mut_peer_options(&mut self) -> Option<&mut PeerOptions> {
        self.0.get_mut_peer_options()
    }
    fn matches_fd<V: std::os::fd::AsRawFd>(&self, _fd: V) -> bool {
        true
    }
}

/// The server options both prototypes share with stoke's plain listener.
pub fn server_options() -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    options
}

/// A prototype's `main`: `name LISTEN UPSTREAM`, the app built by `app`
/// for those arguments and served until the process is killed.
pub fn main<A: ServerApp + Send + Sync + 'static>(name: &str, app: impl FnOnce(&Args) -> A) -> std::process::ExitCode {
    let args = match Args::from_env() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(app(&args), args.listen) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serve `app` on `listen` on a runtime of one worker until the process is
/// killed, with stoke's listener settings (no L4 read buffer, an inherited
/// socket handed to pingora's accept loop).
pub fn run<A: ServerApp + Send + Sync + 'static>(app: A, listen: SocketAddr) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let socket = std::net::TcpListener::bind(listen)?;
        // pingora's accept loop takes the socket over as a tokio listener.
        socket.set_nonblocking(true)?;
        let addr = socket.local_addr()?.to_string();
        let mut service = ListeningService::new("engine".to_owned(), app);
        service.add_listener(
            ListenerConfig::tcp(addr.clone()).l4_buffer(L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE)),
        );
        let mut fds = Fds::new();
        fds.add(addr.clone(), socket.into_raw_fd());
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        eprintln!("listening on {addr}");
        service.start_service(Some(Arc::new(Mutex::new(fds))), shutdown, 1).await;
        Ok(())
    })
}
