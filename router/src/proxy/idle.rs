//! Idle upstream connections: HTTP/1.1 connections to replicas kept open
//! between requests, newest first per replica, each until its replica's
//! idle timeout.
//!
//! New connections come from pingora-core's `TransportConnector` (connect
//! timeout, socket options); the keeping is the edge's own. pingora's pool
//! parks each connection behind an `Arc<Mutex<_>>` watched by a task of
//! its own, and takes it back with `Arc::try_unwrap` right after locking
//! it: under load that unwrap can lose a race with the watcher's guard
//! still holding its clone, and a healthy connection is then dropped and a
//! new one dialled (pingora issue 998). Here a parked connection is owned
//! by the pool alone: taking it is a pop under a lock, a check that it has
//! not been closed or sent anything, and no task per connection; a sweep
//! ([`run`]) closes those whose replica hung up or whose time is over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use pingora::connectors::TransportConnector;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::v1::client::HttpSession as Http1Session;
use pingora::protocols::Stream;
use pingora::upstreams::peer::Peer;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::upstream::{Replica, POOL_IDLE_TIMEOUT};

/// How often [`run`] looks over the idle connections.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The idle connections of one edge, for all its replicas.
pub struct IdlePool {
    transport: TransportConnector,
    idle: Mutex<Idle>,
    /// At most this many idle connections are kept, over all replicas.
    capacity: usize,
}

#[derive(Default)]
struct Idle {
    /// Per replica (its reuse hash), oldest first.
    by_replica: HashMap<u64, Vec<Parked>>,
    /// Connections in `by_replica`.
    count: usize,
}

struct Parked {
    stream: Stream,
    /// When it is closed if still unused.
    until: Instant,
}

impl IdlePool {
    /// A pool keeping at most `capacity` idle connections.
    pub fn new(capacity: usize) -> Self {
        IdlePool { transport: TransportConnector::new(None), idle: Mutex::default(), capacity }
    }

    /// A session to `peer`: on its newest usable idle connection, else on
    /// a new one. The flag says whether the connection was reused (a
    /// failure on it may then be the replica's keep-alive ending).
    pub async fn session(&self, peer: &Replica) -> pingora::Result<(HttpSession, bool)> {
        let key = peer.reuse_hash();
        while let Some(parked) = self.take(key) {
            let mut stream = parked.stream;
            if parked.until > Instant::now() && usable(&mut stream) {
                return Ok((HttpSession::H1(Http1Session::new_with_options(stream, peer)), true));
            }
        }
        // Boxed: connecting (TCP, maybe TLS) is a large future, and a
        // request that reuses a connection should not carry its room.
        let stream = Box::pin(self.transport.new_stream(peer)).await?;
        Ok((HttpSession::H1(Http1Session::new_with_options(stream, peer)), false))
    }

    /// Keep the connection of `session`, whose answer was read whole, for
    /// the next request to `peer`; close it if it cannot be reused or the
    /// pool is full.
    ///
    /// Not `async`: an exchange's future would carry the session's room
    /// (and pingora's `reuse` future's) for as long as its answer streams.
    /// pingora's `reuse` awaits only to shut a connection down that it will
    /// not give back; such a connection is closed here by dropping it.
    pub fn release(&self, session: HttpSession, peer: &Replica) {
        let HttpSession::H1(mut session) = session else { return };
        session.respect_keepalive();
        let Some(Some(stream)) = session.reuse().now_or_never() else { return };
        let until = Instant::now() + peer.0.options.idle_timeout.unwrap_or(POOL_IDLE_TIMEOUT);
        let parked = Parked { stream, until };
        let refused = {
            let mut idle = self.idle.lock();
            if idle.count < self.capacity {
                idle.count += 1;
                idle.by_replica.entry(peer.reuse_hash()).or_default().push(parked);
                None
            } else {
                Some(parked)
            }
        };
        // Closed outside the lock.
        drop(refused);
    }

    /// Idle connections kept now.
    pub fn len(&self) -> usize {
        self.idle.lock().count
    }

    /// Whether no idle connection is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Close the idle connections whose time is over or whose replica
    /// closed them (or sent something unasked). Returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut closed = Vec::new();
        {
            let mut idle = self.idle.lock();
            let Idle { by_replica, count } = &mut *idle;
            by_replica.retain(|_, list| {
                let mut i = 0;
                while i < list.len() {
                    if list[i].until <= now || !usable(&mut list[i].stream) {
                        closed.push(list.remove(i));
                    } else {
                        i += 1;
                    }
                }
                !list.is_empty()
            });
            *count -= closed.len();
        }
        closed.len()
    }

    /// The newest parked connection to the replica `key`.
    fn take(&self, key: u64) -> Option<Parked> {
        let mut idle = self.idle.lock();
        let parked = idle.by_replica.get_mut(&key)?.pop()?;
        idle.count -= 1;
        Some(parked)
    }
}

/// Whether an idle connection can carry a request: the replica has neither
/// closed it nor sent anything on it. Reads without waiting.
fn usable(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut byte)).now_or_never().is_none()
}

/// Sweep `pool` every [`SWEEP_EVERY`] until shutdown, when every idle
/// connection is closed.
pub async fn run(pool: Arc<IdlePool>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                pool.sweep();
            }
            _ = shutdown.changed() => break,
        }
    }
    // Taken under the lock, closed outside it.
    let all = std::mem::take(&mut *pool.idle.lock());
    drop(all);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use pingora::http::RequestHeader;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A replica on loopback answering every request with `ok`; it counts
    /// the connections it accepts and, if `close_after_one`, closes each
    /// connection after its first answer.
    async fn replica(close_after_one: bool) -> (Replica, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(n) = conn.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..n]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if conn.write_all(answer).await.is_err() {
                                return;
                            }
                            if close_after_one {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let mut peer = pingora::prelude::HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(2));
        peer.options.read_timeout = Some(Duration::from_secs(2));
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        (Replica(peer), accepted)
    }

    /// One request on a session from `pool`, its answer read whole, the
    /// session given back. Returns whether the connection was reused.
    async fn exchange(pool: &IdlePool, peer: &Replica) -> bool {
        let (session, reused) = exchange_open(pool, peer).await;
        pool.release(session, peer);
        reused
    }

    /// One request whose answer was read whole, its session still held.
    async fn exchange_open(pool: &IdlePool, peer: &Replica) -> (HttpSession, bool) {
        let (mut session, reused) = pool.session(peer).await.expect("session");
        let mut head = RequestHeader::build("GET", b"/", None).expect("head");
        head.insert_header("host", "replica").expect("host");
        session.write_request_header(Box::new(head)).await.expect("request head");
        session.finish_request_body().await.expect("request end");
        session.read_response_header().await.expect("answer head");
        let mut body = Vec::new();
        while let Some(chunk) = session.read_response_body().await.expect("answer body") {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"ok");
        assert!(session.response_done());
        (session, reused)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_requests_share_one_connection() {
        let (peer, accepted) = replica(false).await;
        let pool = Arc::new(IdlePool::new(16));
        for i in 0..200 {
            // Each on a task of its own, as requests are: whichever worker
            // runs it takes the connection the last one gave back.
            let (p, r) = (pool.clone(), peer.clone());
            let reused = tokio::spawn(async move { exchange(&p, &r).await }).await.expect("request task");
            assert_eq!(reused, i > 0, "request {i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_the_replica_closed_is_not_reused() {
        let (peer, accepted) = replica(true).await;
        let pool = IdlePool::new(16);
        assert!(!exchange(&pool, &peer).await);
        // The replica has closed the parked connection; wait until its end
        // has arrived, without taking the connection.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.sweep() == 0 {
            assert!(std::time::Instant::now() < deadline, "the closed connection is still kept");
            tokio::task::yield_now().await;
        }
        assert!(pool.is_empty());
        assert!(!exchange(&pool, &peer).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_connection_is_passed_over_when_taken() {
        let (peer, accepted) = replica(true).await;
        let pool = IdlePool::new(16);
        assert!(!exchange(&pool, &peer).await);
        // Give the replica's end of the connection time to arrive.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let dead = {
                let mut idle = pool.idle.lock();
                !usable(&mut idle.by_replica.get_mut(&peer.reuse_hash()).expect("parked")[0].stream)
            };
            if dead {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the replica's close never arrived");
            tokio::task::yield_now().await;
        }
        // Taking it finds it closed and dials a new one, without an error.
        assert!(!exchange(&pool, &peer).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_connections_last_their_idle_timeout() {
        let (mut peer, accepted) = replica(false).await;
        // No other timer than the idle timeout: the paused clock moves
        // only when told.
        peer.0.options.connection_timeout = None;
        peer.0.options.read_timeout = None;
        peer.0.options.idle_timeout = Some(Duration::from_secs(30));
        let pool = IdlePool::new(16);
        assert!(!exchange(&pool, &peer).await);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(pool.sweep(), 0);
        assert!(exchange(&pool, &peer).await, "reused within the timeout");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(pool.sweep(), 1);
        assert!(pool.is_empty());
        assert!(!exchange(&pool, &peer).await, "a new connection after the timeout");
        // Past the timeout, taking it (before any sweep) passes it over too.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!exchange(&pool, &peer).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_pool_closes_what_it_cannot_keep() {
        let (peer, accepted) = replica(false).await;
        let pool = IdlePool::new(1);
        // Two requests at once take two connections; one is kept after.
        let ((s1, _), (s2, _)) = tokio::join!(exchange_open(&pool, &peer), exchange_open(&pool, &peer));
        pool.release(s1, &peer);
        pool.release(s2, &peer);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.len(), 1);
        assert!(exchange(&pool, &peer).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
