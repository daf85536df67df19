//! HTTP/3 on the public endpoint: a QUIC listener (quinn) speaking HTTP/3
//! (h3), with the same certificates as the HTTPS listener (SNI, ALPN `h3`).
//!
//! Every request goes through the routing core ([`request::decide`]: route,
//! access control, service from header or body, placement, holding, waking)
//! exactly as HTTP/1.1 and HTTP/2 requests do, and is forwarded to the
//! chosen replica over pooled HTTP/1.1 connections (pingora's connector),
//! bodies streamed both ways. Only the translation between HTTP/3 streams
//! and HTTP/1.1 upstream sessions lives here.
//!
//! A client that closes its connection, resets its request body or stops
//! reading the response (STOP_SENDING) ends the upstream request and frees
//! its slot, also while the request is held: the QUIC layer under h3 is the
//! edge's own ([`quic`]) so that STOP_SENDING is seen before any write.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use h3::error::Code;
use h3::server::RequestStream;
use http::{HeaderMap, HeaderValue, Response};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::Peer as _;
use tokio::sync::watch;

use crate::drain::Drain;
use crate::error::Reject;
use crate::proxy::headers;
use crate::proxy::keepalive::{self, HeldStream, KeptAlive, Step};
use crate::proxy::listener::Counted;
use crate::proxy::policy::{self, BodyCount, Forwarded, Served};
use crate::proxy::request::{self, Downstream, Outcome, Trace, Verdict};
use crate::proxy::upstream::{self, Sent, TryError};
use crate::state::{Held, Live, Router};
use crate::tls::{self, CertResolver};

pub mod quic;

type SendHalf = RequestStream<quic::SendStream<Bytes>, Bytes>;
type RecvHalf = RequestStream<quic::RecvStream, Bytes>;

/// Fields that are per-connection in HTTP/1.1 and forbidden in HTTP/3
/// (RFC 9114 §4.2): never carried across.
const CONNECTION_SPECIFIC: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"];

/// How long to wait for a body's first bytes when a request has neither
/// `Content-Length` nor a visible end (HTTP/3 does not mark a request
/// without body on its headers): a GET's end arrives with its headers.
pub const BODY_PEEK: Duration = Duration::from_millis(20);

/// How much of a held request's body is read ahead while it waits, so that
/// a stream reset shows at once.
pub const HELD_READ_AHEAD: u64 = 1 << 20;

/// Why the HTTP/3 listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum H3Error {
    /// The TLS settings cannot serve QUIC.
    #[error("HTTP/3 TLS setup: {0}")]
    Tls(String),
    /// The UDP socket cannot be bound.
    #[error("cannot listen on {addr} (h3, UDP): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Bind the QUIC endpoint (port 0: any free port). Must run on the tokio
/// runtime that will serve it.
pub fn bind(
    addr: SocketAddr,
    resolver: Arc<CertResolver>,
    edge: &stoke_config::EdgeSettings,
) -> Result<(quinn::Endpoint, SocketAddr), H3Error> {
    let tls = tls::server_config(resolver, &[b"h3"]).map_err(|e| H3Error::Tls(e.to_string()))?;
    // quinn checks only the initial cipher suite here and unwraps the rest
    // per connection: check it all once, now.
    rustls::quic::ServerConnection::new(tls.clone(), rustls::quic::Version::V1, Vec::new())
        .map_err(|e| H3Error::Tls(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| H3Error::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(edge.h3_idle_timeout).map_err(|e| H3Error::Tls(e.to_string()))?;
    transport
        .max_idle_timeout(Some(idle))
        // Pings keep a connection whose request is held (a pool waking)
        // from idling out; idle connections are closed by the server below.
        .keep_alive_interval(Some(edge.h3_idle_timeout / 3))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(edge.h3_max_streams))
        // Control and two QPACK streams each way, with room to spare.
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    server.transport_config(Arc::new(transport));
    let socket = std::net::UdpSocket::bind(addr).map_err(|source| H3Error::Bind { addr, source })?;
    let local = socket.local_addr().map_err(|source| H3Error::Bind { addr, source })?;
    let endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, Arc::new(quinn::TokioRuntime))
            .map_err(|source| H3Error::Bind { addr, source })?;
    Ok((endpoint, local))
}

/// Shared by every HTTP/3 connection of an edge.
struct Shared {
    router: Arc<Router>,
    connector: Connector,
    drain: Drain,
    /// `Alt-Svc` on every answer (HTTP/3 is HTTPS).
    alt_svc: Option<HeaderValue>,
    /// Client connections open, TCP and QUIC, against `max_connections`.
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// Accept HTTP/3 connections until `shutdown`; then stop accepting, tell
/// every connection to finish (GOAWAY), and close the endpoint once the
/// caller's drain is over (it aborts this task).
pub async fn serve(
    endpoint: quinn::Endpoint,
    router: Arc<Router>,
    drain: Drain,
    alt_svc: Option<String>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let options = pingora::connectors::ConnectorOptions::new(crate::proxy::listener::UPSTREAM_KEEPALIVE_POOL);
    let alt_svc = alt_svc.and_then(|v| HeaderValue::from_str(&v).ok());
    let shared = Arc::new(Shared { router, connector: Connector::new(Some(options)), drain, alt_svc, connections });
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let Some(incoming) = incoming else { break };
        let max = shared.router.live().snapshot.network.edge.max_connections;
        let Some(counted) = Counted::take(&shared.connections, max) else {
            metrics::counter!(crate::metrics::CONNECTIONS_REFUSED_TOTAL).increment(1);
            tracing::debug!(max, "QUIC connection refused: max_connections reached");
            incoming.refuse();
            continue;
        };
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _counted = counted;
            match incoming.await {
                Ok(conn) => serve_connection(conn, shared, shutdown).await,
                Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
            }
        });
    }
    // No new connections; existing ones got GOAWAY from their own loops.
    endpoint.set_server_config(None);
}

async fn serve_connection(conn: quinn::Connection, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let edge = shared.router.live().snapshot.network.edge.clone();
    // The field section size HTTP/3 advertises (and enforces itself) is
    // twice the edge's header limit, plus QPACK's 32 bytes of overhead per
    // field: a request somewhat over the limit still arrives, so that the
    // edge's own rule answers it (431, the same message as on every
    // protocol) rather than a bare stream error.
    let max_header = (2 * edge.max_header_bytes + 32 * (edge.max_headers + 8)) as u64;
    let idle_after = edge.h3_idle_timeout;
    let stops = Arc::new(quic::Stops::default());
    let mut h3c: h3::server::Connection<quic::Connection, Bytes> = match h3::server::builder()
        .max_field_section_size(max_header)
        .build(quic::Connection::new(conn.clone(), stops.clone()))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/3 setup failed");
            return;
        }
    };
    let active = Drain::default();
    let mut draining = false;
    let mut last_request = Instant::now();
    loop {
        // A connection with no request for the idle timeout is closed (the
        // server's keep-alive pings would otherwise keep it forever).
        let idle_deadline = tokio::time::Instant::from(last_request + idle_after);
        tokio::select! {
            accepted = h3c.accept() => match accepted {
                Ok(Some(resolver)) => {
                    last_request = Instant::now();
                    let (shared, conn, guard, stops) = (shared.clone(), conn.clone(), active.guard(), stops.clone());
                    tokio::spawn(async move {
                        let _guard = guard;
                        match resolver.resolve_request().await {
                            Ok((req, stream)) => {
                                let stopped = stops.take(stream.send_id().into_inner());
                                handle(req, stream, conn, stopped, shared).await
                            }
                            Err(e) => tracing::debug!(error = %e, "malformed HTTP/3 request"),
                        }
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    if !is_normal_close(&e) {
                        tracing::debug!(error = %e, "HTTP/3 connection error");
                    }
                    break;
                }
            },
            _ = stopping(&mut shutdown), if !draining => {
                draining = true;
                let _ = h3c.shutdown(0).await;
            }
            _ = tokio::time::sleep_until(idle_deadline), if active.active() == 0 && !draining => {
                draining = true;
                let _ = h3c.shutdown(0).await;
            }
        }
    }
    // Keep the connection until its requests end (dropping it closes at once).
    let _ = active.wait(Duration::from_secs(3600)).await;
}

/// Resolves once `shutdown` turns true (without holding its lock after).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn is_normal_close(e: &h3::error::ConnectionError) -> bool {
    use h3::error::ConnectionError as E;
    use h3::quic::ConnectionErrorIncoming as I;
    // Some clients (aioquic) close with application code 0; idle timeouts
    // are a normal end too.
    e.is_h3_no_error()
        || matches!(e, E::Timeout { .. })
        || matches!(e, E::Remote { 0: I::ApplicationClose { error_code: 0 } | I::Timeout, .. })
}

/// An HTTP/3 request as the routing core sees it.
struct H3Downstream<'a> {
    req: &'a http::Request<()>,
    rx: &'a mut RecvHalf,
    conn: &'a quinn::Connection,
    /// Body bytes read ahead (to find the service, or to see if any come).
    read_ahead: BytesMut,
    /// The client's end of the body has been seen.
    body_done: bool,
    /// How much of the body may be read ahead while the request is held.
    watch_limit: u64,
    /// What `read_ahead` holds of the edge's body budget.
    held: Held,
    /// Resolves when the client stops reading the response (STOP_SENDING).
    stopped: &'a mut quic::Stopped,
}

impl H3Downstream<'_> {
    /// Read the rest of the body into `read_ahead`, at most `limit` bytes.
    async fn read_all(&mut self, limit: u64) -> Result<(), Reject> {
        while !self.body_done {
            match self.rx.recv_data().await {
                Ok(Some(mut chunk)) => {
                    let n = (self.read_ahead.len() + chunk.remaining()) as u64;
                    if n > limit {
                        return Err(policy::read_too_large(n, limit));
                    }
                    self.held.grow(chunk.remaining()).map_err(policy::bodies_exhausted)?;
                    self.read_ahead.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
                }
                Ok(None) => self.body_done = true,
                Err(_) => return Err(Reject::client_gone()),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Downstream for H3Downstream<'_> {
    fn host(&self) -> &str {
        self.req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| self.req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("")
    }

    fn path(&self) -> &str {
        self.req.uri().path()
    }

    fn method(&self) -> &str {
        self.req.method().as_str()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.req.headers().get(name).map(|v| v.as_bytes())
    }

    fn client_ip(&self) -> Option<std::net::IpAddr> {
        Some(self.conn.remote_address().ip().to_canonical())
    }

    async fn read_body(&mut self, limit: u64) -> Result<Bytes, Reject> {
        self.read_all(limit).await?;
        Ok(self.read_ahead.split().freeze())
    }

    async fn gone(&mut self) {
        // A body still coming is read ahead (it goes upstream later as it
        // is): a client that resets its stream shows as an error there.
        // STOP_SENDING and the connection's end show whether or not the
        // body is done.
        while !self.body_done && (self.read_ahead.len() as u64) < self.watch_limit {
            tokio::select! {
                chunk = self.rx.recv_data() => match chunk {
                    Ok(Some(mut chunk)) => {
                        // The chunk is the client's either way; past the budget
                        // nothing more is read ahead (one chunk over it at most),
                        // and only the connection is watched.
                        let room = self.held.grow(chunk.remaining()).is_ok();
                        self.read_ahead.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
                        if !room {
                            break;
                        }
                    }
                    Ok(None) => self.body_done = true,
                    Err(_) => return,
                },
                _ = self.conn.closed() => return,
                _ = &mut *self.stopped => return,
            }
        }
        tokio::select! {
            _ = self.conn.closed() => {}
            _ = &mut *self.stopped => {}
        }
    }
}

/// One HTTP/3 request, from headers to the last byte of the answer.
async fn handle(
    req: http::Request<()>,
    stream: RequestStream<quic::BidiStream<Bytes>, Bytes>,
    conn: quinn::Connection,
    mut stopped: quic::Stopped,
    shared: Arc<Shared>,
) {
    let _in_progress = shared.drain.guard();
    let started = Instant::now();
    let (mut tx, mut rx) = stream.split();
    let request_id = policy::request_id(req.headers().get(headers::REQUEST_ID).map(|v| v.as_bytes()));
    let live = shared.router.live();
    let mut trace = Trace::default();
    let mut outcome =
        Ended { status: 0, bytes: 0, pool: None, replica: None, waited: Duration::ZERO, error: None, affinity: None };

    let result = async {
        let bytes = policy::head_size(
            req.uri().path_and_query().map_or("", |p| p.as_str()),
            req.uri().authority().map(|a| a.as_str()),
            req.headers(),
        );
        policy::check_head(&live.snapshot.network.edge, req.headers().len(), bytes)?;
        let mut down = H3Downstream {
            req: &req,
            rx: &mut rx,
            conn: &conn,
            stopped: &mut stopped,
            read_ahead: BytesMut::new(),
            body_done: false,
            watch_limit: HELD_READ_AHEAD,
            held: shared.router.bodies.account(),
        };
        let routed = match request::decide(&shared.router, &live, &mut down, started, &mut trace).await? {
            Verdict::Forward(routed) => routed,
            Verdict::Answer(json) => return Err(Reject::answer(json)),
            Verdict::HoldStream(held) => {
                let stream = HeldH3 { req: &req, conn: &conn, shared: &shared, live: &live, request_id: &request_id };
                return stream.serve(&mut tx, held, started, &trace, &mut outcome).await;
            }
        };
        let (read_ahead, body_done, _held) = (down.read_ahead, down.body_done, down.held);
        outcome.pool = Some(routed.admitted.pool);
        outcome.waited = routed.admitted.waited;
        forward(
            &req,
            &mut tx,
            &mut rx,
            &conn,
            &shared,
            &live,
            &request_id,
            routed,
            read_ahead,
            body_done,
            &mut trace,
            &mut outcome,
            started,
        )
        .await
    }
    .await;
    if let Err(reject) = result {
        outcome.status = reject.status;
        if !reject.is_client_gone() {
            respond(&mut tx, &live, &request_id, &reject, shared.alt_svc.as_ref()).await;
        }
        if reject.status >= 400 {
            outcome.error = Some(reject.to_string());
        }
    }
    let error = outcome.error.as_ref().map(|e| e as &dyn std::fmt::Display);
    request::record(
        Some(&live),
        &Outcome {
            request_id: &request_id,
            protocol: "HTTP/3",
            method: req.method().as_str(),
            path: req.uri().path(),
            trace,
            pool: outcome.pool,
            replica: outcome.replica.as_deref(),
            status: outcome.status,
            bytes: outcome.bytes,
            elapsed: started.elapsed(),
            waited: outcome.waited,
            error,
            affinity: outcome.affinity,
        },
    );
}

/// What a request came to, for the log.
struct Ended {
    status: u16,
    bytes: usize,
    pool: Option<stoke_config::PoolId>,
    replica: Option<String>,
    waited: Duration,
    error: Option<String>,
    affinity: Option<crate::core::affinity::Chosen>,
}

/// The request body as it goes upstream.
struct Body<'a> {
    /// Bytes the edge already holds: the whole body (read to find the
    /// model), or what arrived ahead of streaming.
    held: Option<Bytes>,
    /// Whether more is to come from the client.
    streamed: bool,
    rx: &'a mut RecvHalf,
    count: BodyCount,
    /// Whether bytes read from the client went upstream (and are gone).
    sent_from_client: bool,
}

impl Body<'_> {
    /// Whether a try that failed can send the body again: only while every
    /// byte sent so far is one the edge still holds.
    fn replayable(&self) -> bool {
        !self.sent_from_client
    }

    /// A failure on the replica's side, as the retry policy sees it.
    fn failed(&self, error: pingora::BError) -> TryError {
        TryError::Upstream { error, replayable: self.replayable() }
    }
}

/// Send the request to its replica, retrying elsewhere (or on a fresh
/// connection) while the policy allows, and stream the answer back.
#[allow(clippy::too_many_arguments)]
async fn forward(
    req: &http::Request<()>,
    tx: &mut SendHalf,
    rx: &mut RecvHalf,
    conn: &quinn::Connection,
    shared: &Shared,
    live: &Arc<Live>,
    request_id: &str,
    routed: request::Routed,
    mut read_ahead: BytesMut,
    mut body_done: bool,
    trace: &mut Trace,
    outcome: &mut Ended,
    started: Instant,
) -> Result<(), Reject> {
    let net = &live.snapshot.network;
    let route = trace.route.map(|r| net.route(r));
    let slot = routed.admitted.slot;
    let pool = routed.admitted.pool;
    // The body the route read to find the service goes as it is; otherwise
    // see whether a body comes at all (HTTP/3 gives no sign on the headers).
    let whole_body = routed.body;
    let has_length = req.headers().contains_key(http::header::CONTENT_LENGTH);
    if whole_body.is_none() && !has_length && !body_done {
        match tokio::time::timeout(BODY_PEEK, rx.recv_data()).await {
            Ok(Ok(None)) => body_done = true,
            Ok(Ok(Some(mut b))) => read_ahead.extend_from_slice(&b.copy_to_bytes(b.remaining())),
            Ok(Err(_)) => return Err(Reject::client_gone()),
            Err(_) => {}
        }
    }
    let streamed = whole_body.is_none() && !(body_done && read_ahead.is_empty());
    let head = upstream_head(req, conn, request_id, route, whole_body.as_ref().map(Bytes::len), has_length, streamed)?;
    let held = whole_body.or_else(|| (!read_ahead.is_empty()).then(|| read_ahead.freeze()));
    let mut body = Body {
        held,
        // A body that arrived whole with the request needs no streaming.
        streamed: streamed && !body_done,
        rx,
        count: BodyCount::new(trace.max_body.unwrap_or(u64::MAX)),
        sent_from_client: false,
    };
    if let Some(held) = &body.held {
        body.count.add(held.len())?;
    }

    let mut attempt = H3Attempt { head: &head, body: &mut body, conn };
    let rehold = route.map(|r| crate::proxy::admit::Rehold { router: &shared.router, started, max_wait: r.max_wait });
    let sent =
        upstream::send_with_retries(&shared.connector, live, trace.service, slot, pool, &mut attempt, rehold.as_ref())
            .await?;
    let Sent { mut session, peer, slot, pool } = sent;
    outcome.pool = Some(pool);
    outcome.replica = Some(slot.replica().addr_text.to_string());
    outcome.affinity = slot.has_affinity().then(|| slot.chosen());
    let Some(upstream_head) = session.response_header() else {
        return Err(Reject::bad_gateway("the replica sent no response head"));
    };
    let mut resp = Response::builder().status(upstream_head.status);
    if let Some(h) = resp.headers_mut() {
        copy_headers(&upstream_head.headers, h);
        h.insert(headers::REQUEST_ID, policy::value(request_id));
        if let Some(alt) = policy::alt_svc(true, shared.alt_svc.as_ref()) {
            h.insert(http::header::ALT_SVC, alt.clone());
        }
        let served = Served { pool: Some(pool), replica: Some(&slot.replica().addr_text), waited: outcome.waited };
        let _ = policy::debug_headers(live, served, |name, value| {
            h.insert(name, value);
            Ok::<_, ()>(())
        });
    }
    outcome.status = upstream_head.status.as_u16();
    let resp = resp.body(()).map_err(|e| Reject::bad_gateway(e.to_string()))?;
    if tx.send_response(resp).await.is_err() {
        session.shutdown().await;
        return Err(Reject::client_gone());
    }

    // The answer's body, streamed; a client that stops reading ends it.
    match stream_answer(tx, &mut session, conn, outcome).await {
        Streamed::Done => {
            let _ = tx.finish().await;
            release(shared, session, &peer).await;
        }
        Streamed::ClientGone(why) => {
            session.shutdown().await;
            outcome.error = Some(why.into());
        }
        Streamed::ReplicaFailed(e) => {
            // The replica failed mid-answer: the client sees the stream reset.
            session.shutdown().await;
            tx.stop_stream(Code::H3_INTERNAL_ERROR);
            outcome.error = Some(format!("replica failed mid-response: {}", e.etype().as_str()));
        }
    }
    drop(slot);
    Ok(())
}

/// One try of an HTTP/3 request at a replica.
struct H3Attempt<'r, 'b> {
    head: &'r RequestHeader,
    body: &'r mut Body<'b>,
    conn: &'r quinn::Connection,
}

impl upstream::Attempt for H3Attempt<'_, '_> {
    fn attempt<'a>(
        &'a mut self,
        session: &'a mut HttpSession,
        peer: &'a pingora::upstreams::peer::HttpPeer,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), TryError>> + Send + 'a>> {
        Box::pin(send(session, self.head, self.body, self.conn, peer))
    }
}

/// One try: the request head and body to the replica, then its answer's
/// head (skipping 1xx), watching for the client leaving.
async fn send(
    session: &mut HttpSession,
    head: &RequestHeader,
    body: &mut Body<'_>,
    conn: &quinn::Connection,
    peer: &pingora::upstreams::peer::HttpPeer,
) -> Result<(), TryError> {
    session.set_read_timeout(peer.options.read_timeout);
    session.set_write_timeout(peer.options.write_timeout);
    session.write_request_header(Box::new(head.clone())).await.map_err(|e| body.failed(e))?;
    if let Some(held) = &body.held {
        session.write_request_body(held.clone(), !body.streamed).await.map_err(|e| body.failed(e))?;
    }
    while body.streamed {
        match body.rx.recv_data().await {
            Ok(Some(mut chunk)) => {
                body.count.add(chunk.remaining()).map_err(TryError::Answer)?;
                body.sent_from_client = true;
                session
                    .write_request_body(chunk.copy_to_bytes(chunk.remaining()), false)
                    .await
                    .map_err(|e| body.failed(e))?;
            }
            Ok(None) => {
                body.streamed = false;
            }
            // The client reset its upload: abandon the upstream request.
            Err(_) => return Err(TryError::Answer(Reject::client_gone())),
        }
    }
    session.finish_request_body().await.map_err(|e| body.failed(e))?;
    let forwarded_at = Instant::now();
    loop {
        tokio::select! {
            r = session.read_response_header() => r.map_err(|e| body.failed(e))?,
            _ = conn.closed() => return Err(TryError::Answer(Reject::client_gone())),
        }
        if !session.response_header().is_some_and(|h| h.status.is_informational()) {
            break;
        }
    }
    request::upstream_ttfb().record(forwarded_at.elapsed().as_secs_f64());
    Ok(())
}

/// A streaming request held with keep-alive comments ([`keepalive`]).
struct HeldH3<'a> {
    req: &'a http::Request<()>,
    conn: &'a quinn::Connection,
    shared: &'a Shared,
    live: &'a Arc<Live>,
    request_id: &'a str,
}

impl HeldH3<'_> {
    /// The SSE head now, a comment every interval, then the replica's
    /// stream, or an error event if the hold or the replica fails. Errs
    /// only before the head is sent.
    async fn serve(
        self,
        tx: &mut SendHalf,
        held: HeldStream,
        started: Instant,
        trace: &Trace,
        outcome: &mut Ended,
    ) -> Result<(), Reject> {
        let mut resp = Response::builder().status(200);
        if let Some(h) = resp.headers_mut() {
            let alt = policy::alt_svc(true, self.shared.alt_svc.as_ref());
            h.extend(keepalive::head(self.request_id, self.live, alt));
        }
        let resp = resp.body(()).map_err(|e| Reject::bad_gateway(e.to_string()))?;
        if tx.send_response(resp).await.is_err() {
            return Err(Reject::client_gone());
        }
        outcome.status = 200;
        let mut kept = KeptAlive::new(&self.shared.router, self.live, &held, started);
        let admitted = loop {
            match kept.next().await {
                Step::Say(line) => {
                    if tx.send_data(line).await.is_err() {
                        // The client left: dropping the hold frees its place.
                        outcome.error = Some("client gone while held".into());
                        return Ok(());
                    }
                }
                Step::Done(admitted) => break admitted,
            }
        };
        drop(kept);
        let admitted = match admitted {
            Ok(a) => a,
            Err(reject) => return end_with_error(tx, outcome, reject).await,
        };
        outcome.pool = Some(admitted.pool);
        outcome.waited = admitted.waited;
        let route = trace.route.map(|r| self.live.snapshot.network.route(r));
        let head = match upstream_head(self.req, self.conn, self.request_id, route, Some(held.body.len()), true, false)
        {
            Ok(h) => h,
            Err(reject) => return end_with_error(tx, outcome, reject).await,
        };
        let rehold =
            route.map(|r| crate::proxy::admit::Rehold { router: &self.shared.router, started, max_wait: r.max_wait });
        let sent = upstream::send_whole(
            &self.shared.connector,
            self.live,
            trace.service,
            admitted.slot,
            admitted.pool,
            &head,
            &held.body,
            rehold.as_ref(),
        );
        let mut sent = match sent.await {
            Ok(sent) => sent,
            Err(reject) => return end_with_error(tx, outcome, reject).await,
        };
        outcome.pool = Some(sent.pool);
        outcome.replica = Some(sent.slot.replica().addr_text.to_string());
        outcome.affinity = sent.slot.has_affinity().then(|| sent.slot.chosen());
        let status = sent.session.response_header().map_or(502, |h| h.status.as_u16());
        if status != 200 {
            sent.session.shutdown().await;
            return end_with_error(tx, outcome, keepalive::replica_refused(status)).await;
        }
        match stream_answer(tx, &mut sent.session, self.conn, outcome).await {
            Streamed::Done => {
                let _ = tx.finish().await;
                release(self.shared, sent.session, &sent.peer).await;
            }
            Streamed::ClientGone(why) => {
                sent.session.shutdown().await;
                outcome.error = Some(why.into());
            }
            Streamed::ReplicaFailed(e) => {
                sent.session.shutdown().await;
                return end_with_error(tx, outcome, keepalive::replica_failed(&e)).await;
            }
        }
        drop(sent.slot);
        Ok(())
    }
}

/// How streaming a replica's answer body to the client ended.
enum Streamed {
    /// The whole body went.
    Done,
    /// The client left or stopped reading.
    ClientGone(&'static str),
    /// The replica failed mid-answer.
    ReplicaFailed(pingora::BError),
}

/// Stream the answer body from `session` to the client, counting bytes.
async fn stream_answer(
    tx: &mut SendHalf,
    session: &mut HttpSession,
    conn: &quinn::Connection,
    outcome: &mut Ended,
) -> Streamed {
    loop {
        let chunk = tokio::select! {
            r = session.read_response_body() => r,
            _ = conn.closed() => return Streamed::ClientGone("client gone mid-response"),
        };
        match chunk {
            Ok(Some(b)) => {
                outcome.bytes += b.len();
                // send_data is not cancel-safe: never raced.
                if tx.send_data(b).await.is_err() {
                    return Streamed::ClientGone("client stopped reading");
                }
            }
            Ok(None) => return Streamed::Done,
            Err(e) => return Streamed::ReplicaFailed(e),
        }
    }
}

/// Give an upstream session that read its whole answer back to the pool.
async fn release(shared: &Shared, mut session: HttpSession, peer: &pingora::upstreams::peer::HttpPeer) {
    if session.response_done() {
        shared.connector.release_http_session(session, peer, peer.idle_timeout()).await;
    } else {
        session.shutdown().await;
    }
}

/// End a held stream with an SSE error event for `reject`.
async fn end_with_error(tx: &mut SendHalf, outcome: &mut Ended, reject: Reject) -> Result<(), Reject> {
    if tx.send_data(keepalive::error_event(&reject)).await.is_ok() {
        let _ = tx.finish().await;
    }
    outcome.error = Some(reject.to_string());
    Ok(())
}

/// The HTTP/1.1 request head for the replica.
#[allow(clippy::too_many_arguments)]
fn upstream_head(
    req: &http::Request<()>,
    conn: &quinn::Connection,
    request_id: &str,
    route: Option<&stoke_config::Route>,
    whole_body: Option<usize>,
    has_length: bool,
    streamed: bool,
) -> Result<RequestHeader, Reject> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let path =
        route.and_then(|r| headers::forward_path(pq, &r.path_prefix, r.strip_prefix)).unwrap_or_else(|| pq.to_owned());
    let bad = |e: pingora::BError| Reject::client(400, "bad_request", format!("cannot forward this request: {e}"));
    let mut head =
        RequestHeader::build(req.method().clone(), path.as_bytes(), Some(req.headers().len() + 6)).map_err(bad)?;
    let hop = headers::hop_by_hop(req.headers(), true);
    let mut cookies: Vec<&str> = Vec::new();
    for (name, value) in req.headers() {
        if CONNECTION_SPECIFIC.contains(&name.as_str()) || hop.contains(name) {
            continue;
        }
        match name.as_str() {
            // HTTP/3 may split cookies; HTTP/1.1 wants one field (RFC 9114 §4.2.1).
            "cookie" => cookies.extend(value.to_str().ok()),
            "content-length" if whole_body.is_some() => {}
            _ => {
                head.append_header(name.clone(), value.clone()).map_err(bad)?;
            }
        }
    }
    if !cookies.is_empty() {
        head.insert_header(http::header::COOKIE, cookies.join("; ")).map_err(bad)?;
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    if let Some(authority) = authority {
        head.insert_header(http::header::HOST, authority).map_err(bad)?;
    }
    let forwarded =
        Forwarded { host: authority, client: Some(conn.remote_address().ip().to_canonical()), tls: true, request_id };
    forwarded.apply(|name, value| head.insert_header(name, value)).map_err(bad)?;
    match whole_body {
        Some(len) => head.insert_header(http::header::CONTENT_LENGTH, len.to_string()).map_err(bad)?,
        None if streamed && !has_length => {
            head.insert_header(http::header::TRANSFER_ENCODING, "chunked").map_err(bad)?
        }
        None => {}
    }
    Ok(head)
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    let hop = headers::hop_by_hop(from, false);
    for (name, value) in from {
        if !CONNECTION_SPECIFIC.contains(&name.as_str()) && !hop.contains(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Send the edge's own answer for `reject`.
async fn respond(tx: &mut SendHalf, live: &Live, request_id: &str, reject: &Reject, alt_svc: Option<&HeaderValue>) {
    let answer = policy::answer(reject, request_id, Some(live), policy::alt_svc(true, alt_svc));
    let mut resp = Response::builder().status(answer.status);
    if let Some(h) = resp.headers_mut() {
        h.extend(answer.headers);
    }
    let Ok(resp) = resp.body(()) else { return };
    if tx.send_response(resp).await.is_ok() && tx.send_data(answer.body).await.is_ok() {
        let _ = tx.finish().await;
    }
}

/// The `Alt-Svc` value advertising HTTP/3 on `port`.
pub fn alt_svc(port: u16) -> String {
    format!("h3=\":{port}\"; ma=86400")
}
