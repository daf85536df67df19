//! The response policy, one copy for every protocol: request ids, header
//! and body limits, forwarded and debug headers, the answers the edge
//! makes itself (status, JSON body, `Retry-After`, `WWW-Authenticate`,
//! `Alt-Svc`), the mapping of upstream failures to answers, and the retry
//! budget after a failed connection. The protocol adapters
//! ([`super::conn`] for HTTP/1.1 and HTTP/2, [`crate::h3`] for HTTP/3)
//! and the engine ([`super::engine`]) translate these into their own types
//! and hold no policy of their own.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;
use stoke_config::{EdgeSettings, PoolId};

use super::headers::{self, new_request_id, valid_request_id};
use super::upstream::UpstreamError;
use crate::error::{Origin, Reject};
use crate::state::{Live, Slot};

/// How many times one request may be sent to a replica whose connection
/// fails before anything is sent (the first try included).
pub const MAX_CONNECT_ATTEMPTS: u8 = 3;

/// The request id: the client's, if it sent an acceptable one, else new.
pub fn request_id(sent: Option<&[u8]>) -> RequestId {
    let bytes = match sent {
        Some(v) if valid_request_id(v) => headers::small_bytes(v),
        _ => new_request_id(),
    };
    RequestId(HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| HeaderValue::from_static("-")))
}

/// A request's id (visible ASCII), as text and as the header value that
/// goes to the replica and back to the client: copies of it share one
/// buffer.
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The id as a header value.
    pub fn value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        self.0.to_str().unwrap_or("-")
    }
}

impl From<&str> for RequestId {
    fn from(id: &str) -> Self {
        RequestId(value(id))
    }
}

/// A request head's field count and size ([`head_size`]), for an adapter
/// that holds it as a URI and a `HeaderMap`.
pub fn head_counts(uri: &http::Uri, fields: &HeaderMap) -> (usize, usize) {
    let bytes = head_size(uri.path_and_query().map_or("", |p| p.as_str()), uri.authority().map(|a| a.as_str()), fields);
    (fields.len(), bytes)
}

/// The size of a request head as the header limit counts it: the path and
/// query, the authority, and each field's name and value plus 4 (": " and
/// CRLF), whatever the protocol's own encoding.
pub fn head_size(path_and_query: &str, authority: Option<&str>, fields: &HeaderMap) -> usize {
    path_and_query.len().max(1)
        + authority.map_or(0, str::len)
        + fields.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>()
}

/// The header limits (`max_headers` fields, `max_header_bytes` bytes as
/// [`head_size`] counts them): 431 beyond either.
pub fn check_head(edge: &EdgeSettings, fields: usize, bytes: usize) -> Result<(), Reject> {
    if fields > edge.max_headers || bytes > edge.max_header_bytes {
        return Err(Reject::client(
            431,
            "headers_too_large",
            format!(
                "the request has {fields} header fields and {bytes} bytes of request line and headers; at most {} fields and {} bytes are accepted",
                edge.max_headers, edge.max_header_bytes
            ),
        ));
    }
    Ok(())
}

/// `CONNECT` asks for a tunnel, which the edge does not open (on every
/// protocol).
pub fn check_method(method: &str) -> Result<(), Reject> {
    if method == "CONNECT" {
        return Err(Reject::client(
            405,
            "method_not_allowed",
            "CONNECT is not served: the edge forwards requests, it does not open tunnels",
        ));
    }
    Ok(())
}

/// A declared body (`Content-Length`) over the route's `max_body`.
pub fn declared_too_large(len: u64, max_body: u64) -> Reject {
    Reject::client(
        413,
        "body_too_large",
        format!("the request body is {len} bytes; this route accepts at most {max_body} (max_body)"),
    )
}

/// A streamed body that went past the route's `max_body`.
pub fn streamed_too_large(max_body: u64) -> Reject {
    Reject::client(
        413,
        "body_too_large",
        format!("the request body exceeds {max_body} bytes, the most this route accepts (max_body)"),
    )
}

/// A body read to find the model that is `n` bytes or more, over the
/// route's `max_body_read`.
pub fn read_too_large(n: u64, limit: u64) -> Reject {
    Reject::client(
        413,
        "body_too_large",
        format!("the request body is {n} bytes or more; this route reads at most {limit} bytes of it to find the model (max_body_read)"),
    )
}

/// A body buffer that would pass the edge's `max_buffered_bodies`.
pub fn bodies_exhausted(e: crate::state::budget::Exhausted) -> Reject {
    Reject::unavailable(
        "body_budget_exhausted",
        format!(
            "the edge holds its maximum of {} bytes of request bodies in memory (max_buffered_bodies); try again shortly",
            e.max
        ),
        Duration::from_secs(1),
    )
}

/// Bytes of a streamed request body kept to send it again on a retry: a
/// try that fails after more than this went upstream cannot be repeated.
pub const RETRY_BUFFER: usize = 64 * 1024;

/// The most a body buffer starts with, whatever length the request declares.
const INITIAL_BODY_BUFFER: u64 = 16 * 1024;

/// A request body read whole to find its service: at most `limit` bytes
/// (413 beyond), a body without `Content-Length` at most the retry buffer
/// (411 beyond), every byte counted against the edge's body budget.
pub struct WholeBody {
    length: Option<u64>,
    limit: u64,
    buf: bytes::BytesMut,
}

impl WholeBody {
    /// A buffer for a body of the declared `content_length`, if any.
    pub fn new(content_length: Option<&HeaderValue>, limit: u64) -> Result<Self, Reject> {
        let length = match content_length {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| Reject::client(400, "invalid_content_length", "Content-Length is not a number"))?,
            ),
            None => None,
        };
        if let Some(n) = length.filter(|n| *n > limit) {
            return Err(read_too_large(n, limit));
        }
        // Grown as data arrives: a declared length is not allocated up front.
        let buf = bytes::BytesMut::with_capacity(length.unwrap_or(0).min(limit).min(INITIAL_BODY_BUFFER) as usize);
        Ok(WholeBody { length, limit, buf })
    }

    /// Add a part of the body, counted in `held`.
    pub fn add(&mut self, chunk: &[u8], held: &mut crate::state::Held) -> Result<(), Reject> {
        let n = (self.buf.len() + chunk.len()) as u64;
        if n > self.limit {
            return Err(read_too_large(n, self.limit));
        }
        if self.length.is_none() && n > RETRY_BUFFER as u64 {
            return Err(Reject::client(
                411,
                "length_required",
                format!("a body sent without Content-Length may be at most {} bytes when the route takes the model from it; send Content-Length", RETRY_BUFFER),
            ));
        }
        held.grow(chunk.len()).map_err(bodies_exhausted)?;
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The whole body.
    pub fn done(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Reading the request body from the client failed (not its leaving).
pub fn body_read_failed(e: impl std::fmt::Display) -> Reject {
    Reject::client(400, "body_read_failed", format!("reading the request body failed: {e}"))
}

/// Counts a body as it streams to the replica, against `max_body`.
#[derive(Clone, Copy, Debug)]
pub struct BodyCount {
    max: u64,
    sent: u64,
}

impl BodyCount {
    /// Nothing sent yet, under `max`.
    pub fn new(max: u64) -> Self {
        BodyCount { max, sent: 0 }
    }

    /// `n` more bytes; 413 once past the limit.
    pub fn add(&mut self, n: usize) -> Result<(), Reject> {
        self.sent = self.sent.saturating_add(n as u64);
        if self.sent > self.max {
            return Err(streamed_too_large(self.max));
        }
        Ok(())
    }
}

/// What the forwarded headers say about the client's request.
#[derive(Clone, Copy, Debug)]
pub struct Forwarded<'a> {
    /// The host the client asked for.
    pub host: Option<&'a str>,
    /// The client's address (the public edge is the first hop: a client's
    /// own `X-Forwarded-For` is not trusted, it is replaced).
    pub client: Option<IpAddr>,
    /// Whether the client came over TLS.
    pub tls: bool,
    /// The request id.
    pub request_id: &'a RequestId,
}

impl Forwarded<'_> {
    /// Set `x-forwarded-host`, `-for`, `-proto` and `x-request-id` through
    /// `set` (each adapter writes them into its own header type).
    pub fn apply<E>(&self, mut set: impl FnMut(&'static str, HeaderValue) -> Result<(), E>) -> Result<(), E> {
        if let Some(host) = self.host.and_then(|h| HeaderValue::from_str(h).ok()) {
            set(headers::FORWARDED_HOST, host)?;
        }
        if let Some(ip) = self.client {
            set(headers::FORWARDED_FOR, ip_value(ip))?;
        }
        set(headers::FORWARDED_PROTO, HeaderValue::from_static(if self.tls { "https" } else { "http" }))?;
        set(headers::REQUEST_ID, self.request_id.value())
    }
}

/// What the debug headers say about where a request went.
#[derive(Clone, Copy, Debug)]
pub struct Served<'a> {
    /// The pool, if one was chosen.
    pub pool: Option<PoolId>,
    /// The replica, if one was chosen.
    pub replica: Option<&'a str>,
    /// Time held for capacity or a wake.
    pub waited: Duration,
}

/// Set the debug headers (`stoke-edge`, `-pool`, `-replica`, `-wait-ms`)
/// through `set`, when the edge is configured to send them.
pub fn debug_headers<E>(
    live: &Live,
    served: Served<'_>,
    mut set: impl FnMut(&'static str, HeaderValue) -> Result<(), E>,
) -> Result<(), E> {
    let net = &live.snapshot.network;
    if !net.edge.debug_headers {
        return Ok(());
    }
    set(headers::STOKE_EDGE, value(&live.snapshot.edge_location().id))?;
    if let Some(pool) = served.pool {
        set(headers::STOKE_POOL, value(&net.pool(pool).id))?;
    }
    if let Some(replica) = served.replica {
        set(headers::STOKE_REPLICA, value(replica))?;
    }
    set(headers::STOKE_WAIT_MS, HeaderValue::from(served.waited.as_millis() as u64))
}

/// `Alt-Svc` for an answer: only over TLS, and only where HTTP/3 is served.
pub fn alt_svc(tls: bool, advertised: Option<&HeaderValue>) -> Option<&HeaderValue> {
    advertised.filter(|_| tls)
}

/// An answer the edge makes itself.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Its status.
    pub status: u16,
    /// Its header fields, in order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Its body (JSON).
    pub body: Bytes,
}

/// The answer for `reject` (an error, or a 200 the edge answers itself):
/// its JSON body, `Content-Type`, `Content-Length`, `x-request-id`,
/// `Retry-After` where retrying helps, `WWW-Authenticate` on 401, the
/// edge's debug header and `Alt-Svc` (pass [`alt_svc`]'s choice).
pub fn answer(reject: &Reject, request_id: &RequestId, live: Option<&Live>, alt_svc: Option<&HeaderValue>) -> Answer {
    let body = Bytes::from(reject.body());
    let mut h = Vec::with_capacity(7);
    h.push((header::CONTENT_TYPE, HeaderValue::from_static("application/json")));
    h.push((header::CONTENT_LENGTH, HeaderValue::from(body.len())));
    h.push((HeaderName::from_static(headers::REQUEST_ID), request_id.value()));
    if let Some(secs) = reject.retry_after_secs() {
        h.push((header::RETRY_AFTER, HeaderValue::from(secs)));
    }
    if reject.status == 401 {
        h.push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
    }
    if let Some(live) = live.filter(|l| l.snapshot.network.edge.debug_headers) {
        h.push((HeaderName::from_static(headers::STOKE_EDGE), value(&live.snapshot.edge_location().id)));
    }
    if let Some(alt) = alt_svc {
        h.push((header::ALT_SVC, alt.clone()));
    }
    Answer { status: reject.status, headers: h, body }
}

/// What the client is told when forwarding to a replica failed with `e`.
pub fn upstream_failure(e: &UpstreamError) -> Reject {
    if e.is_connect() {
        return Reject::bad_gateway(format!("could not connect to a replica: {}", e.kind()));
    }
    if e.is_timeout() {
        return Reject {
            status: 504,
            code: "upstream_timeout",
            message: format!("the replica did not answer in time ({})", e.kind()),
            origin: Origin::Upstream,
            retry_after: None,
        };
    }
    Reject::bad_gateway(format!("the replica failed: {}", e.kind()))
}

/// The retry budget of one request: it may go to another replica while
/// nothing was sent, at most [`MAX_CONNECT_ATTEMPTS`] tries in all.
#[derive(Clone, Copy, Debug, Default)]
pub struct Attempts(u8);

impl Attempts {
    /// Count a try.
    pub fn start(&mut self) {
        self.0 = self.0.saturating_add(1);
    }

    /// Tries so far.
    pub fn count(&self) -> u8 {
        self.0
    }

    /// Whether a failed try may be retried: after a connect failure
    /// always, after a failure on a reused pooled connection (the replica
    /// had closed it) only if the body can be sent again; within the
    /// budget either way.
    pub fn may_retry(&self, failure: Failure, body_replayable: bool) -> bool {
        self.0 < MAX_CONNECT_ATTEMPTS
            && match failure {
                Failure::Connect => true,
                Failure::Reused => body_replayable,
                Failure::Other => false,
            }
    }
}

/// How a try at a replica failed, for [`Attempts::may_retry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection: nothing was sent.
    Connect,
    /// A pooled connection failed before any answer (the replica had
    /// closed it): the replica never took the request.
    Reused,
    /// Anything else: the replica may have seen the request.
    Other,
}

/// A replica refused a connection: it is down for this edge until a probe
/// says otherwise.
pub fn mark_down(slot: &Slot, error: &dyn std::fmt::Display) {
    if slot.replica().set_ready(false) {
        tracing::warn!(replica = %slot.replica().addr, %error, "replica refused a connection; marked down");
    }
}

/// A replica of a pool with a light depth answered 503: it sleeps, for this
/// edge, until a probe says otherwise.
pub fn mark_asleep(slot: &Slot) {
    let replica = slot.replica();
    if replica.set_ready(false) {
        replica.set_asleep(true);
        tracing::info!(replica = %replica.addr, "replica answered 503 in a pool that sleeps lightly; out of rotation until its probe");
    }
}

/// A header value from text that may hold bytes a header cannot
/// (`-` then).
pub fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// `ip` as a header value. An IPv4 address (every request's, on most
/// edges) is written by hand: `Display` through `core::fmt` and a `String`
/// cost about 1,200 instructions and an allocation per request; its bytes
/// are cut from a shared block ([`headers::small_bytes`]).
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else { return value(&ip.to_string()) };
    let mut text = [0u8; 15];
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            text[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            text[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        text[n] = b'0' + octet % 10;
        n += 1;
    }
    HeaderValue::from_maybe_shared(headers::small_bytes(&text[..n])).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_written_as_display_writes_it() {
        let mut v4 = vec![[0, 0, 0, 0], [255, 255, 255, 255], [127, 0, 0, 1], [10, 0, 100, 7], [192, 168, 9, 99]];
        // Every octet value in every position.
        v4.extend((0..=255u8).map(|o| [o, 255 - o, o.wrapping_mul(3), o.wrapping_mul(7)]));
        for octets in v4 {
            let ip = IpAddr::from(octets);
            assert_eq!(ip_value(ip).to_str().expect("ascii"), ip.to_string(), "{octets:?}");
        }
        let v6: IpAddr = "2001:db8::1".parse().expect("v6");
        assert_eq!(ip_value(v6).to_str().expect("ascii"), "2001:db8::1");
    }

    fn edge() -> EdgeSettings {
        let text = "[edge]\nlocation = \"fra\"\nadmin = \"127.0.0.1:0\"\nmax_headers = 8\nmax_header_bytes = \"1KiB\"\n[[location]]\nid = \"fra\"\nlat = 0\nlon = 0\n";
        stoke_config::load_str(text, std::path::Path::new("t.toml")).expect("loads").edge
    }

    #[test]
    fn one_header_rule_on_every_protocol() {
        let e = edge();
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        // "/x" + "host" + ("a" + "1" + 4)
        assert_eq!(head_size("/x", Some("host"), &h), 12);
        assert!(check_head(&e, 8, 1024).is_ok());
        let r = check_head(&e, 9, 10).expect_err("too many");
        assert_eq!((r.status, r.code), (431, "headers_too_large"));
        assert!(r.message.contains("at most 8 fields and 1024 bytes"), "{}", r.message);
        assert_eq!(check_head(&e, 1, 1025).expect_err("too big").status, 431);
    }

    #[test]
    fn streamed_bodies_are_counted_against_max_body() {
        let mut c = BodyCount::new(10);
        assert!(c.add(6).is_ok());
        assert!(c.add(4).is_ok());
        assert_eq!(c.add(1).expect_err("over").status, 413);
    }

    #[test]
    fn error_answers_carry_everything_a_client_needs() {
        let alt = HeaderValue::from_static("h3=\":443\"");
        let r = Reject::unavailable("no_capacity", "busy", Duration::from_millis(1500));
        let a = answer(&r, &"rid".into(), None, alt_svc(true, Some(&alt)));
        let get = |n: &str| a.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.to_str().expect("text").to_owned());
        assert_eq!(a.status, 503);
        assert_eq!(get("retry-after").as_deref(), Some("2"));
        assert_eq!(get("x-request-id").as_deref(), Some("rid"));
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("content-length"), Some(a.body.len().to_string()));
        assert_eq!(get("alt-svc").as_deref(), Some("h3=\":443\""));
        let a = answer(&Reject::client(401, "unauthorized", "no key"), &"rid".into(), None, alt_svc(false, Some(&alt)));
        assert!(a.headers.iter().any(|(k, v)| k == "www-authenticate" && v == "Bearer"));
        assert!(!a.headers.iter().any(|(k, _)| k == "alt-svc"), "no Alt-Svc over plain HTTP");
        assert!(!a.headers.iter().any(|(k, _)| k == "retry-after"), "no Retry-After on a client error");
    }

    #[test]
    fn forwarded_headers() {
        let mut set = Vec::new();
        let f = Forwarded {
            host: Some("api.example.com"),
            client: Some([10, 0, 0, 7].into()),
            tls: true,
            request_id: &"r1".into(),
        };
        f.apply(|k, v| {
            set.push((k, v));
            Ok::<_, ()>(())
        })
        .expect("applied");
        let got: Vec<(&str, &str)> = set.iter().map(|(k, v)| (*k, v.to_str().expect("text"))).collect();
        assert_eq!(
            got,
            [
                ("x-forwarded-host", "api.example.com"),
                ("x-forwarded-for", "10.0.0.7"),
                ("x-forwarded-proto", "https"),
                ("x-request-id", "r1")
            ]
        );
    }

    #[test]
    fn the_retry_budget() {
        let mut a = Attempts::default();
        a.start();
        assert!(a.may_retry(Failure::Connect, false));
        assert!(a.may_retry(Failure::Reused, true));
        assert!(!a.may_retry(Failure::Reused, false), "a body that cannot be replayed is not retried");
        assert!(!a.may_retry(Failure::Other, true));
        a.start();
        a.start();
        assert!(!a.may_retry(Failure::Connect, true), "three tries at most");
    }

    #[test]
    fn request_ids_are_kept_when_acceptable() {
        assert_eq!(&*request_id(Some(b"abc")), "abc");
        assert_eq!(request_id(Some(b"has space")).len(), 32);
        assert_eq!(request_id(None).len(), 32);
    }
}
