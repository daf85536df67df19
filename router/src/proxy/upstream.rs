//! How replicas are reached: HTTP/1.1 connections with the pool's
//! timeouts, kept between requests ([`super::idle`]), and sending a request whose body the edge holds whole.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::{Peer, PeerOptions, Proxy};
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

/// The pingora peer for a replica of `pool`.
pub fn peer(addr: SocketAddr, pool: &Pool) -> Replica {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(pool.connect_timeout);
    peer.options.read_timeout = Some(pool.read_timeout);
    peer.options.write_timeout = Some(WRITE_TIMEOUT);
    peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
    Replica(peer)
}

/// A replica as pingora-core's connectors see it: an [`HttpPeer`] with
/// the pool's timeouts. The edge's own pool ([`super::idle`]) keys idle
/// connections by its reuse hash (address, TLS, SNI and options), the
/// whole identity of a replica. Where pingora's own pool is used (the
/// engine-loop prototype in the benches), a pooled connection is taken
/// without `getpeername`: pingora's `Peer::matches_fd` asks the kernel who
/// is at the other end (one system call per request) to guard against
/// colliding hashes, and a pooled socket's descriptor cannot meanwhile
/// name another socket.
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

/// A request whose head and whole body went to a replica, and whose
/// answer's head came back.
pub struct Sent {
    /// The upstream session, its answer's head read.
    pub session: HttpSession,
    /// The replica it is on.
    pub peer: Replica,
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
        error: pingora::BError,
        /// Whether the body can be sent again.
        replayable: bool,
    },
}

/// Send `head` and the whole `body` on `slot` of `pool`, trying another
/// replica (or a fresh connection) as the response policy allows, and read
/// the answer's head.
#[allow(clippy::too_many_arguments)]
pub async fn send_whole(
    idle: &IdlePool,
    live: &Arc<Live>,
    service: Option<ServiceId>,
    slot: Slot,
    pool: PoolId,
    head: &RequestHeader,
    body: &Bytes,
    rehold: Option<&Rehold<'_>>,
) -> Result<Sent, Reject> {
    send_with_retries(idle, live, service, slot, pool, &mut Whole { head, body }, rehold).await
}

/// One try of a request to a replica: send it and read the answer's head.
pub trait Attempt: Send {
    /// Make the try on `session` to `peer`.
    fn attempt<'a>(
        &'a mut self,
        session: &'a mut HttpSession,
        peer: &'a Replica,
    ) -> Pin<Box<dyn Future<Output = Result<(), TryError>> + Send + 'a>>;
}

/// A request whose head and body the edge holds whole.
struct Whole<'r> {
    head: &'r RequestHeader,
    body: &'r Bytes,
}

impl Attempt for Whole<'_> {
    fn attempt<'a>(
        &'a mut self,
        session: &'a mut HttpSession,
        peer: &'a Replica,
    ) -> Pin<Box<dyn Future<Output = Result<(), TryError>> + Send + 'a>> {
        Box::pin(async move {
            try_once(session, self.head, self.body, peer)
                .await
                .map_err(|error| TryError::Upstream { error, replayable: true })
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
        let peer = self::peer(slot.replica().addr, live.snapshot.network.pool(pool));
        let (failure, e, replayable) = match idle.session(&peer).await {
            Err(e) => {
                policy::mark_down(&slot, &e);
                (Failure::Connect, e, true)
            }
            Ok((mut session, reused)) => match attempt.attempt(&mut session, &peer).await {
                Ok(()) => return Ok(Sent { session, peer, slot, pool }),
                Err(TryError::Answer(reject)) => {
                    session.shutdown().await;
                    return Err(reject);
                }
                Err(TryError::Upstream { error, replayable }) => {
                    session.shutdown().await;
                    let timed_out = matches!(error.etype(), pingora::ErrorType::ReadTimedout);
                    (if reused && !timed_out { Failure::Reused } else { Failure::Other }, error, replayable)
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
            None if failure == Failure::Connect => {
                return Err(Reject::bad_gateway(format!("could not connect to a replica: {e}")))
            }
            None => return Err(policy::upstream_failure(&e.into_up())),
        }
    }
}

async fn try_once(
    session: &mut HttpSession,
    head: &RequestHeader,
    body: &Bytes,
    peer: &Replica,
) -> pingora::Result<()> {
    session.set_read_timeout(peer.0.options.read_timeout);
    session.set_write_timeout(peer.0.options.write_timeout);
    session.write_request_header(Box::new(head.clone())).await?;
    session.write_request_body(body.clone(), true).await?;
    session.finish_request_body().await?;
    loop {
        session.read_response_header().await?;
        if !session.response_header().is_some_and(|h| h.status.is_informational()) {
            return Ok(());
        }
    }
}
