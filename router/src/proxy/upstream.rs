//! How replicas are reached: HTTP/1.1 connections on hyper's client
//! connections, with the pool's timeouts, kept between requests
//! ([`super::idle`]), and the one retry loop of every protocol.
//!
//! Each connection is hyper's `SendRequest` (kept by the edge's idle pool)
//! and its connection future, a task of its own for as long as the socket
//! lives; a request's answer body is read from it by the exchange itself.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::channel::{Channel, Sender};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use stoke_config::{Pool, PoolId, ServiceId};

use super::admit::{self, Rehold};
use super::idle::IdlePool;
use super::policy::{self, Attempts, Failure};
use crate::error::Reject;
use crate::state::{Live, Slot};

/// Longest a write to a replica may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A replica as the edge dials it: its address and its pool's timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Longest a connect may take.
    pub connect_timeout: Option<Duration>,
    /// Longest the replica may take to answer, and between two parts of
    /// its answer.
    pub read_timeout: Option<Duration>,
    /// How long an idle connection to it is kept.
    pub idle_timeout: Duration,
    /// Whether its pool has a light depth: then a 503 may be a replica
    /// that went to light sleep as the request was sent.
    pub sleeps_lightly: bool,
}

/// The replica at `addr`, with the timeouts of `pool`.
pub fn replica(addr: SocketAddr, pool: &Pool) -> Replica {
    Replica {
        addr,
        connect_timeout: Some(pool.connect_timeout),
        read_timeout: Some(pool.read_timeout),
        idle_timeout: POOL_IDLE_TIMEOUT,
        sleeps_lightly: pool.health.sleeping_path.is_some(),
    }
}

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

/// What failed on the replica's side.
#[derive(Debug)]
pub enum UpstreamError {
    /// The connection could not be made.
    Connect(io::Error),
    /// The connection was not made in the pool's `connect_timeout`.
    ConnectTimeout,
    /// The replica did not answer (or go on answering) in its
    /// `read_timeout`.
    ReadTimeout,
    /// A part of the request body could not be written in
    /// [`WRITE_TIMEOUT`].
    WriteTimeout,
    /// The connection failed or the replica broke HTTP.
    Http(hyper::Error),
}

impl UpstreamError {
    /// A short name for what failed, for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused => "ConnectRefused",
            UpstreamError::Connect(_) => "ConnectError",
            UpstreamError::ConnectTimeout => "ConnectTimedout",
            UpstreamError::ReadTimeout => "ReadTimedout",
            UpstreamError::WriteTimeout => "WriteTimedout",
            UpstreamError::Http(e) if e.is_incomplete_message() => "ConnectionClosed",
            UpstreamError::Http(e) if e.is_parse() => "InvalidHTTPHeader",
            UpstreamError::Http(_) => "ReadError",
        }
    }

    /// Whether no connection was made (nothing reached the replica).
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::ConnectTimeout)
    }

    /// Whether the replica took too long.
    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::ReadTimeout | UpstreamError::WriteTimeout | UpstreamError::ConnectTimeout)
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "{}: {e}", self.kind()),
            UpstreamError::Http(e) => write!(f, "{}: {e}", self.kind()),
            _ => f.write_str(self.kind()),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// The body of a request to a replica.
pub enum Outgoing {
    /// None.
    Empty,
    /// All of it, held by the edge (taken when written).
    Whole(Option<Bytes>),
    /// Streamed from the client as it arrives ([`Upload`]).
    Streamed(Channel<Bytes, io::Error>),
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut *self {
            Outgoing::Empty => Poll::Ready(None),
            Outgoing::Whole(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Outgoing::Streamed(c) => Pin::new(c).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Empty => true,
            Outgoing::Whole(b) => b.is_none(),
            Outgoing::Streamed(c) => c.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outgoing::Empty => SizeHint::with_exact(0),
            Outgoing::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Outgoing::Streamed(c) => c.size_hint(),
        }
    }
}

/// The sending end of a streamed request body.
pub struct Upload(Sender<Bytes, io::Error>);

impl Upload {
    /// A streamed body and its sending end.
    pub fn new() -> (Upload, Outgoing) {
        let (tx, body) = Channel::new(1);
        (Upload(tx), Outgoing::Streamed(body))
    }

    /// Send a part of the body, within [`WRITE_TIMEOUT`].
    pub async fn send(&mut self, chunk: Bytes) -> Result<(), UpstreamError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.0.send_data(chunk)).await {
            Ok(Ok(())) => Ok(()),
            // The connection is gone; its own error comes with the answer.
            Ok(Err(_)) => Ok(()),
            Err(_) => Err(UpstreamError::WriteTimeout),
        }
    }

    /// The body is cut short: the replica must not take what it got as
    /// the whole body, so the connection is broken off.
    pub fn abort(self) {
        self.0.abort(io::Error::other("the request body was cut short"));
    }
}

/// A connection to a replica, able to take a request.
pub struct Connection {
    pub(super) sender: SendRequest<Outgoing>,
    /// Whether it was kept from an earlier request (a failure on it may
    /// then be the replica's keep-alive ending).
    pub reused: bool,
}

impl Connection {
    /// A new connection to `replica`, within its connect timeout; its
    /// connection future runs in a task of its own until the socket closes.
    pub async fn open(replica: &Replica) -> Result<Connection, UpstreamError> {
        let connect = tokio::net::TcpStream::connect(replica.addr);
        let stream = match replica.connect_timeout {
            Some(t) => tokio::time::timeout(t, connect).await.map_err(|_| UpstreamError::ConnectTimeout)?,
            None => connect.await,
        }
        .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "replica connection ended");
            }
        });
        Ok(Connection { sender, reused: false })
    }

    /// Send `request`: its answer's head comes with the future (the body,
    /// streamed or not, is written by the connection's task).
    pub fn send(
        &mut self,
        request: http::Request<Outgoing>,
    ) -> impl Future<Output = Result<http::Response<Incoming>, hyper::Error>> {
        self.sender.send_request(request)
    }
}

/// The answer's head from `answer`, within the replica's read timeout.
pub async fn answer_head<F>(replica: &Replica, answer: F) -> Result<http::Response<Incoming>, UpstreamError>
where
    F: Future<Output = Result<http::Response<Incoming>, hyper::Error>>,
{
    match replica.read_timeout {
        Some(t) => tokio::time::timeout(t, answer).await.map_err(|_| UpstreamError::ReadTimeout)?,
        None => answer.await,
    }
    .map_err(UpstreamError::Http)
}

/// A replica's answer being read: its body, and the connection it comes on.
pub struct Answering {
    body: Incoming,
    connection: SendRequest<Outgoing>,
    replica: Replica,
    /// The whole body was read.
    done: bool,
}

impl Answering {
    /// The next part of the answer's body (trailers are dropped), within
    /// the replica's read timeout; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            if self.body.is_end_stream() {
                self.done = true;
                return Ok(None);
            }
            let frame = match self.replica.read_timeout {
                Some(t) => tokio::time::timeout(t, self.body.frame()).await.map_err(|_| UpstreamError::ReadTimeout)?,
                None => self.body.frame().await,
            };
            match frame {
                None => {
                    self.done = true;
                    return Ok(None);
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.body.is_end_stream() {
                            self.done = true;
                        }
                        return Ok(Some(data));
                    }
                }
                Some(Err(e)) => return Err(UpstreamError::Http(e)),
            }
        }
    }

    /// The answer `answer` on `connection`, for the idle pool's tests.
    #[cfg(test)]
    pub(super) fn for_tests(answer: http::Response<Incoming>, connection: Connection, replica: Replica) -> Self {
        Answering { body: answer.into_body(), connection: connection.sender, replica, done: false }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Give the connection back to `idle` if its answer was read whole;
    /// else it is closed.
    pub fn release(self, idle: &IdlePool) {
        if self.done {
            idle.release(self.connection, &self.replica);
        }
    }
}

/// A request whose head (and body) went to a replica, and whose answer's
/// head came back.
pub struct Sent {
    /// The answer's head.
    pub head: http::response::Parts,
    /// Its body, to read.
    pub answer: Answering,
    /// The slot it holds (another than the first if a try failed).
    pub slot: Slot,
    /// The pool of that slot.
    pub pool: PoolId,
}

/// How one try at a replica failed before its answer began.
pub enum TryError {
    /// The edge answers this itself (the client went, or sent too much).
    Answer(Reject),
    /// The replica's side failed. On a reused pooled connection the request
    /// may go again ([`Failure::Reused`]) if its body can be sent again.
    Upstream {
        /// What failed.
        error: UpstreamError,
        /// Whether the body can be sent again.
        replayable: bool,
    },
}

/// What a try brought back: the answer, its body still to read.
pub type Answered = http::Response<Incoming>;

/// One try of a request to a replica: send it and read the answer's head.
pub trait Attempt: Send {
    /// Make the try on `connection` to `replica`.
    fn attempt<'a>(
        &'a mut self,
        connection: &'a mut Connection,
        replica: &'a Replica,
    ) -> Pin<Box<dyn Future<Output = Result<Answered, TryError>> + Send + 'a>>;

    /// Whether the request can be sent again after a try that was answered.
    fn replayable(&self) -> bool {
        true
    }
}

/// Send the head `head` and the whole `body` on `slot` of `pool`, trying
/// another replica (or a fresh connection) as the response policy allows,
/// and read the answer's head.
#[allow(clippy::too_many_arguments)]
pub async fn send_whole(
    idle: &IdlePool,
    live: &Arc<Live>,
    service: Option<ServiceId>,
    slot: Slot,
    pool: PoolId,
    head: &http::request::Parts,
    body: &Bytes,
    rehold: Option<&Rehold<'_>>,
) -> Result<Sent, Reject> {
    send_with_retries(idle, live, service, slot, pool, &mut Whole { head, body }, rehold).await
}

/// A request whose head and body the edge holds whole.
struct Whole<'r> {
    head: &'r http::request::Parts,
    body: &'r Bytes,
}

impl Attempt for Whole<'_> {
    fn attempt<'a>(
        &'a mut self,
        connection: &'a mut Connection,
        replica: &'a Replica,
    ) -> Pin<Box<dyn Future<Output = Result<Answered, TryError>> + Send + 'a>> {
        Box::pin(async move {
            let request = http::Request::from_parts(self.head.clone(), Outgoing::Whole(Some(self.body.clone())));
            match answer_head(replica, connection.send(request)).await {
                Ok(answer) => Ok(answer),
                Err(error) => Err(TryError::Upstream { error, replayable: true }),
            }
        })
    }
}

/// Make one `attempt` (send the request, read the answer's head) on `slot`
/// of `pool`, and further ones on another replica or a fresh connection
/// while the response policy allows: the one retry loop of every protocol.
pub async fn send_with_retries(
    idle: &IdlePool,
    live: &Arc<Live>,
    service: Option<ServiceId>,
    mut slot: Slot,
    mut pool: PoolId,
    attempt: &mut dyn Attempt,
    rehold: Option<&Rehold<'_>>,
) -> Result<Sent, Reject> {
    let mut attempts = Attempts::default();
    loop {
        attempts.start();
        let replica = self::replica(slot.replica().addr, live.snapshot.network.pool(pool));
        let (failure, e, replayable) = match idle.connection(&replica).await {
            Err(e) => {
                policy::mark_down(&slot, &e);
                (Failure::Connect, e, true)
            }
            Ok(mut connection) => match attempt.attempt(&mut connection, &replica).await {
                Ok(answer) => {
                    // A replica of a pool with a light depth that answers
                    // 503 went to light sleep as the request was sent (its
                    // home edge put it there; this edge's probe has not
                    // seen it yet): out of rotation here, and the request
                    // goes elsewhere, or waits for a wake, as a new one.
                    if replica.sleeps_lightly
                        && answer.status() == http::StatusCode::SERVICE_UNAVAILABLE
                        && attempts.may_retry(Failure::Connect, attempt.replayable())
                    {
                        policy::mark_asleep(&slot);
                        live.pool(pool).note_depth();
                        if let Some((p, s)) = Box::pin(admit::retry(live, service, rehold)).await {
                            drop((answer, connection));
                            pool = p;
                            slot = s;
                            continue;
                        }
                    }
                    let (head, body) = answer.into_parts();
                    let answer = Answering { body, connection: connection.sender, replica, done: false };
                    return Ok(Sent { head, answer, slot, pool });
                }
                // The connection is closed with `connection`.
                Err(TryError::Answer(reject)) => return Err(reject),
                Err(TryError::Upstream { error, replayable }) => {
                    let failure =
                        if connection.reused && !error.is_timeout() { Failure::Reused } else { Failure::Other };
                    (failure, error, replayable)
                }
            },
        };
        drop(slot);
        let retry = if attempts.may_retry(failure, replayable) {
            Box::pin(admit::retry(live, service, rehold)).await
        } else {
            None
        };
        match retry {
            Some((p, s)) => {
                pool = p;
                slot = s;
            }
            None => return Err(policy::upstream_failure(&e)),
        }
    }
}
