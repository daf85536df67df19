//! How replicas are reached: pooled HTTP/1.1 connections with the pool's
//! timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use pingora::prelude::HttpPeer;
use stoke_config::Pool;

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
