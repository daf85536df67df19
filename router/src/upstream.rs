//! How replicas are reached: pooled HTTP/1.1 connections with timeouts
//! suited to inference (long generations, streams that pause).

use std::net::SocketAddr;
use std::time::Duration;

use pingora::prelude::HttpPeer;

/// Time to establish a TCP connection to a replica. Replicas are in the
/// same metro as their pool's location; a connect that takes longer than
/// this is a replica in trouble, and the request is better retried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest pause between two reads from a replica. Generation streams
/// pause while a batch is scheduled; five minutes covers the longest
/// prefill of a large context on a busy replica.
pub const READ_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest a write to a replica may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pingora peer for a replica.
pub fn peer(addr: SocketAddr) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
    peer.options.read_timeout = Some(READ_IDLE_TIMEOUT);
    peer.options.write_timeout = Some(WRITE_TIMEOUT);
    peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
    peer
}
