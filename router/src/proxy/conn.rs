//! HTTP/1.1 and HTTP/2 to the client on hyper 1.x's server connections
//! (`server::conn::http1`, `server::conn::http2`), each request as the
//! forwarding engine's [`Client`]. hyper's codec costs less than half of
//! pingora-core's per request (`benches/README.md`, the data path on
//! hyper); pingora-core still accepts the connection and does its TLS
//! handshake ([`super::listener`]).
//!
//! hyper asks a service for a response and pulls its body; the engine
//! pushes the head, the body's parts and the end. The bridge: the
//! exchange runs as one boxed future that the service's future polls
//! until the head is out, and that the response body then polls on, a
//! part at a time. Both sides are polled by the same task (the
//! connection's on HTTP/1.1, the stream's on HTTP/2), so the exchange
//! needs no task or channel of its own: a part the engine sends waits in a
//! one-part slot until hyper takes it, which is its backpressure. If hyper
//! drops the exchange before its end (the client left or reset the
//! stream, the connection failed), the rest of it runs in a task of its
//! own that sees the client gone, so that the request is accounted for and
//! its slot freed as on every other ending.
//!
//! Timeouts are stoke's own, one timer per connection, not hyper's (no
//! boxed timer per request): a new connection has the header timeout for
//! its first request's head, a kept-alive one the keep-alive timeout
//! between requests. An HTTP/2 connection with no stream open for that
//! long is sent GOAWAY.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming};
use parking_lot::Mutex;
use pingora::protocols::{SocketDigest, Stream};
use pingora::server::ShutdownWatch;
use stoke_config::Route;
use tokio::time::Instant;

use super::engine::{replica_head, Client, Engine, Framing};
use super::policy::{self, Answer};
use super::request::Downstream;
use crate::error::Reject;
use crate::state::Held;

/// How often the socket of a held request whose body is unread is looked
/// at for the client's leaving (reading would take the body from the
/// replica).
const GONE_POLL: Duration = Duration::from_millis(100);

/// Linux TCP states (`include/net/tcp_states.h`): the peer sent FIN, and
/// the connection was reset or closed.
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_CLOSE: u8 = 7;

/// How long a lingering close reads the rest of an unread request body.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of an unread request body a lingering close reads at most.
const LINGER_BYTES: usize = 16 << 20;

/// What one connection's requests share.
struct Conn {
    engine: Arc<Engine>,
    tls: bool,
    client: Option<IpAddr>,
    socket: Option<Arc<SocketDigest>>,
    /// HTTP/2 (else HTTP/1.1).
    h2: bool,
    /// Requests being served.
    busy: AtomicUsize,
    /// Milliseconds from `opened` to when the last request ended.
    idle_since_ms: AtomicU64,
    /// A request has been served (the keep-alive timeout applies).
    reused: AtomicBool,
    opened: Instant,
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }
}

/// Counts a request as being served on its connection.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.busy.fetch_add(1, Ordering::Relaxed);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let c = &self.0;
        c.idle_since_ms.store(c.now_ms(), Ordering::Relaxed);
        c.reused.store(true, Ordering::Relaxed);
        c.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A hyper server connection that can be asked to end once what is in
/// flight is done.
trait Graceful: Future {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = AnswerBody, Error = Infallible>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Graceful for hyper::server::conn::http2::Connection<I, S, hyper_util::rt::TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = AnswerBody, Error = Infallible>,
    S::Future: Send + 'static,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serve `stream`, HTTP/2 if `h2`, else HTTP/1.1, until it closes, its
/// idle time runs out or the edge stops (in-flight requests finish first).
pub async fn serve(engine: Arc<Engine>, stream: Stream, h2: bool, shutdown: ShutdownWatch) {
    let edge = engine.router().live().snapshot.network.edge.clone();
    let socket = stream.get_socket_digest();
    let client = socket.as_ref().and_then(|s| s.peer_addr()).and_then(|a| a.as_inet()).map(|a| a.ip());
    let tls = stream.get_ssl_digest().is_some();
    let conn = Arc::new(Conn {
        engine,
        tls,
        client,
        socket,
        h2,
        busy: AtomicUsize::new(0),
        idle_since_ms: AtomicU64::new(0),
        reused: AtomicBool::new(false),
        opened: Instant::now(),
    });
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| Exchange::start(conn.clone(), req))
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
        // The edge's own limit on a head answers 431; hyper's (the size
        // of the decoded header list) is a backstop above it.
        builder
            .max_concurrent_streams(MAX_STREAMS)
            .max_header_list_size((edge.max_header_bytes + 16 * 1024).max(64 * 1024) as u32);
        let served = builder.serve_connection(io, service);
        drive(served, &conn, &edge, shutdown).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The edge's own limits answer 431 with its message; hyper's are a
        // backstop above them.
        builder
            .keep_alive(true)
            .half_close(false)
            .header_read_timeout(None)
            .max_headers(edge.max_headers + 64)
            .max_buf_size((edge.max_header_bytes + 16 * 1024).max(64 * 1024));
        // Not `pipeline_flush`: it holds answers back while more requests
        // sit unread, and an answer that closes the connection
        // (`Connection: close`, or a head with both a length and chunked
        // framing) with bytes still behind it was then never written.
        let served = builder.serve_connection(io, service);
        drive(served, &conn, &edge, shutdown).await;
    }
}

/// HTTP/2 streams a client may open at once on one connection.
const MAX_STREAMS: u32 = 100;

/// Poll `served` to its end, closing it when its idle time runs out or
/// the edge stops.
async fn drive<C: Graceful>(served: C, conn: &Conn, edge: &stoke_config::EdgeSettings, mut shutdown: ShutdownWatch) {
    tokio::pin!(served);
    let mut stopping = false;
    // When the connection's idle time runs out, if no request is in flight
    // then: a new connection has the header timeout, a reused one the
    // keep-alive timeout.
    let idle_until = || {
        let wait =
            if conn.reused.load(Ordering::Relaxed) { edge.keepalive_timeout } else { edge.client_header_timeout };
        let since = conn.opened + Duration::from_millis(conn.idle_since_ms.load(Ordering::Relaxed));
        (conn.busy.load(Ordering::Relaxed) == 0).then_some(since + wait).ok_or(wait)
    };
    loop {
        // Busy: look again one timeout later.
        let deadline = idle_until().unwrap_or_else(|wait| Instant::now() + wait);
        tokio::select! {
            _ = served.as_mut() => return,
            _ = tokio::time::sleep_until(deadline), if !stopping || !conn.h2 => {
                if idle_until().is_ok_and(|until| until <= Instant::now()) {
                    if !conn.h2 {
                        // No request in flight: nothing is lost by closing.
                        return;
                    }
                    // GOAWAY: a stream the client opened meanwhile is
                    // still served.
                    stopping = true;
                    served.as_mut().graceful();
                }
            }
            _ = shutdown.wait_for(|s| *s), if !stopping => {
                stopping = true;
                // HTTP/2: GOAWAY. HTTP/1.1: the answer in flight is the
                // last. An idle HTTP/1.1 connection is not closed under a
                // request that may be on its way: its next answer says
                // `Connection: close` (the engine drains), or its idle
                // time runs out.
                if conn.h2 || conn.busy.load(Ordering::Relaxed) > 0 {
                    served.as_mut().graceful();
                }
            }
        }
    }
}

/// What the engine has pushed and hyper has not taken yet.
#[derive(Default)]
struct Shared {
    head: Option<http::response::Parts>,
    chunk: Option<Bytes>,
    end: End,
    /// hyper let the exchange go: the client is gone.
    gone: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum End {
    #[default]
    Open,
    Finished,
    Aborted,
}

impl Shared {
    /// The next frame for hyper: a part, the end, or `None` for nothing yet.
    fn frame(&mut self) -> Option<Option<Result<Frame<Bytes>, Aborted>>> {
        if let Some(chunk) = self.chunk.take() {
            return Some(Some(Ok(Frame::data(chunk))));
        }
        match self.end {
            End::Open => None,
            End::Finished => Some(None),
            End::Aborted => Some(Some(Err(Aborted))),
        }
    }
}

/// The replica failed mid-answer: the answer ends cut short.
#[derive(Debug)]
struct Aborted;

impl std::fmt::Display for Aborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the replica failed mid-answer")
    }
}

impl std::error::Error for Aborted {}

type Run = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Let the rest of an exchange that hyper dropped run on its own, seeing
/// the client gone.
fn finish_alone(run: Option<Run>, shared: &Mutex<Shared>) {
    if let Some(run) = run {
        shared.lock().gone = true;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(run);
        }
    }
}

/// The service's future: runs the exchange until its answer's head is out.
struct Exchange {
    run: Option<Run>,
    shared: Arc<Mutex<Shared>>,
    busy: Option<Busy>,
    h2: bool,
}

impl Exchange {
    fn start(conn: Arc<Conn>, req: http::Request<Incoming>) -> Exchange {
        let busy = Busy::new(conn.clone());
        let h2 = conn.h2;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (parts, body) = req.into_parts();
        let held = conn.engine.router().bodies.account();
        let mut client = Req { parts, body, conn, shared: shared.clone(), held };
        let run: Run = Box::pin(async move {
            let engine = client.conn.engine.clone();
            engine.serve(&mut client).await;
        });
        Exchange { run: Some(run), shared, busy: Some(busy), h2 }
    }
}

impl Future for Exchange {
    type Output = Result<http::Response<AnswerBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(run) = this.run.as_mut() {
            if run.as_mut().poll(cx).is_ready() {
                this.run = None;
            }
        }
        let head = this.shared.lock().head.take();
        let head = match head {
            Some(mut head) => {
                if !this.h2 && this.busy.as_ref().is_some_and(|b| b.0.engine.draining()) {
                    head.headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                }
                head
            }
            None if this.run.is_some() => return Poll::Pending,
            // Ended without an answer: the client is gone.
            None => {
                let mut r = http::Response::new(());
                if !this.h2 {
                    r.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                }
                r.into_parts().0
            }
        };
        let body = AnswerBody { run: this.run.take(), shared: this.shared.clone(), _busy: this.busy.take() };
        Poll::Ready(Ok(http::Response::from_parts(head, body)))
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        finish_alone(self.run.take(), &self.shared);
    }
}

/// The answer's body: the exchange's parts as it pushes them.
struct AnswerBody {
    run: Option<Run>,
    shared: Arc<Mutex<Shared>>,
    _busy: Option<Busy>,
}

impl hyper::body::Body for AnswerBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.shared.lock().frame() {
                return Poll::Ready(frame);
            }
            let Some(run) = this.run.as_mut() else { return Poll::Ready(None) };
            if run.as_mut().poll(cx).is_ready() {
                this.run = None;
                continue;
            }
            return match this.shared.lock().frame() {
                Some(frame) => Poll::Ready(frame),
                None => Poll::Pending,
            };
        }
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        finish_alone(self.run.take(), &self.shared);
    }
}

/// One request on a hyper connection.
struct Req {
    parts: http::request::Parts,
    body: Incoming,
    conn: Arc<Conn>,
    shared: Arc<Mutex<Shared>>,
    /// What a body read here holds of the edge's body budget.
    held: Held,
}

impl Req {
    fn is_gone(&self) -> bool {
        self.shared.lock().gone
    }

    /// Resolves once hyper let the exchange go.
    fn when_gone(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(move |_| if self.is_gone() { Poll::Ready(()) } else { Poll::Pending })
    }

    async fn next_chunk(&mut self) -> Result<Option<Bytes>, Reject> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                    // Trailers are not forwarded.
                }
                Some(Err(e)) if e.is_incomplete_message() || e.is_closed() => return Err(Reject::client_gone()),
                Some(Err(e)) => return Err(policy::body_read_failed(e)),
            }
        }
    }

    /// A lingering close (RFC 9112, section 9.6): after an answer that
    /// left the request body unread, read and drop what the client is still
    /// sending, for a bounded time and size, before the connection closes.
    /// Closing a socket with unread data makes the kernel reset the
    /// connection, and a client still busy sending its body would then see
    /// a broken pipe instead of the answer.
    async fn linger(&mut self) {
        let deadline = Instant::now() + LINGER_TIME;
        let mut read = 0;
        while read < LINGER_BYTES {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
    }

    fn push_head(&self, head: http::response::Parts) -> bool {
        let mut s = self.shared.lock();
        if s.gone {
            return false;
        }
        s.head = Some(head);
        true
    }
}

fn request_host(parts: &http::request::Parts) -> Option<&str> {
    parts.headers.get(HOST).and_then(|h| h.to_str().ok()).or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

#[async_trait::async_trait]
impl Downstream for Req {
    fn host(&self) -> &str {
        request_host(&self.parts).unwrap_or("")
    }

    fn path(&self) -> &str {
        self.parts.uri.path()
    }

    fn method(&self) -> &str {
        self.parts.method.as_str()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.parts.headers.get(name).map(|v| v.as_bytes())
    }

    fn client_ip(&self) -> Option<IpAddr> {
        self.conn.client
    }

    async fn read_body(&mut self, limit: u64) -> Result<Bytes, Reject> {
        // hyper answers `Expect: 100-continue` when the body is first read.
        let mut whole = policy::WholeBody::new(self.parts.headers.get(CONTENT_LENGTH), limit)?;
        while let Some(chunk) = self.next_chunk().await? {
            whole.add(&chunk, &mut self.held)?;
        }
        Ok(whole.done())
    }

    async fn gone(&mut self) {
        if self.conn.h2 || self.body.is_end_stream() {
            // HTTP/2: a reset stream or a closed connection shows whether
            // or not the body was read.
            // hyper sees the client's leaving and drops the exchange.
            return self.when_gone().await;
        }
        // The body is still unread: the socket's state is polled, a FIN
        // (CLOSE_WAIT) or a reset (CLOSE) shows there.
        let Some(socket) = self.conn.socket.clone() else { return self.when_gone().await };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(GONE_POLL) => {}
                _ = self.when_gone() => return,
            }
            match socket.tcp_info() {
                Some(info) if info.tcpi_state == TCP_CLOSE_WAIT || info.tcpi_state == TCP_CLOSE => return,
                Some(_) => {}
                None => return self.when_gone().await,
            }
        }
    }
}

impl Client for Req {
    fn protocol(&self) -> &'static str {
        if self.conn.h2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        }
    }

    fn over_tls(&self) -> bool {
        self.conn.tls
    }

    fn head_size(&self) -> (usize, usize) {
        policy::head_counts(&self.parts.uri, &self.parts.headers)
    }

    async fn body_start(&mut self) -> Result<(Option<Bytes>, bool), Reject> {
        Ok((None, !self.body.is_end_stream()))
    }

    async fn body_chunk(&mut self) -> Result<Option<Bytes>, Reject> {
        self.next_chunk().await
    }

    fn upstream_head(
        &self,
        request_id: &policy::RequestId,
        route: Option<&Route>,
        body: Framing,
    ) -> Result<http::request::Parts, Reject> {
        let mut parts = http::Request::new(()).into_parts().0;
        parts.method = self.parts.method.clone();
        parts.uri = self.parts.uri.clone();
        // Room for what the edge adds (the forwarded fields, the request
        // id, the framing): a clone has none, and would grow twice.
        let from = &self.parts.headers;
        parts.headers = http::HeaderMap::with_capacity(from.len() + 6);
        parts.headers.extend(from.iter().map(|(name, value)| (name.clone(), value.clone())));
        replica_head(parts, self.conn.client, self.conn.tls, request_id, route, body)
    }

    async fn send_head(&mut self, head: http::response::Parts) -> bool {
        self.push_head(head)
    }

    async fn send_body(&mut self, chunk: Bytes) -> bool {
        let mut chunk = Some(chunk);
        std::future::poll_fn(|_| {
            let mut s = self.shared.lock();
            if s.gone {
                return Poll::Ready(false);
            }
            if s.chunk.is_some() {
                // hyper takes it, then polls this again.
                return Poll::Pending;
            }
            s.chunk = chunk.take();
            Poll::Ready(true)
        })
        .await
    }

    async fn finish(&mut self) {
        self.shared.lock().end = End::Finished;
    }

    async fn abort(&mut self) {
        self.shared.lock().end = End::Aborted;
    }

    async fn closed(&mut self) {
        self.when_gone().await
    }

    async fn answer(&mut self, answer: Answer) {
        let mut r = http::Response::new(());
        *r.status_mut() = http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let (mut head, ()) = r.into_parts();
        for (name, value) in answer.headers {
            head.headers.insert(name, value);
        }
        // HTTP/2 needs none of this: the stream is reset, not the connection.
        let unread = !self.conn.h2 && !self.body.is_end_stream();
        if unread {
            // The unread body stays on the connection: it is not reused.
            head.headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        if !self.push_head(head) {
            return;
        }
        {
            let mut s = self.shared.lock();
            if !answer.body.is_empty() {
                s.chunk = Some(answer.body);
            }
            s.end = End::Finished;
        }
        if unread {
            self.linger().await;
        }
    }
}
