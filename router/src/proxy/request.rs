//! One request's way through the routing core, whatever protocol brought
//! it. A protocol adapter (hyper for HTTP/1.1 and HTTP/2, quinn + h3 for
//! HTTP/3) implements [`Downstream`]; [`decide`] then runs route match,
//! access control, body limits, the service lookup (route, header or body),
//! and admission (placement, holding, waking), and [`record`] writes the
//! metrics and the access-log line. There is one copy of this logic.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use stoke_config::{AuthHeader, PoolId, RouteId, ServiceId, ServiceSource};

use super::admit::{self, Admitted, Keys, MAX_WAIT_HEADER};
use super::body::extract_field;
use super::keepalive::{self, HeldStream};
use super::policy;
use crate::access::{Identity, FAILED_KEY_BURST, FAILED_KEY_RATE};
use crate::clock;
use crate::core::affinity::{self, Chosen, KeySource};
use crate::core::placement::Decision;
use crate::error::Reject;
use crate::logging;
use crate::metrics as m;
use crate::state::{Live, Router};

/// What the routing core needs from the protocol a request came in on.
#[async_trait]
pub trait Downstream: Send {
    /// The host the request is for (`Host` or `:authority`, as sent).
    fn host(&self) -> &str;

    /// The request path (without the query).
    fn path(&self) -> &str;

    /// The request method.
    fn method(&self) -> &str;

    /// A request header's value (names are lower-case).
    fn header(&self, name: &str) -> Option<&[u8]>;

    /// The client's address.
    fn client_ip(&self) -> Option<IpAddr>;

    /// Read the whole body, at most `limit` bytes (413 beyond), so that the
    /// service can be found in it; it is still sent upstream afterwards.
    async fn read_body(&mut self, limit: u64) -> Result<Bytes, Reject>;

    /// Resolves when the client goes away (connection closed, stream
    /// reset), watched while the request is held; never, where the
    /// protocol cannot tell without losing request data.
    async fn gone(&mut self);
}

/// What to do with a request.
#[derive(Debug)]
pub enum Verdict {
    /// Forward it to the replica it was admitted to.
    Forward(Routed),
    /// Answer it at the edge with this JSON (`GET …/models` on a route that
    /// takes the model from the body: the edge knows every model).
    Answer(String),
    /// Hold it with keep-alive comments on an SSE stream opened now, then
    /// forward it ([`super::keepalive`]).
    HoldStream(HeldStream),
}

/// What was decided for a request that is forwarded.
#[derive(Debug)]
pub struct Routed {
    /// The service.
    pub service: ServiceId,
    /// The whole body, when it was read to find the service.
    pub body: Option<Bytes>,
    /// The slot on a replica.
    pub admitted: Admitted,
}

/// How far a request got, kept for the log even when it is refused.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trace {
    /// The route it matched.
    pub route: Option<RouteId>,
    /// The service it asked for.
    pub service: Option<ServiceId>,
    /// The route's body limit.
    pub max_body: Option<u64>,
    /// Its hold, if it was held.
    pub hold: Option<crate::otel::Hold>,
}

/// Route, check and admit a request.
pub async fn decide<D: Downstream>(
    router: &Arc<Router>,
    live: &Arc<Live>,
    down: &mut D,
    started: Instant,
    trace: &mut Trace,
) -> Result<Verdict, Reject> {
    let route_id = route(live, down.host(), down.path())?;
    trace.route = Some(route_id);
    let route = live.snapshot.network.route(route_id);
    if route.auth.is_some() || route.rate_limit.is_some() {
        let key_header = match route.auth.as_ref().map(|a| &a.header) {
            Some(AuthHeader::Named(name)) => down.header(name),
            _ => down.header("authorization"),
        };
        admit_client(router, live, route_id, key_header, down.client_ip())?;
    }
    trace.max_body = Some(route.max_body);
    if let Some(len) =
        down.header("content-length").and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
    {
        if len > route.max_body {
            return Err(policy::declared_too_large(len, route.max_body));
        }
    }
    let mut body = None;
    let service = match &route.service {
        ServiceSource::Fixed(id) => *id,
        ServiceSource::Header(name) => {
            let value = down.header(name).ok_or_else(|| {
                Reject::client(
                    400,
                    "missing_model",
                    format!("this route takes the model from the \"{name}\" header, which the request lacks"),
                )
            })?;
            let value = std::str::from_utf8(value).map_err(|_| {
                Reject::client(400, "invalid_model", format!("the \"{name}\" header is not valid text"))
            })?;
            service_named(live, value.trim(), &format!("the \"{name}\" header"))?
        }
        ServiceSource::BodyField(_) if down.method() == "GET" && down.path().ends_with("/models") => {
            // The OpenAI model list: no body, no model to route by. The
            // edge knows every model the network serves.
            return Ok(Verdict::Answer(models_list(live)));
        }
        ServiceSource::BodyField(field) => {
            let read = down.read_body(route.max_body_read).await?;
            let name = extract_field(&read, field).map_err(|e| Reject::client(400, "invalid_body", e.to_string()))?;
            body = Some(read);
            service_named(live, &name, &format!("the \"{field}\" field of the body"))?
        }
    };
    trace.service = Some(service);
    let max_wait = admit::max_wait(route.max_wait, down.header(MAX_WAIT_HEADER));
    if let (Some(interval), Some(read)) = (route.hold_keepalive, &body) {
        if keepalive::stream_requested(read) {
            // Held for a pool that is waking or cold: the stream opens now.
            if let Decision::Hold { pool, .. } = live.place(service, clock::now()).decision {
                if !live.pool(pool).is_warm() {
                    return Ok(Verdict::HoldStream(HeldStream {
                        service,
                        body: read.clone(),
                        pool,
                        max_wait,
                        interval,
                        keys: affinity_keys(live, service, down, Some(read)),
                    }));
                }
            }
        }
    }
    let keys = affinity_keys(live, service, down, body.as_deref());
    let client_gone = down.gone();
    let admitted = admit::admit(router, live, service, started, max_wait, client_gone, &keys, &mut trace.hold).await?;
    Ok(Verdict::Forward(Routed { service, body, admitted }))
}

/// The request's affinity keys for the candidate pools that have
/// `[pool.affinity]`, from its headers and (if the edge read it) its body.
fn affinity_keys<D: Downstream>(live: &Live, service: ServiceId, down: &D, body: Option<&[u8]>) -> Keys {
    let mut keys = Keys::default();
    if !live.any_affinity {
        return keys;
    }
    let net = &live.snapshot.network;
    for c in live.snapshot.candidates(service) {
        let Some(a) = &net.pool(c.pool).affinity else { continue };
        let header = |name: &str| down.header(name);
        let field = |name: &str| body.and_then(|b| extract_field(b, name).ok());
        if let Some(k) = affinity::key(a, &KeySource { body, header: &header, field: &field }) {
            keys.push(c.pool, k);
        }
    }
    keys
}

/// The route for `host` and `path`.
pub fn route(live: &Live, host: &str, path: &str) -> Result<RouteId, Reject> {
    live.snapshot
        .network
        .route_table
        .find(host, path)
        .ok_or_else(|| Reject::client(404, "no_route", format!("no route for host \"{host}\" and path \"{path}\"")))
}

/// Access control of a route: the API key (if the route has `auth`),
/// then the rate limits. `key_header` is the value of the route's key
/// header; `client` the client's address.
pub fn admit_client(
    router: &Router,
    live: &Live,
    route: RouteId,
    key_header: Option<&[u8]>,
    client: Option<IpAddr>,
) -> Result<(), Reject> {
    let r = live.snapshot.network.route(route);
    let now = clock::now();
    // Host and prefix identify a route (names need not be unique), and
    // stay the same across reloads.
    let id = (&r.host, &r.path_prefix);
    let key = match (&r.auth, &live.route_keys[route.index()]) {
        (Some(auth), Some(keys)) => {
            // A client that keeps presenting wrong keys is refused before
            // its next guess is even looked at.
            let guesses = |ip| {
                let who = Identity::failed_keys(ip);
                (who, router.limiter.peek(id, who, FAILED_KEY_RATE, FAILED_KEY_BURST, now))
            };
            if let Some((_, Err(wait))) = client.map(guesses) {
                return Err(too_many_wrong_keys(wait));
            }
            match keys.check(&auth.header, key_header) {
                Ok(key) => Some(key),
                Err(reject) => {
                    if let (Some(ip), "invalid_api_key") = (client, reject.code) {
                        let _ =
                            router.limiter.take(id, Identity::failed_keys(ip), FAILED_KEY_RATE, FAILED_KEY_BURST, now);
                    }
                    return Err(reject);
                }
            }
        }
        _ => None,
    };
    let Some(limit) = &r.rate_limit else { return Ok(()) };
    let limited = |wait: Duration| Reject {
        status: 429,
        code: "rate_limited",
        message: format!("too many requests on route {}; slow down", r.name),
        origin: crate::error::Origin::Client,
        retry_after: Some(wait),
    };
    if let (Some(rate), Some(key)) = (limit.per_key, key.as_ref()) {
        router.limiter.take(id, Identity::Key(key), rate, limit.burst, now).map_err(limited)?;
    }
    if let (Some(rate), Some(ip)) = (limit.per_ip, client) {
        router.limiter.take(id, Identity::client(ip), rate, limit.burst, now).map_err(limited)?;
    }
    Ok(())
}

/// 429 for a client that presented too many wrong API keys.
fn too_many_wrong_keys(wait: Duration) -> Reject {
    Reject {
        status: 429,
        code: "too_many_invalid_keys",
        message: format!(
            "too many invalid API keys from this client: at most {FAILED_KEY_BURST} in a row, then one every {} s",
            (1.0 / FAILED_KEY_RATE).round()
        ),
        origin: crate::error::Origin::Client,
        retry_after: Some(wait),
    }
}

/// The service named `name` (from a body field or header).
pub fn service_named(live: &Live, name: &str, from: &str) -> Result<ServiceId, Reject> {
    live.snapshot.network.service_id(name).ok_or_else(|| {
        Reject::client(404, "model_not_found", format!("no pool serves the model \"{name}\" (taken from {from})"))
    })
}

/// `{"object":"list","data":[{"id":…,"object":"model",…}]}` of every
/// service the network serves.
pub fn models_list(live: &Live) -> String {
    let data: Vec<serde_json::Value> = live
        .snapshot
        .network
        .services
        .iter()
        .map(|s| serde_json::json!({"id": s.name, "object": "model", "created": 0, "owned_by": "stoke"}))
        .collect();
    serde_json::json!({"object": "list", "data": data}).to_string()
}

/// How a request ended, for metrics and the access log.
pub struct Outcome<'a> {
    /// The request id.
    pub request_id: &'a str,
    /// `HTTP/1.1`, `HTTP/2` or `HTTP/3`.
    pub protocol: &'static str,
    /// Request method.
    pub method: &'a str,
    /// Request path.
    pub path: &'a str,
    /// How far it got.
    pub trace: Trace,
    /// The pool, if one was chosen.
    pub pool: Option<PoolId>,
    /// The replica, if one was chosen.
    pub replica: Option<&'a str>,
    /// The status sent (0 if none could be).
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: usize,
    /// Time from request to end.
    pub elapsed: Duration,
    /// Time held for capacity or a wake.
    pub waited: Duration,
    /// What went wrong, if anything.
    pub error: Option<&'a dyn std::fmt::Display>,
    /// How the replica was chosen, on a pool with affinity.
    pub affinity: Option<Chosen>,
    /// The trace id, when the request has a trace.
    pub trace_id: Option<&'a [u8; 16]>,
}

/// Label for requests that never got a route or pool.
static NO_LABEL: metrics::SharedString = metrics::SharedString::const_str("-");

thread_local! {
    /// Counter handles by (snapshot version, route, pool, status): looking
    /// one up in the recorder builds a labelled key (an allocation and a
    /// hash of three labels) each time; a worker thread's own table avoids
    /// both and needs no lock.
    static REQUEST_COUNTERS: RefCell<HashMap<(u64, u32, u32, u16), metrics::Counter>> =
        RefCell::new(HashMap::new());
}

/// Bound of a thread's counter table (it is cleared when full).
const MAX_CACHED_COUNTERS: usize = 4096;

fn request_duration() -> &'static metrics::Histogram {
    static H: OnceLock<metrics::Histogram> = OnceLock::new();
    H.get_or_init(|| metrics::histogram!(m::REQUEST_DURATION))
}

/// The `stoke_upstream_ttfb_seconds` histogram (registered once).
pub fn upstream_ttfb() -> &'static metrics::Histogram {
    static H: OnceLock<metrics::Histogram> = OnceLock::new();
    H.get_or_init(|| metrics::histogram!(m::UPSTREAM_TTFB))
}

/// Count the request and write its access-log line (target `stoke::access`).
pub fn record(live: Option<&Live>, o: &Outcome<'_>) {
    crate::tally::answered(o.status);
    if let Some(live) = live {
        let key = (live.version, o.trace.route.map_or(u32::MAX, |r| r.0), o.pool.map_or(u32::MAX, |p| p.0), o.status);
        REQUEST_COUNTERS.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.len() >= MAX_CACHED_COUNTERS {
                cache.clear();
            }
            cache
                .entry(key)
                .or_insert_with(|| {
                    let route = o.trace.route.map_or_else(|| NO_LABEL.clone(), |r| live.route_labels[r.index()].clone());
                    let pool = o.pool.map_or_else(|| NO_LABEL.clone(), |p| live.pool(p).label.clone());
                    metrics::counter!(m::REQUESTS_TOTAL, "route" => route, "pool" => pool, "status" => m::status_label(o.status))
                })
                .increment(1);
        });
    }
    request_duration().record(o.elapsed.as_secs_f64());
    if let (Some(live), Some(pool), Some(chosen)) = (live, o.pool, o.affinity) {
        metrics::counter!(m::AFFINITY_TOTAL, "pool" => live.pool(pool).label.clone(), "result" => chosen.as_str())
            .increment(1);
    }
    if tracing::enabled!(target: "stoke::access", tracing::Level::INFO) {
        access_line(live, o);
    }
}

/// The target of access-log lines.
const ACCESS: &str = "stoke::access";

/// Write `o`'s access-log line: by hand in the log's format
/// ([`logging::Fields`]), or through `tracing` where it colours its lines.
fn access_line(live: Option<&Live>, o: &Outcome<'_>) {
    match logging::by_hand() {
        Some(format) => access_fields(logging::Fields::new(format, ACCESS), live, o).send(),
        None => access_event(live, o),
    }
}

/// The names of the route, service and pool of `o`, `-` where none.
pub fn names<'l>(live: Option<&'l Live>, o: &Outcome<'_>) -> [&'l str; 3] {
    let net = live.map(|l| &l.snapshot.network);
    [
        net.zip(o.trace.route).map(|(n, r)| n.route(r).name.as_str()).unwrap_or("-"),
        net.zip(o.trace.service).map(|(n, s)| n.service(s).name.as_str()).unwrap_or("-"),
        net.zip(o.pool).map(|(n, p)| n.pool(p).id.as_str()).unwrap_or("-"),
    ]
}

/// `o`'s trace id in hex, or `-`, written into `buf`.
fn trace_id<'b>(o: &Outcome<'_>, buf: &'b mut [u8; 32]) -> &'b str {
    match o.trace_id {
        Some(t) => {
            *buf = crate::otel::trace_id_hex(t);
            std::str::from_utf8(buf).unwrap_or("-")
        }
        None => "-",
    }
}

/// The access-log line of `o` written by hand: the same fields, in the
/// same order and layout, as [`access_event`].
fn access_fields(mut f: logging::Fields, live: Option<&Live>, o: &Outcome<'_>) -> logging::Fields {
    let [route, service, pool] = names(live, o);
    f.plain("request_id", o.request_id)
        .str("protocol", o.protocol)
        .plain("method", o.method)
        .plain("path", o.path)
        .str("route", route)
        .str("service", service)
        .str("pool", pool)
        .str("replica", o.replica.unwrap_or("-"))
        .u64("status", u64::from(o.status))
        .u64("bytes", o.bytes as u64)
        .millis("duration_ms", o.elapsed.as_micros() as u64)
        .u64("wait_ms", o.waited.as_millis() as u64)
        .str("affinity", o.affinity.map_or("-", Chosen::as_str))
        .str("trace_id", trace_id(o, &mut [0; 32]))
        .str("error", &o.error.map(|e| e.to_string()).unwrap_or_default());
    f
}

/// The access-log line of `o` as a `tracing` event.
fn access_event(live: Option<&Live>, o: &Outcome<'_>) {
    let [route, service, pool] = names(live, o);
    tracing::info!(
        target: ACCESS,
        request_id = %o.request_id,
        protocol = o.protocol,
        method = %o.method,
        path = %o.path,
        route,
        service,
        pool,
        replica = o.replica.unwrap_or("-"),
        status = o.status,
        bytes = o.bytes,
        duration_ms = o.elapsed.as_micros() as f64 / 1000.0,
        wait_ms = o.waited.as_millis() as u64,
        affinity = o.affinity.map_or("-", Chosen::as_str),
        trace_id = trace_id(o, &mut [0; 32]),
        error = o.error.map(|e| e.to_string()).unwrap_or_default(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::{Fields, LogFormat};
    use crate::testing::Written;

    /// `o`'s line as `tracing_subscriber` writes it, installed as
    /// `logging::init` installs it (no colours).
    fn through_tracing(format: LogFormat, live: &Live, o: &Outcome<'_>) -> String {
        let out = Written::default();
        let sink = out.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false);
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.finish(), || access_event(Some(live), o)),
            LogFormat::Json => tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), || {
                access_event(Some(live), o)
            }),
        }
        out.text()
    }

    /// The line with its timestamp cut out.
    fn untimed(format: LogFormat, line: &str) -> String {
        match format {
            LogFormat::Text => line.split_once(' ').map(|(_, rest)| rest.to_owned()).expect("a timestamp"),
            LogFormat::Json => {
                let mut v: serde_json::Value = serde_json::from_str(line).expect("json");
                let t = v.as_object_mut().expect("object").remove("timestamp").expect("a timestamp");
                assert!(t.as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 27), "{t}");
                // Compare the text, so that the order of the keys counts.
                line.replace(&format!("\"timestamp\":{t},"), "")
            }
        }
    }

    #[test]
    fn the_access_line_written_by_hand_is_the_line_tracing_writes() {
        let router = crate::testing::two_pools(4, "");
        let live = router.live();
        let route = live.snapshot.network.routes.iter().position(|_| true).map(|i| RouteId(i as u32));
        let error = Reject::bad_gateway("replica \"a\" said\nno");
        let ok = Outcome {
            request_id: "4bf92f3577b34da6",
            protocol: "HTTP/1.1",
            method: "POST",
            path: "/v1/chat/completions?x=%22y%22",
            trace: Trace { route, service: Some(ServiceId(0)), max_body: None, hold: None },
            pool: Some(PoolId(1)),
            replica: Some("127.0.0.1:9001"),
            status: 200,
            bytes: 1234,
            elapsed: Duration::from_micros(12_345),
            waited: Duration::from_millis(300),
            error: None,
            affinity: Some(Chosen::Spilled),
            trace_id: Some(&[0xab; 16]),
        };
        let refused = Outcome {
            request_id: "id with \"quotes\" and ü",
            protocol: "HTTP/2",
            path: "/",
            trace: Trace::default(),
            pool: None,
            replica: Some("ü\\tab\u{1b}[31m"),
            status: 502,
            bytes: 0,
            elapsed: Duration::from_secs(2),
            waited: Duration::ZERO,
            error: Some(&error),
            affinity: None,
            trace_id: None,
            ..ok
        };
        for format in [LogFormat::Text, LogFormat::Json] {
            for o in [&ok, &refused] {
                let by_tracing = through_tracing(format, &live, o);
                let line = access_fields(Fields::new(format, ACCESS), Some(&live), o).into_line();
                let by_hand = String::from_utf8(line).expect("utf-8");
                assert!(by_hand.ends_with('\n') && by_hand.matches('\n').count() == 1, "{by_hand}");
                let trace_id = if o.trace_id.is_some() { "ab".repeat(16) } else { "-".to_owned() };
                assert!(by_hand.contains(&trace_id), "{by_hand}");
                assert_eq!(untimed(format, &by_hand), untimed(format, &by_tracing), "{format:?}");
            }
        }
    }
}
