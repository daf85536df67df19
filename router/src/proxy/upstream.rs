//! How replicas are reached: pooled HTTP/1.1 connections with the pool's
//! timeouts, and sending a request whose body the edge holds whole.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;
use stoke_config::{Pool, PoolId, ServiceId};

use super::policy::{self, Attempts, Failure};
use crate::error::Reject;
use crate::state::{Live, Slot};

/// Longest a write to a replica may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pingora peer for a replica of `pool`.
pub fn peer(addr: SocketAddr, pool: &Pool) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(pool.connect_timeout);
    peer.options.read_timeout = Some(pool.read_timeout);
    peer.options.write_timeout = Some(WRITE_TIMEOUT);
    peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
    peer
}

/// A request whose head and whole body went to a replica, and whose
/// answer's head came back.
pub struct Sent {
    /// The upstream session, its answer's head read.
    pub session: HttpSession,
    /// The replica it is on.
    pub peer: HttpPeer,
    /// The slot it holds (another than the first if a try failed).
    pub slot: Slot,
    /// The pool of that slot.
    pub pool: PoolId,
}

/// Send `head` and the whole `body` on `slot` of `pool`, trying another
/// replica (or a fresh connection) as the response policy allows, and read
/// the answer's head.
pub async fn send_whole(
    connector: &Connector,
    live: &Live,
    service: Option<ServiceId>,
    mut slot: Slot,
    mut pool: PoolId,
    head: &RequestHeader,
    body: &Bytes,
) -> Result<Sent, Reject> {
    let mut attempts = Attempts::default();
    loop {
        attempts.start();
        let peer = self::peer(slot.replica().addr, live.snapshot.network.pool(pool));
        let (failure, e) = match connector.get_http_session(&peer).await {
            Err(e) => {
                policy::mark_down(&slot, &e);
                (Failure::Connect, e)
            }
            Ok((mut session, reused)) => match try_once(&mut session, head, body, &peer).await {
                Ok(()) => return Ok(Sent { session, peer, slot, pool }),
                Err(e) => {
                    session.shutdown().await;
                    let timed_out = matches!(e.etype(), pingora::ErrorType::ReadTimedout);
                    (if reused && !timed_out { Failure::Reused } else { Failure::Other }, e)
                }
            },
        };
        drop(slot);
        let retry = if attempts.may_retry(failure, true) { policy::retry_slot(live, service) } else { None };
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
    peer: &HttpPeer,
) -> pingora::Result<()> {
    session.set_read_timeout(peer.options.read_timeout);
    session.set_write_timeout(peer.options.write_timeout);
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
