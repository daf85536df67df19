//! A minimal forwarder with a loop of its own on pingora-core (see
//! `stoke_benches::engine`).
//!
//! It is a `ServerApp`, not an `HttpServerApp`: pingora-core's blanket
//! `ServerApp` for an `HttpServerApp` moves each HTTP/1.1 session into a
//! boxed future of its own, request after request (a measured 12k
//! instructions of `memcpy` per request). Here the keep-alive loop runs in
//! the connection's own future and the session stays where it is; HTTP/2
//! connections (h2c by prior knowledge, or ALPN) go to pingora's HTTP/2
//! accept loop, which spawns a task per stream anyway.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::Peer as _;
use stoke_benches::engine::{self, Replica};
use stoke_router::proxy::listener::speaks_h2;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long a new connection may stay silent.
const HEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Keep-alive timeout of a downstream HTTP/1.1 connection, in seconds.
const KEEPALIVE_SECS: u64 = 60;

struct Forward {
    upstream: SocketAddr,
    connector: Connector,
}

impl Forward {
    /// Forward one request; `Err` if the session cannot be reused.
    async fn forward(&self, session: &mut ServerSession) -> pingora::Result<()> {
        let peer = Replica(engine::peer(self.upstream));
        let (mut up, _reused) = match self.connector.get_http_session(&peer).await {
            Ok(s) => s,
            Err(e) => {
                session.respond_error(502).await?;
                return Err(e);
            }
        };
        let mut head = Box::new(session.req_header().clone());
        // An h2c request goes to the replica as HTTP/1.1, its authority as Host.
        head.set_version(http::Version::HTTP_11);
        if head.headers.get(http::header::HOST).is_none() {
            if let Some(host) = head.uri.authority().and_then(|a| http::HeaderValue::from_str(a.as_str()).ok()) {
                head.insert_header(http::header::HOST, host)?;
            }
        }
        up.write_request_header(head).await?;
        while let Some(chunk) = session.read_request_body().await? {
            up.write_request_body(chunk, false).await?;
        }
        up.finish_request_body().await?;
        up.read_response_header().await?;
        let head = up.response_header().cloned().unwrap_or_else(|| ServerSession::generate_error(502));
        session.write_response_header(Box::new(head)).await?;
        while let Some(chunk) = up.read_response_body().await? {
            session.write_response_body(chunk, false).await?;
        }
        if up.response_done() {
            self.connector.release_http_session(up, &peer, peer.idle_timeout()).await;
        } else {
            up.shutdown().await;
        }
        Ok(())
    }

    /// Serve one HTTP/1.1 connection, request after request.
    async fn serve_h1(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let mut session = ServerSession::new_http1(stream);
        loop {
            session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE_SECS));
            if !matches!(session.read_request().await, Ok(true)) {
                return;
            }
            if let Err(e) = self.forward(&mut session).await {
                eprintln!("engine-loop: {e}");
                return;
            }
            let Ok(Some(reusable)) = session.finish().await else { return };
            let (stream, pipelined) = reusable.into_parts();
            session = ServerSession::new_http1(stream);
            if let Some(prefix) = pipelined {
                session.set_pipelined_prefix(prefix);
            }
        }
    }
}

/// HTTP/2 streams, one task each, from pingora's HTTP/2 accept loop.
struct Streams {
    forward: Arc<Forward>,
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
        if !session.read_request().await.ok()? {
            return None;
        }
        if let Err(e) = self.forward.forward(&mut session).await {
            eprintln!("engine-loop: {e}");
            return None;
        }
        let _ = session.finish().await;
        None
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }
}

struct Connections {
    forward: Arc<Forward>,
    h2: Arc<Streams>,
}

#[async_trait]
impl ServerApp for Connections {
    async fn process_new(self: &Arc<Self>, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // stoke's own test: ALPN, or the h2c preface.
        if speaks_h2(&mut stream, HEADER_WAIT).await? {
            // pingora's blanket `ServerApp` sees the same preface again and
            // runs its HTTP/2 accept loop.
            return self.h2.process_new(stream, shutdown).await;
        }
        self.forward.serve_h1(stream, shutdown).await;
        None
    }
}

fn main() -> ExitCode {
    engine::main("engine-loop", |args| {
        let connector = Connector::new(Some(ConnectorOptions::new(engine::UPSTREAM_POOL)));
        let forward = Arc::new(Forward { upstream: args.upstream, connector });
        let h2 = Arc::new(Streams { forward: forward.clone(), options: engine::server_options() });
        Connections { forward, h2 }
    })
}
