//! Idle upstream connections: HTTP/1.1 connections to replicas kept open
//! between requests, newest first per replica, each until its replica's
//! idle timeout.
//!
//! A kept connection is hyper's `SendRequest`, owned by the pool alone
//! (its connection future runs in a task of its own, which ends when the
//! socket closes): taking one is a pop under a lock and a check that its
//! connection still lives and is idle, with no system call; a sweep
//! ([`run`]) closes those whose replica hung up or whose time is over.
//! A connection goes back only when its answer was read to the end
//! ([`super::upstream::Answering::release`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::upstream::{Connection, Outgoing, Replica, UpstreamError};

/// How often [`run`] looks over the idle connections.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The idle connections of one edge, for all its replicas.
pub struct IdlePool {
    idle: Mutex<Idle>,
    /// At most this many idle connections are kept, over all replicas.
    capacity: usize,
}

#[derive(Default)]
struct Idle {
    /// Per replica, oldest first.
    by_replica: HashMap<SocketAddr, Vec<Parked>>,
    /// Connections in `by_replica`.
    count: usize,
}

struct Parked {
    sender: SendRequest<Outgoing>,
    /// When it is closed if still unused.
    until: Instant,
}

impl IdlePool {
    /// A pool keeping at most `capacity` idle connections.
    pub fn new(capacity: usize) -> Self {
        IdlePool { idle: Mutex::default(), capacity }
    }

    /// A connection to `replica`: its newest usable idle one, else a new
    /// one.
    pub async fn connection(&self, replica: &Replica) -> Result<Connection, UpstreamError> {
        while let Some(parked) = self.take(replica.addr) {
            let mut sender = parked.sender;
            if parked.until <= Instant::now() || sender.is_closed() {
                continue;
            }
            // Given back as its answer ended: its connection's task may
            // not have seen that end yet.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok(Connection { sender, reused: true });
            }
        }
        // Boxed: connecting is a large future, and a request that reuses a
        // connection should not carry its room.
        Box::pin(Connection::open(replica)).await
    }

    /// Keep `sender`, whose answer was read whole, for the next request to
    /// `replica`; close it if the pool is full.
    pub fn release(&self, sender: SendRequest<Outgoing>, replica: &Replica) {
        if sender.is_closed() {
            return;
        }
        let parked = Parked { sender, until: Instant::now() + replica.idle_timeout };
        let refused = {
            let mut idle = self.idle.lock();
            if idle.count < self.capacity {
                idle.count += 1;
                idle.by_replica.entry(replica.addr).or_default().push(parked);
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

    /// Idle connections kept now to the replica at `addr`.
    pub fn len_for(&self, addr: SocketAddr) -> usize {
        self.idle.lock().by_replica.get(&addr).map_or(0, Vec::len)
    }

    /// Whether no idle connection is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Close the idle connections whose time is over or whose replica
    /// closed them. Returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut closed = Vec::new();
        {
            let mut idle = self.idle.lock();
            let Idle { by_replica, count } = &mut *idle;
            by_replica.retain(|_, list| {
                let mut i = 0;
                while i < list.len() {
                    if list[i].until <= now || list[i].sender.is_closed() {
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

    /// The newest parked connection to the replica at `addr`.
    fn take(&self, addr: SocketAddr) -> Option<Parked> {
        let mut idle = self.idle.lock();
        let parked = idle.by_replica.get_mut(&addr)?.pop()?;
        idle.count -= 1;
        Some(parked)
    }
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A replica on loopback answering every request with `ok`; it counts
    /// the connections it accepts and, if `close_after_one`, closes each
    /// connection after its first answer.
    async fn replica(close_after_one: bool) -> (Replica, Arc<AtomicUsize>) {
        replica_closing(close_after_one, None).await
    }

    /// As [`replica`]; with `close_on`, each connection is closed after its
    /// first answer only once `close_on` is notified.
    async fn replica_closing(
        close_after_one: bool,
        close_on: Option<Arc<tokio::sync::Notify>>,
    ) -> (Replica, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let close_on = close_on.clone();
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
                            if let Some(close_on) = &close_on {
                                close_on.notified().await;
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
        let replica = Replica {
            addr,
            connect_timeout: Some(Duration::from_secs(2)),
            read_timeout: Some(Duration::from_secs(2)),
            idle_timeout: Duration::from_secs(60),
            sleeps_lightly: false,
        };
        (replica, accepted)
    }

    /// One request on a connection from `pool`, its answer read whole, the
    /// connection given back. Returns whether the connection was reused.
    async fn exchange(pool: &IdlePool, peer: &Replica) -> bool {
        let (answering, reused) = exchange_open(pool, peer).await;
        answering.release(pool);
        reused
    }

    /// One request whose answer was read whole, its connection still held.
    async fn exchange_open(pool: &IdlePool, peer: &Replica) -> (super::super::upstream::Answering, bool) {
        let mut connection = pool.connection(peer).await.expect("connection");
        let reused = connection.reused;
        let request = http::Request::get("/").header("host", "replica").body(Outgoing::Empty).expect("head");
        let answer = super::super::upstream::answer_head(peer, connection.send(request)).await.expect("answer head");
        let mut answering = super::super::upstream::Answering::for_tests(answer, connection, *peer);
        let mut body = Vec::new();
        while let Some(chunk) = answering.chunk().await.expect("answer body") {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"ok");
        assert!(answering.is_done());
        (answering, reused)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_requests_share_one_connection() {
        let (peer, accepted) = replica(false).await;
        let pool = Arc::new(IdlePool::new(16));
        for i in 0..200 {
            // Each on a task of its own, as requests are: whichever worker
            // runs it takes the connection the last one gave back.
            let (p, r) = (pool.clone(), peer);
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
        // The replica has closed the connection: it is not kept (if its end
        // arrived before the answer's), or swept once its end arrives.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while {
            pool.sweep();
            !pool.is_empty()
        } {
            assert!(std::time::Instant::now() < deadline, "the closed connection is still kept");
            tokio::task::yield_now().await;
        }
        assert!(!exchange(&pool, &peer).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_connection_is_passed_over_when_taken() {
        let close = Arc::new(tokio::sync::Notify::new());
        let (peer, accepted) = replica_closing(false, Some(close.clone())).await;
        let pool = IdlePool::new(16);
        assert!(!exchange(&pool, &peer).await);
        assert_eq!(pool.len(), 1, "kept while the replica keeps it open");
        // Now the replica closes it; wait for its end to arrive.
        close.notify_one();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let dead = {
                let idle = pool.idle.lock();
                idle.by_replica.get(&peer.addr).expect("parked")[0].sender.is_closed()
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
        peer.connect_timeout = None;
        peer.read_timeout = None;
        peer.idle_timeout = Duration::from_secs(30);
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
        s1.release(&pool);
        s2.release(&pool);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.len(), 1);
        assert!(exchange(&pool, &peer).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
