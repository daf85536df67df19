//! Request traces: W3C trace context in and out, and OpenTelemetry spans
//! exported with OTLP over HTTP (protobuf).
//!
//! A request that is not sampled costs a header lookup and one random
//! number: nothing is recorded, and a `traceparent` the client sent goes
//! to the replica unchanged. A sampled request keeps a [`Recording`] (a
//! box, so that an open stream that is not sampled carries one pointer),
//! which becomes spans when the request is accounted for: the edge's
//! request (server), admission, the hold, each upstream try (client; its
//! id is the parent the replica sees in `traceparent`) and the streamed
//! answer. Spans go through a bounded queue to one export task, which
//! sends them in batches; a full queue drops them and counts the drops,
//! so a collector that is down or slow costs the request path nothing.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use opentelemetry::trace::{Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use stoke_config::TracingSettings;
use tokio::sync::mpsc;

use crate::metrics as m;

/// The request header that carries the trace context (W3C).
pub const TRACEPARENT: &str = "traceparent";

/// Most spans in one export.
const MAX_BATCH: usize = 512;

/// How long spans gather before an export.
const BATCH_DELAY: Duration = Duration::from_millis(100);

/// Longest one export may take, retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A `traceparent` as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    /// The trace.
    pub trace: [u8; 16],
    /// The client's span, the parent of the edge's.
    pub span: [u8; 8],
    /// Whether the client's side records the trace.
    pub sampled: bool,
}

/// Read a `traceparent` value (`00-<trace>-<span>-<flags>`). Versions
/// after 00 are read as 00 where they are at least as long; all-zero ids
/// and version `ff` are invalid (W3C trace context, section 3.2).
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let version = hex_byte(&value[0..2])?;
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace = [0; 16];
    for (i, b) in trace.iter_mut().enumerate() {
        *b = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span = [0; 8];
    for (i, b) in span.iter_mut().enumerate() {
        *b = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&value[53..55])?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some(Parent { trace, span, sampled: flags & 1 == 1 })
}

/// A lower-case hex byte.
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

/// `bytes` in lower-case hex.
fn hex<const N: usize>(bytes: &[u8]) -> [u8; N] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0; N];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 15)];
    }
    out
}

/// A trace id as the access log writes it: 32 hex digits.
pub fn trace_id_hex(trace: &[u8; 16]) -> [u8; 32] {
    hex::<32>(trace)
}

/// The `traceparent` that makes `span` of `trace` the parent, sampled.
pub fn traceparent(trace: &[u8; 16], span: &[u8; 8]) -> HeaderValue {
    let mut v = [0u8; 55];
    v[..3].copy_from_slice(b"00-");
    v[3..35].copy_from_slice(&hex::<32>(trace));
    v[35] = b'-';
    v[36..52].copy_from_slice(&hex::<16>(span));
    v[52..].copy_from_slice(b"-01");
    HeaderValue::from_bytes(&v).expect("hex digits and dashes are a valid header value")
}

/// A new span id (never zero).
fn span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

/// The edge's tracer: the sampling rule and the queue to the export task.
#[derive(Debug)]
pub struct Tracer {
    settings: TracingSettings,
    /// A request without a sampled parent is sampled when a random number
    /// falls below this.
    threshold: u64,
    queue: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
}

impl Tracer {
    /// Start the tracer for `settings` at edge `location`: its export task
    /// runs until the tracer is dropped (a reload with other settings
    /// starts another), sending what is queued first.
    pub fn start(settings: &TracingSettings, location: &str) -> Result<Arc<Tracer>, String> {
        use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
        let mut headers: std::collections::HashMap<String, String> = settings.headers.iter().cloned().collect();
        for (name, var) in &settings.headers_env {
            let value = std::env::var(var)
                .map_err(|_| format!("[tracing].headers_env.{name}: the environment variable {var} is not set"))?;
            headers.insert(name.clone(), value);
        }
        let client = opentelemetry_http::hyper::HyperClient::with_default_connector(EXPORT_TIMEOUT, None);
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("the OTLP exporter for {}: {e}", settings.endpoint))?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("stoke")
            .with_attribute(KeyValue::new("stoke.edge", location.to_owned()))
            .build();
        exporter.set_resource(&resource);
        let (queue, spans) = mpsc::channel(settings.queue);
        tokio::spawn(export(spans, exporter, settings.endpoint.clone()));
        // `sample` of the u64 range; 1.0 takes all of it.
        let threshold = if settings.sample >= 1.0 { u64::MAX } else { (settings.sample * u64::MAX as f64) as u64 };
        Ok(Arc::new(Tracer {
            settings: settings.clone(),
            threshold,
            queue,
            scope: InstrumentationScope::builder("stoke").with_version(env!("CARGO_PKG_VERSION")).build(),
        }))
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &TracingSettings {
        &self.settings
    }

    /// The trace of a request whose `traceparent` is `header`, starting
    /// now: its id (for the log) and, when sampled, its recording.
    pub fn begin(self: &Arc<Self>, header: Option<&[u8]>, started: Instant) -> Begun {
        let parent = header.and_then(parse_traceparent);
        let sampled = match parent {
            Some(p) if p.sampled && self.settings.follow_parent => true,
            _ => self.threshold > 0 && fastrand::u64(..) < self.threshold,
        };
        if !sampled {
            return Begun { trace: parent.map(|p| p.trace), recording: None };
        }
        let trace = parent.map_or_else(|| fastrand::u128(1..).to_be_bytes(), |p| p.trace);
        let recording = Box::new(Recording {
            tracer: self.clone(),
            trace,
            span: span_id(),
            parent: parent.map(|p| p.span),
            started,
            wall: SystemTime::now(),
            admitted: None,
            hold: None,
            tries: Vec::new(),
            first_byte: None,
        });
        Begun { trace: Some(trace), recording: Some(recording) }
    }

    /// A span of this tracer's scope, without a parent, links or events.
    fn span_data(
        &self,
        context: SpanContext,
        kind: SpanKind,
        name: Cow<'static, str>,
        (start, end): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        SpanData {
            span_context: context,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: kind,
            name,
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// Queue `span` for export; a full queue drops it.
    fn send(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            metrics::counter!(m::TRACE_SPANS_TOTAL, "result" => "dropped").increment(1);
        }
    }
}

/// A request's trace as it begins.
#[derive(Debug)]
pub struct Begun {
    /// The trace id, when there is a trace (the client's, or one started).
    pub trace: Option<[u8; 16]>,
    /// What is recorded, when sampled.
    pub recording: Option<Box<Recording>>,
}

/// A hold, as the trace shows it.
#[derive(Clone, Copy, Debug)]
pub struct Hold {
    /// When it began.
    pub since: Instant,
    /// When it ended (a slot, the deadline, or the client leaving).
    pub until: Instant,
    /// Whether the pool was warm (held for a slot) or not (for a wake).
    pub warm: bool,
    /// The wait the edge expected when it held the request.
    pub eta: Duration,
    /// The span of the wake it waited for, if that is traced.
    pub wake: Option<([u8; 16], [u8; 8])>,
}

/// A wake of a pool, traced: a trace of its own, from the first hook call
/// to a ready replica (or giving up), that the holds it ends link to.
#[derive(Debug)]
pub struct WakeTrace {
    tracer: Arc<Tracer>,
    /// Its trace and span id.
    pub id: ([u8; 16], [u8; 8]),
    started: Instant,
    wall: SystemTime,
}

impl WakeTrace {
    /// A wake starting now.
    pub fn begin(tracer: &Arc<Tracer>) -> WakeTrace {
        WakeTrace {
            tracer: tracer.clone(),
            id: (fastrand::u128(1..).to_be_bytes(), span_id()),
            started: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The wake of `pool` (for `reason`) ended with `result` (`ready`,
    /// `timeout`, `removed`): its span goes to the export queue.
    pub fn end(self, pool: &str, reason: &'static str, result: &'static str, hook_calls: u32) {
        let ended = self.wall + self.started.elapsed();
        let status = if result == "ready" { Status::Unset } else { Status::error(format!("wake {result}")) };
        let attributes = vec![
            KeyValue::new("stoke.pool", pool.to_owned()),
            KeyValue::new("stoke.wake.reason", reason),
            KeyValue::new("stoke.wake.result", result),
            KeyValue::new("stoke.wake.hook_calls", i64::from(hook_calls)),
        ];
        let (trace, span) = self.id;
        let name = Cow::Owned(format!("wake {pool}"));
        let span = self.tracer.span_data(
            sampled(trace, span),
            SpanKind::Internal,
            name,
            (self.wall, ended),
            attributes,
            status,
        );
        self.tracer.send(span);
    }
}

/// The context of span `span` of `trace`, sampled.
fn sampled(trace: [u8; 16], span: [u8; 8]) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(trace),
        SpanId::from_bytes(span),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    )
}

/// One try at a replica.
#[derive(Debug)]
struct Try {
    span: [u8; 8],
    replica: SocketAddr,
    started: Instant,
    ended: Option<Instant>,
    /// The answer's status, or what failed.
    outcome: Result<u16, String>,
}

/// What a sampled request records on its way.
#[derive(Debug)]
pub struct Recording {
    tracer: Arc<Tracer>,
    trace: [u8; 16],
    span: [u8; 8],
    parent: Option<[u8; 8]>,
    started: Instant,
    /// The wall clock at `started`: every time is placed from it.
    wall: SystemTime,
    /// When the request had its slot.
    admitted: Option<Instant>,
    hold: Option<Hold>,
    tries: Vec<Try>,
    first_byte: Option<Instant>,
}

/// How a recorded request ended, for its spans.
#[derive(Debug)]
pub struct Ended<'a> {
    /// The protocol (`HTTP/1.1`, `HTTP/2`, `HTTP/3`).
    pub protocol: &'static str,
    /// Request method and path.
    pub method: &'a str,
    /// Request path.
    pub path: &'a str,
    /// Route, service and pool names, `-` where none.
    pub names: [&'a str; 3],
    /// The replica that answered.
    pub replica: Option<&'a str>,
    /// The status sent (0: none could be).
    pub status: u16,
    /// Body bytes sent.
    pub bytes: usize,
    /// The request id.
    pub request_id: &'a str,
    /// Held for capacity or a wake.
    pub waited: Duration,
    /// What went wrong.
    pub error: Option<String>,
}

impl Recording {
    /// The request has a slot, `waited` after it started.
    pub fn admitted(&mut self, waited: Duration) {
        self.admitted = Some(self.started + waited);
    }

    /// The request was held.
    pub fn held(&mut self, hold: Hold) {
        self.hold = Some(hold);
    }

    /// A try at `replica` starts: the `traceparent` the replica gets.
    pub fn try_start(&mut self, replica: SocketAddr) -> HeaderValue {
        let span = span_id();
        self.tries.push(Try { span, replica, started: Instant::now(), ended: None, outcome: Ok(0) });
        traceparent(&self.trace, &span)
    }

    /// The last try got an answer head with `status`, or failed.
    pub fn try_end(&mut self, outcome: Result<u16, String>) {
        if let Some(t) = self.tries.last_mut() {
            if outcome.is_err() {
                t.ended = Some(Instant::now());
            }
            t.outcome = outcome;
        }
    }

    /// The answer's head went to the client.
    pub fn first_byte(&mut self) {
        self.first_byte = Some(Instant::now());
    }

    /// The request ended: its spans go to the export queue.
    pub fn end(&self, e: &Ended<'_>) {
        let now = Instant::now();
        let tracer = &self.tracer;
        let [route, service, pool] = e.names;
        let mut attributes = vec![
            KeyValue::new("http.request.method", e.method.to_owned()),
            KeyValue::new("url.path", e.path.to_owned()),
            KeyValue::new("network.protocol.version", e.protocol.trim_start_matches("HTTP/").to_owned()),
            KeyValue::new("http.response.status_code", i64::from(e.status)),
            KeyValue::new("http.response.body.size", e.bytes as i64),
            KeyValue::new("stoke.request_id", e.request_id.to_owned()),
            KeyValue::new("stoke.route", route.to_owned()),
            KeyValue::new("stoke.service", service.to_owned()),
            KeyValue::new("stoke.pool", pool.to_owned()),
            KeyValue::new("stoke.wait_ms", e.waited.as_secs_f64() * 1000.0),
        ];
        if let Some(replica) = e.replica {
            attributes.push(KeyValue::new("stoke.replica", replica.to_owned()));
        }
        let status = match &e.error {
            Some(error) if e.status == 0 || e.status >= 500 => Status::error(error.clone()),
            _ => Status::Unset,
        };
        let name = format!("{} {route}", e.method);
        let edge =
            self.span(self.span, self.parent, SpanKind::Server, name.into(), (self.started, now), attributes, status);
        tracer.send(edge);
        // Admission: from the request's start to its slot, its hold, or
        // its refusal.
        let decided = self.hold.map(|h| h.since).or(self.admitted).unwrap_or(now);
        let decision = match (self.hold, self.admitted) {
            (Some(_), _) => "hold",
            (None, Some(_)) => "forward",
            (None, None) => "refuse",
        };
        let mut attributes =
            vec![KeyValue::new("stoke.decision", decision), KeyValue::new("stoke.pool", pool.to_owned())];
        if let (None, None, Some(error)) = (self.hold, self.admitted, &e.error) {
            attributes.push(KeyValue::new("stoke.reason", error.clone()));
        }
        tracer.send(self.child("admission", SpanKind::Internal, (self.started, decided), attributes, Status::Unset));
        if let Some(h) = self.hold {
            let attributes = vec![
                KeyValue::new("stoke.pool", pool.to_owned()),
                KeyValue::new("stoke.pool_state", if h.warm { "warm" } else { "waking" }),
                KeyValue::new("stoke.eta_ms", h.eta.as_secs_f64() * 1000.0),
            ];
            let status =
                if self.admitted.is_some() { Status::Unset } else { Status::error("the hold ended without a slot") };
            let mut span = self.child("hold", SpanKind::Internal, (h.since, h.until), attributes, status);
            if let Some((trace, id)) = h.wake {
                let wake = sampled(trace, id);
                span.links.links.push(Link::new(wake, vec![KeyValue::new("stoke.link", "waited for")], 0));
            }
            tracer.send(span);
        }
        let tries = self.tries.len();
        for (i, t) in self.tries.iter().enumerate() {
            let mut attributes = vec![
                KeyValue::new("server.address", t.replica.ip().to_string()),
                KeyValue::new("server.port", i64::from(t.replica.port())),
                KeyValue::new("stoke.attempt", i as i64 + 1),
            ];
            let status = match &t.outcome {
                Ok(code) => {
                    attributes.push(KeyValue::new("http.response.status_code", i64::from(*code)));
                    if *code >= 500 {
                        Status::error(format!("status {code}"))
                    } else {
                        Status::Unset
                    }
                }
                Err(why) => Status::error(why.clone()),
            };
            // The try that answered lasts until its answer's last byte.
            let ended = t.ended.unwrap_or(if i + 1 == tries { now } else { t.started });
            let name = format!("{} {}", e.method, t.replica);
            tracer.send(self.span(
                t.span,
                Some(self.span),
                SpanKind::Client,
                name.into(),
                (t.started, ended),
                attributes,
                status,
            ));
        }
        if let Some(first) = self.first_byte {
            let attributes = vec![KeyValue::new("http.response.body.size", e.bytes as i64)];
            tracer.send(self.child("answer", SpanKind::Internal, (first, now), attributes, Status::Unset));
        }
    }

    /// A child of the edge's span.
    fn child(
        &self,
        name: &'static str,
        kind: SpanKind,
        times: (Instant, Instant),
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        self.span(span_id(), Some(self.span), kind, Cow::Borrowed(name), times, attributes, status)
    }

    /// A span of this trace.
    #[allow(clippy::too_many_arguments)]
    fn span(
        &self,
        id: [u8; 8],
        parent: Option<[u8; 8]>,
        kind: SpanKind,
        name: Cow<'static, str>,
        (start, end): (Instant, Instant),
        attributes: Vec<KeyValue>,
        status: Status,
    ) -> SpanData {
        let at = |t: Instant| self.wall + t.saturating_duration_since(self.started);
        let times = (at(start), at(end.max(start)));
        let mut span = self.tracer.span_data(sampled(self.trace, id), kind, name, times, attributes, status);
        if let Some(parent) = parent {
            span.parent_span_id = SpanId::from_bytes(parent);
            // Only the edge's own span has a parent outside the edge.
            span.parent_span_is_remote = id == self.span;
        }
        span
    }
}

/// The export task: spans from the queue, sent in batches of at most
/// [`MAX_BATCH`] after gathering for [`BATCH_DELAY`], until every sender
/// is gone and the queue is empty.
async fn export(mut spans: mpsc::Receiver<SpanData>, exporter: opentelemetry_otlp::SpanExporter, endpoint: String) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // The last failure logged, so that a collector that is down is one
    // warning a minute, not one an export.
    let mut warned: Option<Instant> = None;
    loop {
        if spans.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        tokio::time::sleep(BATCH_DELAY).await;
        while batch.len() < MAX_BATCH {
            match spans.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        match exporter.export(std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH))).await {
            Ok(()) => metrics::counter!(m::TRACE_SPANS_TOTAL, "result" => "exported").increment(n),
            Err(e) => {
                metrics::counter!(m::TRACE_SPANS_TOTAL, "result" => "failed").increment(n);
                if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    warned = Some(Instant::now());
                    tracing::warn!(endpoint = %endpoint, spans = n, error = %e, "trace export failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_and_written_as_w3c_says() {
        let v = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = parse_traceparent(v).expect("valid");
        assert!(p.sampled);
        assert_eq!(p.span, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(&trace_id_hex(&p.trace), b"4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(traceparent(&p.trace, &p.span).as_bytes(), v);
        let unsampled = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").expect("valid");
        assert!(!unsampled.sampled);
        // A later version may be longer; its first fields are read.
        assert!(parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes").is_some());
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
