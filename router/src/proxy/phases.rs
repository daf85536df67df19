//! The pingora adapter for HTTP/1.1 and HTTP/2: each phase translates the
//! session into a call to the routing core ([`super::request`]) or the
//! response policy ([`super::policy`]) and back. It holds no policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, EXPECT, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::Digest;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use stoke_config::{PoolId, RouteId, ServiceId};

use super::admit;
use super::headers;
use super::keepalive::{self, HeldStream, KeptAlive, Step};
use super::policy::{self, Attempts, BodyCount, Failure, Forwarded, Served};
use super::request::{self, Downstream, Outcome, Trace, Verdict};
use super::upstream;
use crate::core::affinity::Chosen;
use crate::drain::{Drain, Guard};
use crate::error::Reject;
use crate::state::{Held, Live, Router, Slot};

/// Bytes pingora keeps to replay a request body on a retry.
const RETRY_BUFFER: u64 = 64 * 1024;

/// The most a body buffer starts with, whatever length the request declares.
const INITIAL_BODY_BUFFER: u64 = 16 * 1024;

/// How often the socket of a held HTTP/1.1 request whose body is unread
/// is looked at for the client's leaving.
const GONE_POLL: Duration = Duration::from_millis(100);

/// Linux TCP states (`include/net/tcp_states.h`): the peer sent FIN, and
/// the connection was reset or closed.
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_CLOSE: u8 = 7;

/// The pingora proxy application of one edge.
pub struct EdgeProxy {
    router: Arc<Router>,
    /// Upstream connections for the streams the edge forwards itself.
    connector: pingora::connectors::http::Connector,
    drain: Drain,
    /// `Alt-Svc` for answers over TLS, when HTTP/3 is served.
    alt_svc: Option<http::HeaderValue>,
}

impl EdgeProxy {
    /// How this request's retries wait for a wake: within its route's
    /// `max_wait` from its start.
    fn rehold<'a>(&'a self, ctx: &RequestCtx, live: &Live) -> Option<admit::Rehold<'a>> {
        let max_wait = live.snapshot.network.route(ctx.route?).max_wait;
        Some(admit::Rehold { router: &self.router, started: ctx.started, max_wait })
    }

    /// A proxy over `router`; every request holds a guard of `drain` while
    /// it runs, so that shutdown can wait for it.
    pub fn new(router: Arc<Router>, drain: Drain, alt_svc: Option<String>) -> Self {
        let alt_svc = alt_svc.and_then(|v| http::HeaderValue::from_str(&v).ok());
        let options = pingora::connectors::ConnectorOptions::new(super::listener::UPSTREAM_KEEPALIVE_POOL);
        EdgeProxy { router, connector: pingora::connectors::http::Connector::new(Some(options)), drain, alt_svc }
    }

    /// `Alt-Svc` for an answer on this session (HTTPS only).
    fn alt_svc(&self, session: &Session) -> Option<&http::HeaderValue> {
        policy::alt_svc(over_tls(session), self.alt_svc.as_ref())
    }
}

/// Per-request state, dropped when the request ends (which releases its
/// slot, however the request ended).
pub struct RequestCtx {
    _in_progress: Guard,
    started: Instant,
    live: Option<Arc<Live>>,
    request_id: String,
    route: Option<RouteId>,
    service: Option<ServiceId>,
    /// The whole body, when it was read to find the service.
    body: Option<Bytes>,
    /// What `body` holds of the edge's body budget (given back with the context).
    body_held: Option<Held>,
    /// `Expect: 100-continue` was answered here.
    continued: bool,
    pool: Option<PoolId>,
    slot: Option<Slot>,
    /// The replica of a slot released before the request ended (for the
    /// access log).
    released_replica: Option<Arc<str>>,
    /// Whether the slot in `slot` has been handed to pingora as a peer.
    slot_used: bool,
    attempts: Attempts,
    waited: Duration,
    reject: Option<Reject>,
    status: u16,
    /// When the request was last handed to a replica (for time to first byte).
    forwarded_at: Option<Instant>,
    /// The body streamed upstream, against the route's limit.
    body_count: BodyCount,
    /// How the replica was chosen, on a pool with affinity.
    affinity: Option<Chosen>,
}

impl RequestCtx {
    fn live(&self) -> Result<&Arc<Live>> {
        self.live.as_ref().ok_or_else(|| Error::explain(ErrorType::InternalError, "no snapshot on the request"))
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_progress: self.drain.guard(),
            started: Instant::now(),
            live: None,
            request_id: String::new(),
            route: None,
            service: None,
            body: None,
            body_held: None,
            continued: false,
            pool: None,
            slot: None,
            released_replica: None,
            slot_used: false,
            attempts: Attempts::default(),
            waited: Duration::ZERO,
            reject: None,
            status: 0,
            forwarded_at: None,
            body_count: BodyCount::new(u64::MAX),
            affinity: None,
        }
    }

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // No compression module: responses pass through as the replica sent them.
    }

    async fn early_request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        // Header limits: pingora reads up to 1 MiB and 256 fields; the edge
        // allows what its config says.
        let live = self.router.live();
        let edge = &live.snapshot.network.edge;
        let req = session.req_header();
        let bytes = policy::head_size(
            req.uri.path_and_query().map_or("", |p| p.as_str()),
            req.uri.authority().map(|a| a.as_str()),
            &req.headers,
        );
        if let Err(reject) = policy::check_head(edge, req.headers.len(), bytes) {
            ctx.reject = Some(reject);
        }
        ctx.live = Some(live);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.request_id = policy::request_id(session.get_header(headers::REQUEST_ID).map(|v| v.as_bytes()));
        if let Some(reject) = ctx.reject.take() {
            respond(session, ctx, &reject, self.alt_svc(session).cloned()).await;
            ctx.status = reject.status;
            ctx.reject = Some(reject);
            return Ok(true);
        }
        // The snapshot taken at the first phase serves the whole request.
        let live = ctx.live.take().unwrap_or_else(|| self.router.live());
        let decided = self.decide(session, ctx, &live).await;
        ctx.live = Some(live.clone());
        match decided {
            Ok(None) => Ok(false),
            Ok(Some(held)) => {
                self.hold_stream(session, ctx, &live, held).await;
                Ok(true)
            }
            Err(reject) => {
                respond(session, ctx, &reject, self.alt_svc(session).cloned()).await;
                ctx.status = reject.status;
                ctx.reject = Some(reject);
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        ctx.attempts.start();
        if ctx.slot_used || ctx.slot.is_none() {
            // A retry: the slot of the failed try was released; find another.
            ctx.slot = None;
            let live = ctx.live()?.clone();
            let rehold = self.rehold(ctx, &live);
            match admit::retry(&live, ctx.service, rehold.as_ref()).await {
                Some((pool, slot)) => {
                    ctx.pool = Some(pool);
                    ctx.affinity = chosen(&slot);
                    ctx.slot = Some(slot);
                }
                None => {
                    ctx.reject = Some(Reject::bad_gateway("every replica that could serve this request failed"));
                    return Err(Error::explain(ErrorType::HTTPStatus(502), "no replica left to retry on"));
                }
            }
        }
        ctx.slot_used = true;
        ctx.forwarded_at = Some(Instant::now());
        let (Some(slot), Some(pool)) = (&ctx.slot, ctx.pool) else {
            return Err(Error::explain(ErrorType::InternalError, "no slot"));
        };
        let pool = ctx.live()?.snapshot.network.pool(pool);
        Ok(Box::new(upstream::peer(slot.replica().addr, pool)))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_head(session, ctx, req)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The body was read to find the service; pingora replays only its
        // last part from the retry buffer. Send the whole of it instead, on
        // every try.
        if let Some(full) = &ctx.body {
            if end_of_stream {
                *body = Some(full.clone());
            } else if body.is_some() {
                *body = None;
            }
            return Ok(());
        }
        // A body without a length is counted as it streams.
        if let Some(chunk) = body {
            if let Err(reject) = ctx.body_count.add(chunk.len()) {
                ctx.reject = Some(reject);
                return Err(Error::explain(ErrorType::HTTPStatus(413), "request body over max_body"));
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        for name in headers::hop_by_hop(&resp.headers, false) {
            resp.remove_header(&name);
        }
        ctx.status = resp.status.as_u16();
        if let Some(alt) = self.alt_svc(session) {
            resp.insert_header(http::header::ALT_SVC, alt.clone())?;
        }
        if let Some(at) = ctx.forwarded_at {
            request::upstream_ttfb().record(at.elapsed().as_secs_f64());
        }
        resp.insert_header(headers::REQUEST_ID, ctx.request_id.as_str())?;
        if let Some(live) = &ctx.live {
            let served = Served {
                pool: ctx.pool,
                replica: ctx.slot.as_ref().map(|s| &*s.replica().addr_text),
                waited: ctx.waited,
            };
            policy::debug_headers(live, served, |name, value| resp.insert_header(name, value))?;
        }
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // A pooled connection the replica had already closed (it restarted,
        // or died) fails before any answer: pingora marks such errors
        // "retry if the connection was reused". The replica never took the
        // request, so it may go elsewhere — for any method, as long as its
        // body can be replayed (read whole to route it, or small enough for
        // pingora's retry buffer) and the attempts are not used up.
        let mut e = e.more_context(format!("replica {peer}"));
        if !ctx.attempts.may_retry(Failure::Reused, !session.as_ref().retry_buffer_truncated()) {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing was sent: the replica is down for us until a probe says
        // otherwise, and the request may go elsewhere.
        if let Some(slot) = ctx.slot.take() {
            policy::mark_down(&slot, &e);
        }
        e.set_retry(ctx.attempts.may_retry(Failure::Connect, true));
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let reject = match ctx.reject.take() {
            Some(r) => r,
            None => policy::upstream_failure(e),
        };
        // The replica is done with this request: free its slot before the
        // answer, which may linger over the rest of an unread body.
        if let Some(slot) = ctx.slot.take() {
            ctx.released_replica = Some(slot.replica().addr_text.clone());
        }
        let code = if policy::client_gone(e) {
            0
        } else {
            respond(session, ctx, &reject, self.alt_svc(session).cloned()).await;
            reject.status
        };
        ctx.status = code;
        ctx.reject = Some(reject);
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        // The slot goes first: the request is over for the replica.
        let replica = ctx.slot.take().map(|s| s.replica().addr_text.clone()).or_else(|| ctx.released_replica.take());
        let status = session.response_written().map_or(ctx.status, |r| r.status.as_u16());
        let req = session.req_header();
        let protocol = if session.as_ref().is_http2() { "HTTP/2" } else { "HTTP/1.1" };
        let error = e.map(|e| e as &dyn std::fmt::Display);
        request::record(
            ctx.live.as_deref(),
            &Outcome {
                request_id: &ctx.request_id,
                protocol,
                method: req.method.as_str(),
                path: req.uri.path(),
                trace: Trace { route: ctx.route, service: ctx.service, max_body: None },
                pool: ctx.pool,
                replica: replica.as_deref(),
                status,
                bytes: session.body_bytes_sent(),
                elapsed: ctx.started.elapsed(),
                waited: ctx.waited,
                error,
                affinity: ctx.affinity,
            },
        );
    }

    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        format!("{} request_id={}", session.as_ref().request_summary(), ctx.request_id)
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        Ok(())
    }
}

impl EdgeProxy {
    /// Route, find the service, place and take a slot (the routing core's
    /// [`request::decide`]).
    async fn decide(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        live: &Arc<Live>,
    ) -> Result<Option<HeldStream>, Reject> {
        let mut down = PingoraDownstream { session, continued: false, held: self.router.bodies.account() };
        let mut trace = Trace::default();
        let decided = request::decide(&self.router, live, &mut down, ctx.started, &mut trace).await;
        ctx.continued = down.continued;
        ctx.body_held = Some(down.held);
        ctx.route = trace.route;
        ctx.service = trace.service;
        ctx.body_count = BodyCount::new(trace.max_body.unwrap_or(u64::MAX));
        let routed = match decided? {
            Verdict::Forward(routed) => routed,
            Verdict::Answer(json) => return Err(Reject::answer(json)),
            Verdict::HoldStream(held) => return Ok(Some(held)),
        };
        ctx.body = routed.body;
        ctx.pool = Some(routed.admitted.pool);
        ctx.waited = routed.admitted.waited;
        ctx.affinity = chosen(&routed.admitted.slot);
        ctx.slot = Some(routed.admitted.slot);
        Ok(None)
    }

    /// A streaming request held with keep-alive comments: the SSE head now,
    /// a comment every interval, then the replica's stream on the same
    /// response, or an error event if the hold or the replica fails. The
    /// edge forwards it itself (pingora's proxy cannot follow a response
    /// head already sent).
    async fn hold_stream(&self, session: &mut Session, ctx: &mut RequestCtx, live: &Arc<Live>, held: HeldStream) {
        let alt = self.alt_svc(session).cloned();
        let head = keepalive::head(&ctx.request_id, live, alt.as_ref());
        let Ok(mut resp) = ResponseHeader::build(200, Some(head.len())) else { return };
        for (name, value) in head {
            let _ = resp.insert_header(name, value);
        }
        if session.write_response_header(Box::new(resp), false).await.is_err() {
            ctx.reject = Some(Reject::client_gone());
            return;
        }
        ctx.status = 200;
        let mut kept = KeptAlive::new(&self.router, live, &held, ctx.started);
        let admitted = loop {
            match kept.next().await {
                Step::Say(line) => {
                    if session.write_response_body(Some(line), false).await.is_err() {
                        // The client left: dropping the hold frees its place.
                        ctx.reject = Some(Reject::client_gone());
                        return;
                    }
                }
                Step::Done(admitted) => break admitted,
            }
        };
        drop(kept);
        let admitted = match admitted {
            Ok(a) => a,
            Err(reject) => return end_with_error(session, ctx, reject).await,
        };
        ctx.pool = Some(admitted.pool);
        ctx.waited = admitted.waited;
        let mut req = session.req_header().clone();
        if let Err(e) = upstream_head(session, ctx, &mut req) {
            return end_with_error(session, ctx, Reject::bad_gateway(format!("cannot forward this request: {e}")))
                .await;
        }
        req.remove_header(&http::header::TRANSFER_ENCODING);
        let _ = req.insert_header(CONTENT_LENGTH, held.body.len());
        ctx.forwarded_at = Some(Instant::now());
        let rehold = self.rehold(ctx, live);
        let sent = upstream::send_whole(
            &self.connector,
            live,
            ctx.service,
            admitted.slot,
            admitted.pool,
            &req,
            &held.body,
            rehold.as_ref(),
        );
        let mut sent = match sent.await {
            Ok(sent) => sent,
            Err(reject) => return end_with_error(session, ctx, reject).await,
        };
        request::upstream_ttfb().record(ctx.forwarded_at.map_or(0.0, |t| t.elapsed().as_secs_f64()));
        ctx.pool = Some(sent.pool);
        ctx.released_replica = Some(sent.slot.replica().addr_text.clone());
        ctx.affinity = chosen(&sent.slot);
        ctx.slot = Some(sent.slot);
        let status = sent.session.response_header().map_or(502, |h| h.status.as_u16());
        if status != 200 {
            sent.session.shutdown().await;
            return end_with_error(session, ctx, keepalive::replica_refused(status)).await;
        }
        loop {
            match sent.session.read_response_body().await {
                Ok(Some(chunk)) => {
                    if session.write_response_body(Some(chunk), false).await.is_err() {
                        sent.session.shutdown().await;
                        ctx.reject = Some(Reject::client_gone());
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    sent.session.shutdown().await;
                    return end_with_error(session, ctx, keepalive::replica_failed(&e)).await;
                }
            }
        }
        let _ = session.write_response_body(Some(Bytes::new()), true).await;
        if sent.session.response_done() {
            let idle = sent.peer.options.idle_timeout;
            self.connector.release_http_session(sent.session, &sent.peer, idle).await;
        } else {
            sent.session.shutdown().await;
        }
    }
}

/// A pingora session as the routing core sees it.
struct PingoraDownstream<'a> {
    session: &'a mut Session,
    /// `Expect: 100-continue` was answered while reading the body.
    continued: bool,
    /// What the body read here holds of the edge's body budget.
    held: Held,
}

#[async_trait]
impl Downstream for PingoraDownstream<'_> {
    fn host(&self) -> &str {
        request_host(self.session.req_header()).unwrap_or("")
    }

    fn path(&self) -> &str {
        self.session.req_header().uri.path()
    }

    fn method(&self) -> &str {
        self.session.req_header().method.as_str()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.session.get_header(name).map(|v| v.as_bytes())
    }

    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
    }

    async fn read_body(&mut self, limit: u64) -> Result<Bytes, Reject> {
        read_body(self.session, &mut self.continued, limit, &mut self.held).await
    }

    async fn gone(&mut self) {
        // HTTP/2: a reset stream or a closed connection shows whether or not
        // the body was read. HTTP/1.1 with its body read: the connection's
        // end (or a reset) is the next thing it reads.
        if self.session.is_http2() || self.session.is_body_done() {
            let _ = self.session.as_mut().read_body_or_idle(true).await;
            return;
        }
        // HTTP/1.1 with its body still unread: reading would take the body
        // from the replica, so the socket's state is polled instead — a FIN
        // from the client (CLOSE_WAIT) or a reset (CLOSE) shows there with
        // the body still unread.
        loop {
            tokio::time::sleep(GONE_POLL).await;
            let state = self.session.digest().and_then(|d| d.socket_digest.as_ref()).and_then(|s| s.tcp_info());
            match state {
                Some(info) if info.tcpi_state == TCP_CLOSE_WAIT || info.tcpi_state == TCP_CLOSE => return,
                Some(_) => {}
                // No TCP state to read (not a TCP socket): not watched.
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// Read the whole request body (to find the service in it), at most
/// `limit` bytes, keeping pingora able to send it upstream afterwards.
async fn read_body(session: &mut Session, continued: &mut bool, limit: u64, held: &mut Held) -> Result<Bytes, Reject> {
    let too_large = |n: u64| policy::read_too_large(n, limit);
    let length = match session.get_header(CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| Reject::client(400, "invalid_content_length", "Content-Length is not a number"))?,
        ),
        None => None,
    };
    if let Some(n) = length {
        if n > limit {
            return Err(too_large(n));
        }
    }
    if session.get_header(EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")) {
        session
            .write_continue_response()
            .await
            .map_err(|e| Reject::client(400, "client_gone", format!("could not answer Expect: {e}")))?;
        *continued = true;
    }
    if length.is_none() {
        // No length: the retry buffer must hold the whole body, so it may
        // be at most its size.
        session.as_mut().enable_retry_buffering();
    }
    // Grown as data arrives: a declared length is not allocated up front.
    let mut buf = BytesMut::with_capacity(length.unwrap_or(0).min(limit).min(INITIAL_BODY_BUFFER) as usize);
    loop {
        if let Some(n) = length {
            // The last read goes into the retry buffer, so that pingora has
            // something to replay (which request_body_filter swaps for the
            // whole body).
            if n - buf.len() as u64 <= RETRY_BUFFER {
                session.as_mut().enable_retry_buffering();
            }
        }
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if (buf.len() + chunk.len()) as u64 > limit {
                    return Err(too_large((buf.len() + chunk.len()) as u64));
                }
                held.grow(chunk.len()).map_err(policy::bodies_exhausted)?;
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Reject::client(400, "body_read_failed", format!("reading the request body failed: {e}")))
            }
        }
    }
    if length.is_none() && session.as_ref().retry_buffer_truncated() {
        return Err(Reject::client(
            411,
            "length_required",
            format!("a body sent without Content-Length may be at most {RETRY_BUFFER} bytes when the route takes the model from it; send Content-Length"),
        ));
    }
    Ok(buf.freeze())
}

fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers.get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri.authority().map(|a| a.as_str()))
}

/// How a slot's replica was chosen, on a pool with affinity.
fn chosen(slot: &Slot) -> Option<Chosen> {
    slot.has_affinity().then(|| slot.chosen())
}

/// End a held stream with an SSE error event for `reject`.
async fn end_with_error(session: &mut Session, ctx: &mut RequestCtx, reject: Reject) {
    let event = keepalive::error_event(&reject);
    ctx.reject = Some(reject);
    let _ = session.write_response_body(Some(event), true).await;
}

/// The request head for the replica, made from the client's: hop-by-hop
/// fields gone, forwarded fields set, the path rewritten for the route.
fn upstream_head(session: &Session, ctx: &RequestCtx, req: &mut RequestHeader) -> Result<()> {
    for name in headers::hop_by_hop(&req.headers, true) {
        req.remove_header(&name);
    }
    if ctx.continued {
        req.remove_header(&EXPECT);
    }
    let forwarded = Forwarded {
        host: request_host(session.req_header()),
        client: session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip()),
        tls: over_tls(session),
        request_id: &ctx.request_id,
    };
    forwarded.apply(|name, value| req.insert_header(name, value))?;
    if let (Some(live), Some(route)) = (&ctx.live, ctx.route) {
        let route = live.snapshot.network.route(route);
        let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
        if let Some(path) = headers::forward_path(pq, &route.path_prefix, route.strip_prefix) {
            let uri = http::Uri::builder()
                .path_and_query(path)
                .build()
                .map_err(|e| Error::because(ErrorType::InternalError, "rewriting the path", e))?;
            req.set_uri(uri);
        }
    }
    Ok(())
}

/// Whether the downstream connection is TLS.
fn over_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Write `reject` as the edge's own answer (nothing if the client is gone).
async fn respond(session: &mut Session, ctx: &RequestCtx, reject: &Reject, alt_svc: Option<http::HeaderValue>) {
    if reject.is_client_gone() {
        return;
    }
    let answer = policy::answer(reject, &ctx.request_id, ctx.live.as_deref(), alt_svc.as_ref());
    let Ok(mut resp) = ResponseHeader::build(answer.status, Some(answer.headers.len())) else { return };
    for (name, value) in answer.headers {
        let _ = resp.insert_header(name, value);
    }
    let unread = !session.is_body_done();
    if unread {
        // The unread body stays on the connection: it cannot be reused.
        session.set_keepalive(None);
    }
    if session.write_response_header(Box::new(resp), false).await.is_ok()
        && session.write_response_body(Some(answer.body), true).await.is_ok()
        && unread
    {
        linger(session, ctx).await;
    }
}

/// How long a lingering close reads the rest of an unread request body.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of an unread request body a lingering close reads at most.
const LINGER_BYTES: usize = 16 << 20;

/// A lingering close (RFC 9112, section 9.6): after an answer that left the
/// request body unread, read and drop what the client is still sending, for
/// a bounded time and size, before the connection closes. Closing a socket
/// with unread data makes the kernel reset the connection, and a client
/// still busy sending its body would then see a broken pipe instead of the
/// answer. HTTP/2 needs none of this: the stream is reset, not the
/// connection. A client waiting on `Expect: 100-continue` sends nothing more.
async fn linger(session: &mut Session, ctx: &RequestCtx) {
    let expects_continue = session.get_header(EXPECT).is_some();
    if session.is_http2() || (expects_continue && !ctx.continued) {
        return;
    }
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut read = 0;
    while read < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => read += chunk.len(),
            _ => break,
        }
    }
}
