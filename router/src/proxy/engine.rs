//! The forwarding engine: one exchange, from the request's head to the last
//! byte of its answer, for every downstream protocol. It runs the routing
//! core ([`request::decide`]), holds streams that say they are held
//! ([`keepalive`]), sends the request to its replica over the edge's pooled
//! upstream connections with the one retry loop ([`upstream`]), streams the
//! answer back, answers failures with the response policy ([`policy`]) and
//! accounts for the request on every ending ([`request::record`]).
//!
//! A protocol adapter ([`Client`]) gives it the request and takes the
//! answer: [`super::conn`] for HTTP/1.1 and HTTP/2 (hyper's server
//! connections), [`crate::h3`] for HTTP/3. The adapters hold no policy.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use stoke_config::{PoolId, Route};

use super::admit::Rehold;
use super::headers;
use super::idle::IdlePool;
use super::keepalive::{self, HeldStream, KeptAlive, Step};
use super::policy::{self, Answer, BodyCount, RequestId, Served, RETRY_BUFFER};
use super::request::{self, Downstream, Outcome, Trace, Verdict};
use super::upstream::{
    self, Answered, Answering, Attempt, Connection, Outgoing, Sent, TryError, Upload, UpstreamError,
};
use crate::core::affinity::Chosen;
use crate::drain::Drain;
use crate::error::Reject;
use crate::otel::{self, Recording};
use crate::state::{Live, Router, Slot};

/// How the request body goes to the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// The edge holds all of it: this many bytes (`Content-Length`).
    Whole(usize),
    /// It streams from the client: its own `Content-Length`, or chunked.
    Streamed,
}

/// The client's side of one exchange, as the engine drives it. Besides
/// what the routing core reads ([`Downstream`]), it frames the request for
/// the replica and writes the answer in its protocol.
pub trait Client: Downstream {
    /// The protocol, for the log (`HTTP/1.1`, `HTTP/2`, `HTTP/3`).
    fn protocol(&self) -> &'static str;

    /// Whether the client's connection is TLS.
    fn over_tls(&self) -> bool;

    /// The request head's field count and size, against the edge's limits.
    fn head_size(&self) -> (usize, usize);

    /// Before the body streams: bytes of it read ahead (to be sent first)
    /// and whether more comes from the client.
    fn body_start(&mut self) -> impl Future<Output = Result<(Option<Bytes>, bool), Reject>> + Send;

    /// The next part of the request body, `None` at its end.
    fn body_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, Reject>> + Send;

    /// The head for the replica: hop-by-hop fields gone, forwarded fields
    /// set, the path rewritten for `route`, framed as `body` says.
    fn upstream_head(
        &self,
        request_id: &RequestId,
        route: Option<&Route>,
        body: Framing,
    ) -> Result<http::request::Parts, Reject>;

    /// Write the answer's head; `false` if the client is gone.
    fn send_head(&mut self, head: http::response::Parts) -> impl Future<Output = bool> + Send;

    /// Write a part of the answer's body; `false` if the client is gone.
    fn send_body(&mut self, chunk: Bytes) -> impl Future<Output = bool> + Send;

    /// End the answer.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;

    /// The replica failed mid-answer: end the answer so that the client
    /// sees it cut short (a reset stream, a closed connection).
    fn abort(&mut self) -> impl Future<Output = ()> + Send;

    /// Resolves when the client goes away while the answer is awaited or
    /// streams. Cancel-safe.
    fn closed(&mut self) -> impl Future<Output = ()> + Send;

    /// Write the edge's own answer (and read what is left of an unread body).
    fn answer(&mut self, answer: Answer) -> impl Future<Output = ()> + Send;
}

/// The head for the replica, made from the client's request head `parts`
/// (HTTP/1.1 or HTTP/2): hop-by-hop fields gone, `Host` set, framed as
/// `body` says, the forwarded fields set, the path rewritten for `route`.
///
/// The head is edited as one `HeaderMap`: names go upstream in lowercase
/// (as HTTP/2 sends them), and each edit is one map operation with a
/// constant name.
pub fn replica_head(
    mut parts: http::request::Parts,
    client: Option<std::net::IpAddr>,
    tls: bool,
    request_id: &RequestId,
    route: Option<&Route>,
    body: Framing,
) -> Result<http::request::Parts, Reject> {
    use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
    parts.version = http::Version::HTTP_11;
    let h = &mut parts.headers;
    for name in headers::hop_by_hop(h, true) {
        h.remove(&name);
    }
    // The edge answers `Expect: 100-continue` itself.
    h.remove(EXPECT);
    // HTTP/2 carries the host as the authority; HTTP/1.1 wants `Host`.
    if !h.contains_key(HOST) {
        if let Some(authority) = parts.uri.authority() {
            let value = HeaderValue::from_str(authority.as_str())
                .map_err(|_| Reject::client(400, "bad_request", "cannot forward this request: invalid authority"))?;
            h.insert(HOST, value);
        }
    }
    match body {
        Framing::Whole(len) => {
            h.remove(TRANSFER_ENCODING);
            h.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        Framing::Streamed => {
            // A chunked body goes chunked (never with a length beside it);
            // a body with a length keeps it; an HTTP/2 body without one
            // goes chunked.
            if h.contains_key(TRANSFER_ENCODING) || !h.contains_key(CONTENT_LENGTH) {
                h.remove(CONTENT_LENGTH);
                h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
        }
        Framing::Empty => {
            h.remove(TRANSFER_ENCODING);
        }
    }
    // The host the client asked for goes as it came (it is a valid value).
    if let Some(host) = h.get(HOST).cloned() {
        h.insert(HeaderName::from_static(headers::FORWARDED_HOST), host);
    }
    let forwarded = policy::Forwarded { host: None, client, tls, request_id };
    forwarded.apply(|name, value| {
        h.insert(HeaderName::from_static(name), value);
        Ok::<_, Reject>(())
    })?;
    // The replica gets the origin form (the path and query), rewritten for
    // the route; a target already in that form is kept as it is.
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = match route.and_then(|r| headers::forward_path(pq, &r.path_prefix, r.strip_prefix)) {
        Some(path) => Some(http::Uri::try_from(path)),
        None if parts.uri.authority().is_some() => Some(http::Uri::try_from(pq)),
        None => None,
    };
    if let Some(uri) = uri {
        parts.uri = uri.map_err(|e| Reject::client(400, "bad_request", format!("cannot rewrite the path: {e}")))?;
    }
    Ok(parts)
}

/// The engine one edge runs for every protocol.
pub struct Engine {
    router: Arc<Router>,
    /// Idle upstream connections.
    idle: Arc<IdlePool>,
    drain: Drain,
    /// `Alt-Svc` for answers over TLS, when HTTP/3 is served.
    alt_svc: Option<HeaderValue>,
}

/// How a request ended, for the log and the connection.
struct Exchange {
    live: Arc<Live>,
    started: Instant,
    request_id: RequestId,
    trace: Trace,
    status: u16,
    bytes: usize,
    pool: Option<PoolId>,
    replica: Option<Arc<str>>,
    waited: Duration,
    error: Option<String>,
    affinity: Option<Chosen>,
    /// The request reached a replica (its connection then is not reused
    /// after a failure).
    forwarded: bool,
    /// The answer ended as it should.
    complete: bool,
    /// The request has been accounted for.
    recorded: bool,
    /// Its trace id, when it has a trace (for the log).
    trace_id: Option<[u8; 16]>,
    /// What its trace records, when it is sampled.
    recording: Option<Box<Recording>>,
}

impl Exchange {
    /// The slot a request now holds, for the log.
    fn serve_on(&mut self, slot: &Slot, pool: PoolId) {
        self.pool = Some(pool);
        self.replica = Some(slot.replica().addr_text.clone());
        self.affinity = chosen(slot);
    }
}

/// How streaming a replica's answer body to the client ended.
enum Streamed {
    /// The replica's whole body was read; its last part (if any) is still
    /// to go to the client.
    Done(Option<Bytes>),
    /// The client left or stopped reading.
    ClientGone(&'static str),
    /// The replica failed mid-answer.
    ReplicaFailed(UpstreamError),
}

impl Engine {
    /// The engine over `router`; every exchange holds a guard of `drain`
    /// while it runs, so that shutdown can wait for it.
    pub fn new(router: Arc<Router>, drain: Drain, alt_svc: Option<String>) -> Self {
        let alt_svc = alt_svc.and_then(|v| HeaderValue::from_str(&v).ok());
        let idle = Arc::new(IdlePool::new(super::listener::UPSTREAM_KEEPALIVE_POOL));
        Engine { router, idle, drain, alt_svc }
    }

    /// The idle upstream connections, for their sweep ([`super::idle::run`]).
    pub fn idle(&self) -> &Arc<IdlePool> {
        &self.idle
    }

    /// Whether the edge drains (stopping, or taken over by a new process).
    pub fn draining(&self) -> bool {
        self.drain.stopping()
    }

    /// The routing state the engine serves from.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Serve one exchange on `client`. Returns whether its connection may
    /// carry another request: the answer was whole and no failure on the
    /// replica's side ended it.
    pub async fn serve<C: Client>(&self, client: &mut C) -> bool {
        let _in_progress = self.drain.guard();
        let live = self.router.live();
        let mut x = Exchange {
            request_id: policy::request_id(client.header(headers::REQUEST_ID)),
            live,
            started: Instant::now(),
            trace: Trace::default(),
            status: 0,
            bytes: 0,
            pool: None,
            replica: None,
            waited: Duration::ZERO,
            error: None,
            affinity: None,
            forwarded: false,
            complete: false,
            recorded: false,
            trace_id: None,
            recording: None,
        };
        if let Some(tracer) = self.router.tracer().as_ref() {
            let begun = tracer.begin(client.header(otel::TRACEPARENT), x.started);
            x.trace_id = begun.trace;
            x.recording = begun.recording;
        }
        match self.exchange(client, &mut x).await {
            Ok(()) => {}
            Err(reject) if reject.is_client_gone() => {
                x.status = 0;
                x.error = Some(reject.to_string());
            }
            Err(reject) => {
                x.status = reject.status;
                if reject.status >= 500 {
                    crate::tally::refused(reject.code);
                }
                let alt = policy::alt_svc(client.over_tls(), self.alt_svc.as_ref());
                let answer = policy::answer(&reject, &x.request_id, Some(&x.live), alt);
                x.bytes += answer.body.len();
                client.answer(answer).await;
                x.complete = !x.forwarded;
                if reject.status >= 400 {
                    x.error = Some(reject.to_string());
                }
            }
        }
        record(client, &mut x);
        x.complete
    }

    /// Decide, then forward, hold or refuse.
    async fn exchange<C: Client>(&self, client: &mut C, x: &mut Exchange) -> Result<(), Reject> {
        let (fields, bytes) = client.head_size();
        policy::check_head(&x.live.snapshot.network.edge, fields, bytes)?;
        policy::check_method(client.method())?;
        let live = x.live.clone();
        let routed = match request::decide(&self.router, &live, client, x.started, &mut x.trace).await? {
            Verdict::Forward(routed) => routed,
            Verdict::Answer(json) => return Err(Reject::answer(json)),
            // Boxed, as rare paths are, so that every exchange's future
            // (and so every open stream) does not carry their room.
            Verdict::HoldStream(held) => return Box::pin(self.hold_stream(client, x, held)).await,
        };
        let (slot, pool) = (routed.admitted.slot, routed.admitted.pool);
        x.waited = routed.admitted.waited;
        if let Some(r) = &mut x.recording {
            r.admitted(x.waited);
        }
        x.serve_on(&slot, pool);
        let (held, streamed) = match routed.body {
            Some(body) => (Some(body), false),
            None => client.body_start().await?,
        };
        let framing = match (&held, streamed) {
            (_, true) => Framing::Streamed,
            (Some(body), false) => Framing::Whole(body.len()),
            (None, false) => Framing::Empty,
        };
        let route = x.trace.route.map(|r| live.snapshot.network.route(r));
        let head = client.upstream_head(&x.request_id, route, framing)?;
        let mut body = Body {
            held,
            streamed,
            count: BodyCount::new(x.trace.max_body.unwrap_or(u64::MAX)),
            sent: Vec::new(),
            sent_bytes: 0,
        };
        if let Some(held) = &body.held {
            body.count.add(held.len())?;
        }
        x.forwarded = true;
        let rehold = route.map(|r| Rehold { router: &self.router, started: x.started, max_wait: r.max_wait });
        let mut attempt = Try {
            head: Some(head),
            request_id: &x.request_id,
            route,
            framing,
            body: &mut body,
            client,
            recording: x.recording.as_deref_mut(),
        };
        let sent =
            upstream::send_with_retries(&self.idle, &live, x.trace.service, slot, pool, &mut attempt, rehold.as_ref())
                .await;
        // The body is done with: what it kept for a retry goes now, not
        // when the answer ends.
        drop(body);
        let Sent { head, answer, slot, pool } = sent?;
        x.serve_on(&slot, pool);
        let resp = self.answer_head(head, client.over_tls(), x, &slot)?;
        x.status = resp.status.as_u16();
        // A connection whose answer is not read is closed, dropped with it.
        if !client.send_head(resp).await {
            return Err(Reject::client_gone());
        }
        if let Some(r) = &mut x.recording {
            r.first_byte();
        }
        if let Some(e) = self.deliver(client, x, answer, slot).await {
            client.abort().await;
            x.error = Some(format!("replica failed mid-response: {}", e.kind()));
        }
        Ok(())
    }

    /// Stream the replica's answer body to the client and end the answer,
    /// the upstream connection back to its pool. A failure of the replica
    /// mid-answer is returned, for the caller to tell the client.
    ///
    /// This future is what an open stream holds, so it holds little: the
    /// answer is used in place (an `async fn` keeps its arguments for its
    /// whole life, and a copy moved out of them would be a second), and
    /// giving the connection back does not await.
    async fn deliver<C: Client>(
        &self,
        client: &mut C,
        x: &mut Exchange,
        mut answer: Answering,
        slot: Slot,
    ) -> Option<UpstreamError> {
        match stream_answer(client, &mut answer, x).await {
            Streamed::Done(last) => {
                // A connection whose answer is not known to be whole is
                // closed, dropped here.
                answer.release(&self.idle);
                drop(slot);
                x.complete = finish(client, x, last).await;
                None
            }
            Streamed::ClientGone(why) => {
                x.error = Some(why.into());
                None
            }
            Streamed::ReplicaFailed(e) => Some(e),
        }
    }

    /// The answer's head for the client, made from the replica's:
    /// hop-by-hop fields gone, the request id, `Alt-Svc` and the debug
    /// headers set.
    fn answer_head(
        &self,
        mut parts: http::response::Parts,
        tls: bool,
        x: &Exchange,
        slot: &Slot,
    ) -> Result<http::response::Parts, Reject> {
        // A reason phrase other than the status's own stays with the
        // head's extensions (hyper's `ReasonPhrase`).
        let h = &mut parts.headers;
        for name in headers::hop_by_hop(h, false) {
            h.remove(&name);
        }
        if let Some(alt) = policy::alt_svc(tls, self.alt_svc.as_ref()) {
            h.insert(http::header::ALT_SVC, alt.clone());
        }
        h.insert(HeaderName::from_static(headers::REQUEST_ID), policy::value(&x.request_id));
        let served = Served { pool: x.pool, replica: Some(&slot.replica().addr_text), waited: x.waited };
        policy::debug_headers(&x.live, served, |name, value| {
            h.insert(HeaderName::from_static(name), value);
            Ok::<_, Reject>(())
        })?;
        Ok(parts)
    }

    /// A streaming request held with keep-alive comments: the SSE head
    /// now, a comment every interval, then the replica's stream on the same
    /// answer, or an error event if the hold or the replica fails. Errs
    /// only before the head is sent.
    async fn hold_stream<C: Client>(&self, client: &mut C, x: &mut Exchange, held: HeldStream) -> Result<(), Reject> {
        let live = x.live.clone();
        let alt = policy::alt_svc(client.over_tls(), self.alt_svc.as_ref());
        let (mut resp, ()) = http::Response::new(()).into_parts();
        resp.headers.extend(keepalive::head(&x.request_id, &live, alt));
        if !client.send_head(resp).await {
            return Err(Reject::client_gone());
        }
        x.status = 200;
        if let Some(r) = &mut x.recording {
            r.first_byte();
        }
        let mut kept = KeptAlive::new(&self.router, &live, &held, x.started, &mut x.trace.hold);
        let admitted = loop {
            match kept.next().await {
                Step::Say(line) => {
                    x.bytes += line.len();
                    if !client.send_body(line).await {
                        // The client left: dropping the hold frees its place.
                        x.error = Some("client gone while held".into());
                        return Ok(());
                    }
                }
                Step::Done(admitted) => break admitted,
            }
        };
        drop(kept);
        let admitted = match admitted {
            Ok(a) => a,
            Err(reject) => return end_with_error(client, x, reject).await,
        };
        x.pool = Some(admitted.pool);
        x.waited = admitted.waited;
        let route = x.trace.route.map(|r| live.snapshot.network.route(r));
        let mut head = match client.upstream_head(&x.request_id, route, Framing::Whole(held.body.len())) {
            Ok(h) => h,
            Err(reject) => return end_with_error(client, x, reject).await,
        };
        if let Some(r) = &mut x.recording {
            r.admitted(x.waited);
            let parent = r.try_start(admitted.slot.replica().addr);
            head.headers.insert(HeaderName::from_static(otel::TRACEPARENT), parent);
        }
        x.forwarded = true;
        let rehold = route.map(|r| Rehold { router: &self.router, started: x.started, max_wait: r.max_wait });
        let sent = upstream::send_whole(
            &self.idle,
            &live,
            x.trace.service,
            admitted.slot,
            admitted.pool,
            &head,
            &held.body,
            rehold.as_ref(),
        );
        let sent = sent.await;
        if let Some(r) = &mut x.recording {
            r.try_end(sent.as_ref().map(|s| s.head.status.as_u16()).map_err(|e| e.to_string()));
        }
        let Sent { head, answer, slot, pool } = match sent {
            Ok(sent) => sent,
            Err(reject) => return end_with_error(client, x, reject).await,
        };
        x.serve_on(&slot, pool);
        if head.status != http::StatusCode::OK {
            return end_with_error(client, x, keepalive::replica_refused(head.status.as_u16())).await;
        }
        match self.deliver(client, x, answer, slot).await {
            Some(e) => end_with_error(client, x, keepalive::replica_failed(&e)).await,
            None => Ok(()),
        }
    }
}

/// Account for the request: metrics and the access log, once.
fn record<C: Client>(client: &C, x: &mut Exchange) {
    if std::mem::replace(&mut x.recorded, true) {
        return;
    }
    let error = x.error.as_ref().map(|e| e as &dyn std::fmt::Display);
    let outcome = Outcome {
        request_id: &x.request_id,
        protocol: client.protocol(),
        method: client.method(),
        path: client.path(),
        trace: x.trace,
        pool: x.pool,
        replica: x.replica.as_deref(),
        status: x.status,
        bytes: x.bytes,
        elapsed: x.started.elapsed(),
        waited: x.waited,
        error,
        affinity: x.affinity,
        trace_id: x.trace_id.as_ref(),
    };
    request::record(Some(&x.live), &outcome);
    if let Some(mut r) = x.recording.take() {
        if let Some(h) = x.trace.hold {
            r.held(h);
        }
        r.end(&otel::Ended {
            protocol: outcome.protocol,
            method: outcome.method,
            path: outcome.path,
            names: request::names(Some(&x.live), &outcome),
            replica: outcome.replica,
            status: outcome.status,
            bytes: outcome.bytes,
            request_id: outcome.request_id,
            waited: outcome.waited,
            error: x.error.clone(),
        });
    }
}

/// The end of an answer whose replica is done with it (its slot freed):
/// the request is accounted for, then its last bytes go, so that whoever
/// has the whole answer sees it counted. Whether the answer went whole.
async fn finish<C: Client>(client: &mut C, x: &mut Exchange, last: Option<Bytes>) -> bool {
    record(client, x);
    if let Some(last) = last {
        if !client.send_body(last).await {
            return false;
        }
    }
    client.finish().await;
    true
}

/// End a held stream with an SSE error event for `reject`.
async fn end_with_error<C: Client>(client: &mut C, x: &mut Exchange, reject: Reject) -> Result<(), Reject> {
    if reject.status >= 500 {
        crate::tally::refused(reject.code);
    }
    let event = keepalive::error_event(&reject);
    x.bytes += event.len();
    if client.send_body(event).await {
        client.finish().await;
    }
    x.error = Some(reject.to_string());
    Ok(())
}

/// Stream the answer body from the replica to the client, counting bytes.
async fn stream_answer<C: Client>(client: &mut C, answer: &mut Answering, x: &mut Exchange) -> Streamed {
    loop {
        let chunk = tokio::select! {
            r = answer.chunk() => r,
            _ = client.closed() => return Streamed::ClientGone("client gone mid-response"),
        };
        match chunk {
            Ok(Some(b)) => {
                x.bytes += b.len();
                if answer.is_done() {
                    return Streamed::Done(Some(b));
                }
                // Writes are not raced: not every protocol's is cancel-safe.
                if !client.send_body(b).await {
                    return Streamed::ClientGone("client stopped reading");
                }
            }
            Ok(None) => return Streamed::Done(None),
            Err(e) => return Streamed::ReplicaFailed(e),
        }
    }
}

/// How a slot's replica was chosen, on a pool with affinity.
fn chosen(slot: &Slot) -> Option<Chosen> {
    slot.has_affinity().then(|| slot.chosen())
}

/// The request body as it goes upstream.
struct Body {
    /// Bytes the edge holds: the whole body (read to find the model), or
    /// what arrived ahead of streaming.
    held: Option<Bytes>,
    /// Whether more is to come from the client.
    streamed: bool,
    count: BodyCount,
    /// What went upstream from the client, kept to send it again on a
    /// retry while it is at most [`RETRY_BUFFER`].
    sent: Vec<Bytes>,
    /// How much went upstream from the client (beyond `held`).
    sent_bytes: usize,
}

impl Body {
    /// Whether a try that failed can send the body again: only while every
    /// byte sent so far is one the edge still holds.
    fn replayable(&self) -> bool {
        self.sent_bytes <= RETRY_BUFFER
    }

    /// A failure on the replica's side, as the retry policy sees it.
    fn failed(&self, error: UpstreamError) -> TryError {
        TryError::Upstream { error, replayable: self.replayable() }
    }
}

/// One try of a request at a replica.
struct Try<'r, C> {
    /// The head for the first try (the connection takes the one it
    /// writes); a later try builds it again, as the first was built.
    head: Option<http::request::Parts>,
    request_id: &'r RequestId,
    route: Option<&'r Route>,
    framing: Framing,
    body: &'r mut Body,
    client: &'r mut C,
    /// The request's trace, when sampled: each try is a span of it.
    recording: Option<&'r mut Recording>,
}

impl<C: Client> Attempt for Try<'_, C> {
    fn replayable(&self) -> bool {
        self.body.replayable()
    }

    fn attempt<'a>(
        &'a mut self,
        connection: &'a mut Connection,
        replica: &'a upstream::Replica,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Answered, TryError>> + Send + 'a>> {
        Box::pin(async move {
            let mut head = match self.head.take() {
                Some(head) => head,
                None => {
                    self.client.upstream_head(self.request_id, self.route, self.framing).map_err(TryError::Answer)?
                }
            };
            let Some(r) = self.recording.as_deref_mut() else {
                return send(connection, head, self.body, &mut *self.client, replica).await;
            };
            head.headers.insert(HeaderName::from_static(otel::TRACEPARENT), r.try_start(replica.addr));
            let answered = send(connection, head, self.body, &mut *self.client, replica).await;
            r.try_end(match &answered {
                Ok(answer) => Ok(answer.status().as_u16()),
                Err(TryError::Upstream { error, .. }) => Err(error.to_string()),
                Err(TryError::Answer(reject)) => Err(reject.to_string()),
            });
            answered
        })
    }
}

/// One try: the request head and body to the replica, then its answer's
/// head (1xx are skipped by the connection), watching for the client
/// leaving. A body that streams from the client goes as it arrives.
async fn send<C: Client>(
    connection: &mut Connection,
    head: http::request::Parts,
    body: &mut Body,
    client: &mut C,
    replica: &upstream::Replica,
) -> Result<Answered, TryError> {
    let replay = !body.sent.is_empty();
    if !body.streamed && !replay {
        let outgoing = match &body.held {
            Some(held) => Outgoing::Whole(Some(held.clone())),
            None => Outgoing::Empty,
        };
        let answer = connection.send(http::Request::from_parts(head, outgoing));
        let forwarded_at = Instant::now();
        let answer = tokio::select! {
            r = upstream::answer_head(replica, answer) => r.map_err(|e| body.failed(e))?,
            _ = client.closed() => return Err(TryError::Answer(Reject::client_gone())),
        };
        request::upstream_ttfb().record(forwarded_at.elapsed().as_secs_f64());
        return Ok(answer);
    }
    let (mut upload, outgoing) = Upload::new();
    // The replica's read timeout counts from the body's end: a slow
    // upload is not the replica's slowness.
    let mut answer = std::pin::pin!(connection.send(http::Request::from_parts(head, outgoing)));
    // The body as it goes: what the edge holds, what a failed try sent,
    // then the client's, to its end.
    let sending = async {
        if let Some(held) = &body.held {
            upload.send(held.clone()).await.map_err(|e| body.failed(e))?;
        }
        for chunk in &body.sent {
            upload.send(chunk.clone()).await.map_err(|e| body.failed(e))?;
        }
        while body.streamed {
            match client.body_chunk().await {
                Ok(Some(chunk)) => {
                    body.count.add(chunk.len()).map_err(TryError::Answer)?;
                    body.sent_bytes += chunk.len();
                    if body.sent_bytes <= RETRY_BUFFER {
                        body.sent.push(chunk.clone());
                    } else {
                        body.sent = Vec::new();
                    }
                    upload.send(chunk).await.map_err(|e| body.failed(e))?;
                }
                Ok(None) => body.streamed = false,
                Err(reject) => return Err(TryError::Answer(reject)),
            }
        }
        Ok(())
    };
    // The body goes whole before the answer is taken, as a replica that
    // answers early expects it to; an answer that fails meanwhile (the
    // connection is gone) ends the try at once.
    let (sent, early) = {
        let mut sending = std::pin::pin!(sending);
        tokio::select! {
            biased;
            r = &mut answer => match r {
                Ok(early) => (sending.await, Some(Ok(early))),
                Err(e) => (Ok(()), Some(Err(UpstreamError::Http(e)))),
            },
            r = &mut sending => (r, None),
        }
    };
    if let Some(Err(e)) = early {
        return Err(body.failed(e));
    }
    if let Err(e) = sent {
        // Cut short: the replica must not take a part for the whole.
        upload.abort();
        return Err(e);
    }
    drop(upload);
    if let Some(Ok(early)) = early {
        return Ok(early);
    }
    let forwarded_at = Instant::now();
    let answer = tokio::select! {
        r = upstream::answer_head(replica, answer) => r.map_err(|e| body.failed(e))?,
        _ = client.closed() => return Err(TryError::Answer(Reject::client_gone())),
    };
    request::upstream_ttfb().record(forwarded_at.elapsed().as_secs_f64());
    Ok(answer)
}
