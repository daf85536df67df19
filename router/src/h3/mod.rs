//! HTTP/3 on the public endpoint: a QUIC listener (quinn) speaking HTTP/3
//! (h3), with the same certificates as the HTTPS listener (SNI, ALPN `h3`).
//!
//! Every request goes through the forwarding engine ([`Engine`]) exactly
//! as HTTP/1.1 and HTTP/2 requests do: the routing core (route, access
//! control, service from header or body, placement, holding, waking), then
//! the chosen replica over the edge's idle HTTP/1.1 connections
//! ([`crate::proxy::idle`]), bodies streamed both ways. Only the translation between
//! HTTP/3 streams and the engine's [`Client`] lives here.
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
use stoke_config::Route;
use tokio::sync::watch;

use crate::drain::Drain;
use crate::error::Reject;
use crate::proxy::engine::{Client, Engine, Framing};
use crate::proxy::headers;
use crate::proxy::listener::Counted;
use crate::proxy::policy::{self, Answer, Forwarded};
use crate::proxy::request::Downstream;
use crate::state::Held;
use crate::tls::{self, CertResolver};

pub mod quic;
pub mod steer;

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

/// Bind the QUIC endpoint (port 0: any free port), or serve it on the
/// socket `inherited` from the process this one upgrades, issuing
/// connection IDs tagged with the process's `generation` ([`steer`]).
/// Must run on the tokio runtime that will serve it.
pub fn bind(
    addr: SocketAddr,
    resolver: Arc<CertResolver>,
    edge: &stoke_config::EdgeSettings,
    inherited: Option<std::net::UdpSocket>,
    generation: u64,
) -> Result<Bound, H3Error> {
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
    let socket = match inherited {
        Some(socket) => socket,
        None => std::net::UdpSocket::bind(addr).map_err(|source| H3Error::Bind { addr, source })?,
    };
    let local = socket.local_addr().map_err(|source| H3Error::Bind { addr, source })?;
    // Kept to be handed to the next process at an upgrade.
    let kept = socket.try_clone().map_err(|source| H3Error::Bind { addr, source })?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let udp = runtime.wrap_udp_socket(socket).map_err(|source| H3Error::Bind { addr, source })?;
    let steered = steer::Steered::new(udp, generation);
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(move || Box::new(steer::GenerationCids::new(generation)));
    let endpoint = quinn::Endpoint::new_with_abstract_socket(config, Some(server), steered.clone(), runtime)
        .map_err(|source| H3Error::Bind { addr, source })?;
    Ok(Bound { endpoint, local, socket: kept, steered })
}

/// A bound HTTP/3 endpoint.
pub struct Bound {
    /// The QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// Its address.
    pub local: SocketAddr,
    /// A duplicate of its UDP socket, to hand to the next process.
    pub socket: std::net::UdpSocket,
    /// Its socket as quinn reads it, steering datagrams across upgrades.
    pub steered: Arc<steer::Steered>,
}

/// Shared by every HTTP/3 connection of an edge.
struct Shared {
    engine: Arc<Engine>,
    /// Client connections open, TCP and QUIC, against `max_connections`.
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// Accept HTTP/3 connections until `shutdown`; then stop accepting, tell
/// every connection to finish (GOAWAY), and close the endpoint once the
/// caller's drain is over (it aborts this task).
pub async fn serve(
    endpoint: quinn::Endpoint,
    engine: Arc<Engine>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    mut shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared { engine, connections });
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let Some(incoming) = incoming else { break };
        let max = shared.engine.router().live().snapshot.network.edge.max_connections;
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
    let edge = shared.engine.router().live().snapshot.network.edge.clone();
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
    if draining {
        refuse_late_requests(&conn).await;
    }
    drop(h3c);
}

/// After GOAWAY, how long a connection whose requests are done stays open
/// for requests the client sent before it saw the GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// `H3_REQUEST_REJECTED` (RFC 9114 §8.1): not processed, safe to retry.
const H3_REQUEST_REJECTED: u32 = 0x10b;

/// Refuse, with `H3_REQUEST_REJECTED`, the requests a client opens after
/// the GOAWAY (sent before it arrived), until it closes the connection or
/// the grace time passes: a client sends those again on a new connection,
/// where a closed connection would leave it not knowing their fate.
async fn refuse_late_requests(conn: &quinn::Connection) {
    let grace = tokio::time::sleep(GOAWAY_GRACE);
    tokio::pin!(grace);
    let code = quinn::VarInt::from_u32(H3_REQUEST_REJECTED);
    loop {
        tokio::select! {
            _ = &mut grace => return,
            _ = conn.closed() => return,
            opened = conn.accept_bi() => match opened {
                Ok((mut send, mut recv)) => {
                    let _ = send.reset(code);
                    let _ = recv.stop(code);
                }
                Err(_) => return,
            },
        }
    }
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

/// An HTTP/3 request as the routing core and the engine see it.
struct H3Client<'a> {
    req: &'a http::Request<()>,
    tx: SendHalf,
    rx: RecvHalf,
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

impl H3Client<'_> {
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
impl Downstream for H3Client<'_> {
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

/// One HTTP/3 request, from headers to the last byte of the answer,
/// through the forwarding engine.
async fn handle(
    req: http::Request<()>,
    stream: RequestStream<quic::BidiStream<Bytes>, Bytes>,
    conn: quinn::Connection,
    mut stopped: quic::Stopped,
    shared: Arc<Shared>,
) {
    let (tx, rx) = stream.split();
    let mut client = H3Client {
        req: &req,
        tx,
        rx,
        conn: &conn,
        stopped: &mut stopped,
        read_ahead: BytesMut::new(),
        body_done: false,
        watch_limit: HELD_READ_AHEAD,
        held: shared.engine.router().bodies.account(),
    };
    shared.engine.serve(&mut client).await;
}

impl Client for H3Client<'_> {
    fn protocol(&self) -> &'static str {
        "HTTP/3"
    }

    fn over_tls(&self) -> bool {
        true
    }

    fn head_size(&self) -> (usize, usize) {
        let bytes = policy::head_size(
            self.req.uri().path_and_query().map_or("", |p| p.as_str()),
            self.req.uri().authority().map(|a| a.as_str()),
            self.req.headers(),
        );
        (self.req.headers().len(), bytes)
    }

    async fn body_start(&mut self) -> Result<(Option<Bytes>, bool), Reject> {
        // HTTP/3 gives no sign on the headers that a body comes: without a
        // length, wait a moment for its first bytes or its end.
        let has_length = self.req.headers().contains_key(http::header::CONTENT_LENGTH);
        if !has_length && !self.body_done && self.read_ahead.is_empty() {
            match tokio::time::timeout(BODY_PEEK, self.rx.recv_data()).await {
                Ok(Ok(None)) => self.body_done = true,
                Ok(Ok(Some(mut b))) => self.read_ahead.extend_from_slice(&b.copy_to_bytes(b.remaining())),
                Ok(Err(_)) => return Err(Reject::client_gone()),
                Err(_) => {}
            }
        }
        let held = (!self.read_ahead.is_empty()).then(|| self.read_ahead.split().freeze());
        Ok((held, !self.body_done))
    }

    async fn body_chunk(&mut self) -> Result<Option<Bytes>, Reject> {
        match self.rx.recv_data().await {
            Ok(Some(mut chunk)) => Ok(Some(chunk.copy_to_bytes(chunk.remaining()))),
            Ok(None) => {
                self.body_done = true;
                Ok(None)
            }
            // The client reset its upload: abandon the upstream request.
            Err(_) => Err(Reject::client_gone()),
        }
    }

    fn upstream_head(
        &self,
        request_id: &policy::RequestId,
        route: Option<&Route>,
        body: Framing,
    ) -> Result<http::request::Parts, Reject> {
        upstream_head(self.req, self.conn, request_id, route, body)
    }

    async fn send_head(&mut self, head: http::response::Parts) -> bool {
        let mut resp = Response::new(());
        *resp.status_mut() = head.status;
        copy_headers(&head.headers, resp.headers_mut());
        self.tx.send_response(resp).await.is_ok()
    }

    async fn send_body(&mut self, chunk: Bytes) -> bool {
        // send_data is not cancel-safe: the engine never races it.
        self.tx.send_data(chunk).await.is_ok()
    }

    async fn finish(&mut self) {
        let _ = self.tx.finish().await;
    }

    async fn abort(&mut self) {
        // The client sees the stream reset.
        self.tx.stop_stream(Code::H3_INTERNAL_ERROR);
    }

    async fn closed(&mut self) {
        self.conn.closed().await;
    }

    async fn answer(&mut self, answer: Answer) {
        let mut resp = Response::builder().status(answer.status);
        if let Some(h) = resp.headers_mut() {
            h.extend(answer.headers);
        }
        let Ok(resp) = resp.body(()) else { return };
        if self.tx.send_response(resp).await.is_ok() && self.tx.send_data(answer.body).await.is_ok() {
            let _ = self.tx.finish().await;
        }
    }
}

/// The HTTP/1.1 request head for the replica.
fn upstream_head(
    req: &http::Request<()>,
    conn: &quinn::Connection,
    request_id: &policy::RequestId,
    route: Option<&Route>,
    body: Framing,
) -> Result<http::request::Parts, Reject> {
    let whole_body = match body {
        Framing::Whole(len) => Some(len),
        Framing::Streamed | Framing::Empty => None,
    };
    let streamed = body == Framing::Streamed;
    let has_length = req.headers().contains_key(http::header::CONTENT_LENGTH);
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let path =
        route.and_then(|r| headers::forward_path(pq, &r.path_prefix, r.strip_prefix)).unwrap_or_else(|| pq.to_owned());
    let bad =
        |e: &dyn std::fmt::Display| Reject::client(400, "bad_request", format!("cannot forward this request: {e}"));
    let uri = http::Uri::try_from(path).map_err(|e| bad(&e))?;
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = req.method().clone();
    head.uri = uri;
    head.headers.reserve(req.headers().len() + 6);
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
                head.headers.append(name.clone(), value.clone());
            }
        }
    }
    if !cookies.is_empty() {
        let cookie = HeaderValue::from_str(&cookies.join("; ")).map_err(|e| bad(&e))?;
        head.headers.insert(http::header::COOKIE, cookie);
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    if let Some(authority) = authority {
        head.headers.insert(http::header::HOST, HeaderValue::from_str(authority).map_err(|e| bad(&e))?);
    }
    let forwarded =
        Forwarded { host: authority, client: Some(conn.remote_address().ip().to_canonical()), tls: true, request_id };
    forwarded.apply(|name, value| {
        head.headers.insert(http::HeaderName::from_static(name), value);
        Ok::<_, Reject>(())
    })?;
    match whole_body {
        Some(len) => {
            head.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        None if streamed && !has_length => {
            head.headers.insert(http::header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
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

/// The `Alt-Svc` value advertising HTTP/3 on `port`.
pub fn alt_svc(port: u16) -> String {
    format!("h3=\":{port}\"; ma=86400")
}
