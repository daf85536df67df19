//! The transport under each accepted connection: pingora-core's TCP stream
//! with a write buffer of one segment in front of it, as pingora's own
//! listener gives it (`L4BufferSettings`), so that an answer's head and a
//! small body leave in one `write`. pingora-core sizes a stream's buffers
//! only inside its own accept loop; [`super::listener`] runs one of its own
//! (see there), so the buffer is put here.
//!
//! There is no read buffer: pingora's default one (64 KiB, zeroed when
//! allocated) was a third of what an open stream cost, and would buffer
//! nothing twice that the layers above do not: the HTTP/1 session reads its
//! head into a buffer of its own, rustls and h2 read records and frames
//! into theirs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::DEFAULT_L4_WRITE_BUFFER_SIZE;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, TimingDigest, UniqueID,
    UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};

/// An accepted TCP connection, its writes buffered up to one segment
/// (flushed by the protocol layers above, as they flush pingora's).
#[derive(Debug)]
pub struct Buffered(BufWriter<L4Stream>);

impl Buffered {
    /// Put the write buffer in front of `stream`.
    pub fn new(stream: L4Stream) -> Self {
        Buffered(BufWriter::with_capacity(DEFAULT_L4_WRITE_BUFFER_SIZE, stream))
    }

    fn inner(&self) -> &L4Stream {
        self.0.get_ref()
    }
}

impl AsyncRead for Buffered {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Buffered {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Buffered {
    async fn shutdown(&mut self) {
        // What is buffered goes first (`BufWriter` flushes on shutdown).
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.0).await {
            tracing::debug!(error = %e, "shutting a client connection down");
        }
    }
}

impl UniqueID for Buffered {
    fn id(&self) -> UniqueIDType {
        self.inner().id()
    }
}

impl Ssl for Buffered {}

#[async_trait]
impl Peek for Buffered {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.0.get_mut().try_peek(buf).await
    }
}

impl GetTimingDigest for Buffered {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner().get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner().get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner().get_write_pending_time()
    }
}

impl GetProxyDigest for Buffered {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner().get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.0.get_mut().set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Buffered {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner().get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.0.get_mut().set_socket_digest(digest)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use pingora::protocols::l4::listener::Listener;
    use tokio::io::AsyncReadExt;

    /// A connected pair: the accepted side as pingora's listener gives it,
    /// and the client's socket, plain `std` so that a read can be tried
    /// without waiting (tokio's `try_read` answers from readiness it has
    /// seen, not from the socket). Reads after that wait at most 10 s.
    async fn pair() -> (Buffered, std::net::TcpStream) {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = Listener::from(tcp);
        // A loopback connect completes in the listener's backlog.
        let client = std::net::TcpStream::connect(addr).expect("connect");
        client.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let accepted = listener.accept().await.expect("accept");
        (Buffered::new(accepted), client)
    }

    #[tokio::test]
    async fn writes_wait_for_a_flush_and_the_peer_is_known() {
        let (mut server, mut client) = pair().await;
        let peer = server.get_socket_digest().and_then(|d| d.peer_addr().cloned());
        assert_eq!(
            peer.and_then(|a| a.as_inet().copied()),
            Some(client.local_addr().expect("client addr")),
            "the socket digest (the client's address) comes through"
        );
        server.write_all(b"head ").await.expect("write");
        server.write_all(b"body").await.expect("write");
        // On loopback a write is in the peer's receive queue when it
        // returns: had either gone out, this read would find it.
        client.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 16];
        let early = client.read(&mut buf);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "nothing leaves before the flush: {early:?}"
        );
        client.set_nonblocking(false).expect("blocking");
        server.flush().await.expect("flush");
        let mut got = vec![0u8; 9];
        client.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"head body");
    }

    #[tokio::test]
    async fn a_peek_is_read_again_and_shutdown_flushes() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"PRI * x").expect("write");
        let mut peeked = [0u8; 3];
        assert!(server.try_peek(&mut peeked).await.expect("peek"));
        assert_eq!(&peeked, b"PRI");
        let mut all = [0u8; 7];
        server.read_exact(&mut all).await.expect("read");
        assert_eq!(&all, b"PRI * x", "what was peeked is read again");
        server.write_all(b"bye").await.expect("write");
        Shutdown::shutdown(&mut server).await;
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).expect("read to the end");
        assert_eq!(rest, b"bye");
    }
}
