//! The HTTP/1.1 and HTTP/2 adapter: a pingora-core `ServerSession` as the
//! forwarding engine's [`Client`]. It translates between the session and
//! the engine, and holds no policy.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use stoke_config::Route;

use super::engine::{Client, Framing};
use super::policy::{self, Answer};
use super::request::Downstream;
use crate::error::Reject;
use crate::state::Held;

/// How often the socket of a held HTTP/1.1 request whose body is unread
/// is looked at for the client's leaving.
const GONE_POLL: Duration = Duration::from_millis(100);

/// Linux TCP states (`include/net/tcp_states.h`): the peer sent FIN, and
/// the connection was reset or closed.
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_CLOSE: u8 = 7;

/// How long a lingering close reads the rest of an unread request body.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much of an unread request body a lingering close reads at most.
const LINGER_BYTES: usize = 16 << 20;

/// One request on a pingora session, HTTP/1.1 or HTTP/2.
pub struct Http<'a> {
    session: &'a mut ServerSession,
    /// `Expect: 100-continue` was answered here.
    continued: bool,
    /// What a body read here holds of the edge's body budget.
    held: Held,
}

impl<'a> Http<'a> {
    /// The request whose head `session` has read; a body read to find its
    /// service is counted against `held`.
    pub fn new(session: &'a mut ServerSession, held: Held) -> Self {
        Http { session, continued: false, held }
    }

    fn req(&self) -> &RequestHeader {
        self.session.req_header()
    }

    /// Answer `Expect: 100-continue` before the body is read.
    async fn continue_body(&mut self) -> Result<(), Reject> {
        if self.continued || !self.expects_continue() {
            return Ok(());
        }
        self.session
            .write_continue_response()
            .await
            .map_err(|e| Reject::client(400, "client_gone", format!("could not answer Expect: {e}")))?;
        self.continued = true;
        Ok(())
    }

    fn expects_continue(&self) -> bool {
        self.session.get_header(EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    }

    /// A lingering close (RFC 9112, section 9.6): after an answer that left
    /// the request body unread, read and drop what the client is still
    /// sending, for a bounded time and size, before the connection closes.
    /// Closing a socket with unread data makes the kernel reset the
    /// connection, and a client still busy sending its body would then see
    /// a broken pipe instead of the answer. HTTP/2 needs none of this: the
    /// stream is reset, not the connection. A client waiting on
    /// `Expect: 100-continue` sends nothing more.
    async fn linger(&mut self) {
        if self.session.is_http2() || (self.session.get_header(EXPECT).is_some() && !self.continued) {
            return;
        }
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut read = 0;
        while read < LINGER_BYTES {
            match tokio::time::timeout_at(deadline, self.session.read_request_body()).await {
                Ok(Ok(Some(chunk))) => read += chunk.len(),
                _ => break,
            }
        }
    }
}

#[async_trait::async_trait]
impl Downstream for Http<'_> {
    fn host(&self) -> &str {
        request_host(self.req()).unwrap_or("")
    }

    fn path(&self) -> &str {
        self.req().uri.path()
    }

    fn method(&self) -> &str {
        self.req().method.as_str()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.session.get_header(name).map(|v| v.as_bytes())
    }

    fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())
    }

    async fn read_body(&mut self, limit: u64) -> Result<Bytes, Reject> {
        let mut whole = policy::WholeBody::new(self.session.get_header(CONTENT_LENGTH), limit)?;
        self.continue_body().await?;
        loop {
            match self.session.read_request_body().await {
                Ok(Some(chunk)) => whole.add(&chunk, &mut self.held)?,
                Ok(None) => return Ok(whole.done()),
                Err(e) => return Err(policy::body_read_failed(e)),
            }
        }
    }

    async fn gone(&mut self) {
        // HTTP/2: a reset stream or a closed connection shows whether or not
        // the body was read. HTTP/1.1 with its body read: the connection's
        // end (or a reset) is the next thing it reads.
        if self.session.is_http2() || self.session.is_body_done() {
            let _ = self.session.read_body_or_idle(true).await;
            return;
        }
        // HTTP/1.1 with its body still unread: reading would take the body
        // from the replica, so the socket's state is polled instead — a FIN
        // from the client (CLOSE_WAIT) or a reset (CLOSE) shows there with
        // the body still unread.
        loop {
            tokio::time::sleep(GONE_POLL).await;
            let state = self.session.digest().and_then(|d| d.socket_digest.as_ref()).and_then(|s| s.tcp_info());
            match state {
                Some(info) if info.tcpi_state == TCP_CLOSE_WAIT || info.tcpi_state == TCP_CLOSE => return,
                Some(_) => {}
                // No TCP state to read (not a TCP socket): not watched.
                None => std::future::pending::<()>().await,
            }
        }
    }
}

impl Client for Http<'_> {
    fn protocol(&self) -> &'static str {
        if self.session.is_http2() {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        }
    }

    fn over_tls(&self) -> bool {
        self.session.digest().is_some_and(|d| d.ssl_digest.is_some())
    }

    fn head_size(&self) -> (usize, usize) {
        policy::head_counts(&self.req().uri, &self.req().headers)
    }

    async fn body_start(&mut self) -> Result<(Option<Bytes>, bool), Reject> {
        if self.session.is_body_done() {
            return Ok((None, false));
        }
        // The edge says "continue" itself once it forwards the request.
        self.continue_body().await?;
        Ok((None, true))
    }

    async fn body_chunk(&mut self) -> Result<Option<Bytes>, Reject> {
        self.session.read_request_body().await.map_err(|e| {
            if policy::client_gone(&e) {
                Reject::client_gone()
            } else {
                policy::body_read_failed(e)
            }
        })
    }

    fn upstream_head(
        &self,
        request_id: &str,
        route: Option<&Route>,
        body: Framing,
    ) -> Result<http::request::Parts, Reject> {
        let from = self.req();
        let tls = self.over_tls();
        super::engine::replica_head(from.as_owned_parts(), self.client_ip(), tls, request_id, route, body)
    }

    async fn send_head(&mut self, head: http::response::Parts) -> bool {
        let reason = head.extensions.get::<hyper::ext::ReasonPhrase>().cloned();
        let mut head = ResponseHeader::from(head);
        if let Some(reason) = reason.as_ref().and_then(|r| std::str::from_utf8(r.as_bytes()).ok()) {
            if head.set_reason_phrase(Some(reason)).is_err() {
                return false;
            }
        }
        if !self.session.is_http2() {
            // An answer framed by the replica's closing its connection goes
            // chunked, so that the client's connection can be reused.
            let no_body = self.req().method == http::Method::HEAD
                || matches!(head.status.as_u16(), 204 | 304)
                || head.status.is_informational();
            if !no_body && !head.headers.contains_key(TRANSFER_ENCODING) && !head.headers.contains_key(CONTENT_LENGTH) {
                head.set_version(http::Version::HTTP_11);
                if head.insert_header(TRANSFER_ENCODING, "chunked").is_err() {
                    return false;
                }
            }
        }
        self.session.write_response_header(Box::new(head)).await.is_ok()
    }

    async fn send_body(&mut self, chunk: Bytes) -> bool {
        self.session.write_response_body(chunk, false).await.is_ok()
    }

    async fn finish(&mut self) {
        let _ = self.session.finish_body().await;
    }

    async fn abort(&mut self) {
        // HTTP/1.1: the connection closes before the answer's end; HTTP/2:
        // the stream is reset.
        self.session.set_keepalive(None);
        self.session.shutdown().await;
    }

    async fn closed(&mut self) {
        let _ = self.session.read_body_or_idle(true).await;
    }

    async fn answer(&mut self, answer: Answer) {
        let Ok(mut resp) = ResponseHeader::build(answer.status, Some(answer.headers.len())) else { return };
        for (name, value) in answer.headers {
            let _ = resp.insert_header(name, value);
        }
        let unread = !self.session.is_body_done();
        if unread {
            // The unread body stays on the connection: it cannot be reused.
            self.session.set_keepalive(None);
        }
        if self.session.write_response_header(Box::new(resp)).await.is_ok()
            && self.session.write_response_body(answer.body, true).await.is_ok()
            && unread
        {
            self.linger().await;
        }
    }
}

fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers.get(HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri.authority().map(|a| a.as_str()))
}
