//! A small HTTP/1.1 client for the edge's own calls: health probes, load
//! scrapes and hooks. One connection per call, every step under a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Most bytes read from a probe, scrape or hook answer.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The whole call took longer than its timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// TCP connect failed.
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP error: {0}")]
    Http(String),
}

/// An answer.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// Body (at most [`MAX_RESPONSE_BYTES`]).
    pub body: Bytes,
    /// Time to set up the TCP connection.
    pub connect: Duration,
    /// Time from sending the request to the response head: one round trip
    /// plus the server's time to answer.
    pub first_byte: Duration,
}

/// `GET http://{addr}{path}`.
pub async fn get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> Result<Answer, ClientError> {
    call(addr, Method::GET, host, path, None, Bytes::new(), timeout).await
}

/// One request over a fresh connection to `addr`.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    host: &str,
    path: &str,
    bearer: Option<&str>,
    body: Bytes,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let exchange = async {
        let started = std::time::Instant::now();
        let stream = TcpStream::connect(addr).await.map_err(ClientError::Connect)?;
        let connect = started.elapsed();
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, concat!("stoke/", env!("CARGO_PKG_VERSION")));
        if !body.is_empty() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(body)).map_err(|e| ClientError::Http(e.to_string()))?;
        let sent = std::time::Instant::now();
        let resp = sender.send_request(req).await.map_err(|e| ClientError::Http(e.to_string()))?;
        let first_byte = sent.elapsed();
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        conn.abort();
        Ok(Answer { status, body, connect, first_byte })
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(ClientError::Timeout(timeout)))
}
