//! HTTP/3's QUIC layer: h3's transport traits (`h3::quic`) over quinn.
//!
//! The edge has its own implementation rather than h3-quinn's so that a
//! client that stops reading a response (STOP_SENDING) is seen at once,
//! also while its request is still held and nothing has been written yet:
//! every request stream's `stopped()` signal is kept in a [`Stops`] table
//! that the request's handler takes by stream id. h3-quinn keeps the quinn
//! streams private, and reports STOP_SENDING only at the first write.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + Sync>>;

/// Largest chunk read from a stream at once.
const READ_CHUNK: usize = 16 * 1024;

/// Resolves when the client stops reading a stream, or the stream is done
/// with (it then never resolves).
pub type Stopped = BoxFuture<()>;

/// The STOP_SENDING signals of one connection's request streams, by stream id.
#[derive(Default)]
pub struct Stops(Mutex<HashMap<u64, Stopped>>);

impl Stops {
    /// The signal of stream `id`, once (later calls get one that never
    /// resolves).
    pub fn take(&self, id: u64) -> Stopped {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        taken.unwrap_or_else(|| Box::pin(std::future::pending()))
    }

    fn put(&self, id: u64, stopped: Stopped) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id, stopped);
    }
}

impl std::fmt::Debug for Stops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stops")
    }
}

/// A QUIC connection as h3 sees it.
pub struct Connection {
    conn: quinn::Connection,
    stops: Arc<Stops>,
    accept_bi: Option<BoxFuture<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>>,
    accept_uni: Option<BoxFuture<Result<quinn::RecvStream, quinn::ConnectionError>>>,
    opener: Opener,
}

impl Connection {
    /// h3 over `conn`; request streams' STOP_SENDING signals go to `stops`.
    pub fn new(conn: quinn::Connection, stops: Arc<Stops>) -> Self {
        Connection { opener: Opener::new(conn.clone()), conn, stops, accept_bi: None, accept_uni: None }
    }
}

/// Opens streams of a connection (h3's control and QPACK streams).
pub struct Opener {
    conn: quinn::Connection,
    open_bi: Option<BoxFuture<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>>>,
    open_uni: Option<BoxFuture<Result<quinn::SendStream, quinn::ConnectionError>>>,
}

impl Opener {
    fn new(conn: quinn::Connection) -> Self {
        Opener { conn, open_bi: None, open_uni: None }
    }
}

fn connection_error(e: quinn::ConnectionError) -> ConnectionErrorIncoming {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ConnectionErrorIncoming::ApplicationClose { error_code: close.error_code.into_inner() }
        }
        quinn::ConnectionError::TimedOut => ConnectionErrorIncoming::Timeout,
        other => ConnectionErrorIncoming::Undefined(Arc::new(other)),
    }
}

fn stream_error_of_connection(e: quinn::ConnectionError) -> StreamErrorIncoming {
    StreamErrorIncoming::ConnectionErrorIncoming { connection_error: connection_error(e) }
}

fn stream_id(id: quinn::StreamId) -> StreamId {
    // quinn's ids are QUIC stream ids, below 2^62, which h3 always takes.
    #[allow(clippy::expect_used)]
    StreamId::try_from(u64::from(id)).expect("a QUIC stream id")
}

/// Poll a future kept in `slot`, made by `make` when there is none; the
/// slot is emptied once it completes.
fn poll_slot<T>(slot: &mut Option<BoxFuture<T>>, cx: &mut Context<'_>, make: impl FnOnce() -> BoxFuture<T>) -> Poll<T> {
    let fut = slot.get_or_insert_with(make);
    match fut.as_mut().poll(cx) {
        Poll::Ready(v) => {
            *slot = None;
            Poll::Ready(v)
        }
        Poll::Pending => Poll::Pending,
    }
}

impl<B: Buf> h3::quic::Connection<B> for Connection {
    type RecvStream = RecvStream;
    type OpenStreams = Opener;

    fn poll_accept_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<RecvStream, ConnectionErrorIncoming>> {
        let conn = self.conn.clone();
        poll_slot(&mut self.accept_uni, cx, || Box::pin(async move { conn.accept_uni().await }))
            .map(|r| r.map(RecvStream::new).map_err(connection_error))
    }

    fn poll_accept_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<BidiStream<B>, ConnectionErrorIncoming>> {
        let conn = self.conn.clone();
        poll_slot(&mut self.accept_bi, cx, || Box::pin(async move { conn.accept_bi().await })).map(|r| {
            let (send, recv) = r.map_err(connection_error)?;
            // Kept for the request's handler: resolves on STOP_SENDING (or
            // a lost connection), never once the stream simply ends.
            let stopped = send.stopped();
            self.stops.put(
                u64::from(send.id()),
                Box::pin(async move {
                    match stopped.await {
                        Ok(Some(_)) | Err(_) => {}
                        Ok(None) => std::future::pending::<()>().await,
                    }
                }),
            );
            Ok(BidiStream { send: SendStream::new(send), recv: RecvStream::new(recv) })
        })
    }

    fn opener(&self) -> Opener {
        Opener::new(self.conn.clone())
    }
}

impl<B: Buf> h3::quic::OpenStreams<B> for Connection {
    type BidiStream = BidiStream<B>;
    type SendStream = SendStream<B>;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<BidiStream<B>, StreamErrorIncoming>> {
        h3::quic::OpenStreams::<B>::poll_open_bidi(&mut self.opener, cx)
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<SendStream<B>, StreamErrorIncoming>> {
        h3::quic::OpenStreams::<B>::poll_open_send(&mut self.opener, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        h3::quic::OpenStreams::<B>::close(&mut self.opener, code, reason);
    }
}

impl<B: Buf> h3::quic::OpenStreams<B> for Opener {
    type BidiStream = BidiStream<B>;
    type SendStream = SendStream<B>;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<BidiStream<B>, StreamErrorIncoming>> {
        let conn = self.conn.clone();
        poll_slot(&mut self.open_bi, cx, || Box::pin(async move { conn.open_bi().await })).map(|r| {
            let (send, recv) = r.map_err(stream_error_of_connection)?;
            Ok(BidiStream { send: SendStream::new(send), recv: RecvStream::new(recv) })
        })
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<SendStream<B>, StreamErrorIncoming>> {
        let conn = self.conn.clone();
        poll_slot(&mut self.open_uni, cx, || Box::pin(async move { conn.open_uni().await }))
            .map(|r| r.map(SendStream::new).map_err(stream_error_of_connection))
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        let code = quinn::VarInt::from_u64(code.value()).unwrap_or(quinn::VarInt::MAX);
        self.conn.close(code, reason);
    }
}

/// The sending half of a stream.
pub struct SendStream<B: Buf> {
    stream: quinn::SendStream,
    writing: Option<WriteBuf<B>>,
}

impl<B: Buf> SendStream<B> {
    fn new(stream: quinn::SendStream) -> Self {
        SendStream { stream, writing: None }
    }
}

fn write_error(e: quinn::WriteError) -> StreamErrorIncoming {
    match e {
        quinn::WriteError::Stopped(code) => StreamErrorIncoming::StreamTerminated { error_code: code.into_inner() },
        quinn::WriteError::ConnectionLost(e) => stream_error_of_connection(e),
        other => StreamErrorIncoming::Unknown(Box::new(other)),
    }
}

impl<B: Buf> h3::quic::SendStream<B> for SendStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        while let Some(buf) = self.writing.as_mut() {
            if !buf.has_remaining() {
                self.writing = None;
                break;
            }
            match Pin::new(&mut self.stream).poll_write(cx, buf.chunk()) {
                Poll::Ready(Ok(n)) => buf.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(write_error(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        if self.writing.is_some() {
            return Err(StreamErrorIncoming::Unknown("a write is already under way".into()));
        }
        self.writing = Some(data.into());
        Ok(())
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        if self.writing.is_some() {
            std::task::ready!(h3::quic::SendStream::<B>::poll_ready(self, cx))?;
        }
        Poll::Ready(self.stream.finish().map_err(|e| StreamErrorIncoming::Unknown(Box::new(e))))
    }

    fn reset(&mut self, reset_code: u64) {
        let _ = self.stream.reset(quinn::VarInt::from_u64(reset_code).unwrap_or(quinn::VarInt::MAX));
    }

    fn send_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}

/// The receiving half of a stream.
pub struct RecvStream {
    stream: quinn::RecvStream,
    buf: Box<[u8]>,
}

impl RecvStream {
    fn new(stream: quinn::RecvStream) -> Self {
        RecvStream { stream, buf: vec![0u8; READ_CHUNK].into_boxed_slice() }
    }
}

impl h3::quic::RecvStream for RecvStream {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        match self.stream.poll_read(cx, &mut self.buf) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(None)),
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(Some(Bytes::copy_from_slice(&self.buf[..n])))),
            Poll::Ready(Err(quinn::ReadError::Reset(code))) => {
                Poll::Ready(Err(StreamErrorIncoming::StreamTerminated { error_code: code.into_inner() }))
            }
            Poll::Ready(Err(quinn::ReadError::ConnectionLost(e))) => Poll::Ready(Err(stream_error_of_connection(e))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(e)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn stop_sending(&mut self, error_code: u64) {
        let _ = self.stream.stop(quinn::VarInt::from_u64(error_code).unwrap_or(quinn::VarInt::MAX));
    }

    fn recv_id(&self) -> StreamId {
        stream_id(self.stream.id())
    }
}

/// Both halves of a request stream.
pub struct BidiStream<B: Buf> {
    send: SendStream<B>,
    recv: RecvStream,
}

impl<B: Buf> h3::quic::SendStream<B> for BidiStream<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

impl<B: Buf> h3::quic::RecvStream for BidiStream<B> {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        self.recv.poll_data(cx)
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl<B: Buf> h3::quic::BidiStream<B> for BidiStream<B> {
    type SendStream = SendStream<B>;
    type RecvStream = RecvStream;

    fn split(self) -> (SendStream<B>, RecvStream) {
        (self.send, self.recv)
    }
}
