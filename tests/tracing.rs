//! Request traces, as a real OTLP/HTTP receiver decodes them: the edge's
//! span with its admission, hold, upstream try and answer; the child
//! context the replica gets; and a collector that is down.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::Request;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use parking_lot::Mutex;
use prost::Message;
use stoke_router::net::server::{serve_http, HttpBody};
use stoke_router::sim::OrchestratorOptions;
use support::*;

/// An OTLP/HTTP receiver on loopback: every span it was sent, decoded.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    /// The header fields of every export.
    headers: Arc<Mutex<Vec<http::HeaderMap>>>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let headers = Arc::new(Mutex::new(Vec::new()));
        let (into, heard) = (spans.clone(), headers.clone());
        tokio::spawn(serve_http(listener, stopped, move |req: Request<Incoming>| {
            let (into, heard) = (into.clone(), heard.clone());
            async move {
                heard.lock().push(req.headers().clone());
                assert_eq!(req.uri().path(), "/v1/traces");
                assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let export = ExportTraceServiceRequest::decode(body).expect("an OTLP export request");
                for resource in export.resource_spans {
                    let service = resource.resource.iter().flat_map(|r| &r.attributes).any(|kv| {
                        kv.key == "service.name"
                            && matches!(&kv.value.as_ref().and_then(|v| v.value.clone()), Some(Value::StringValue(s)) if s == "stoke")
                    });
                    assert!(service, "service.name is stoke");
                    for scope in resource.scope_spans {
                        into.lock().extend(scope.spans);
                    }
                }
                Ok(http::Response::new(HttpBody::Left(Full::new(Bytes::new()))))
            }
        }));
        Receiver { addr, spans, headers, _stop: stop }
    }

    /// The `[tracing]` table that sends here.
    fn config(&self, extra: &str) -> String {
        format!("\n[tracing]\nendpoint = \"http://{}/v1/traces\"\n{extra}\n", self.addr)
    }

    /// The spans of `trace` once there are `n` of them.
    async fn trace(&self, trace: &[u8], n: usize) -> Vec<Span> {
        eventually(Duration::from_secs(10), "the trace's spans at the receiver", || async {
            let spans: Vec<Span> = self.spans.lock().iter().filter(|s| s.trace_id == trace).cloned().collect();
            (spans.len() >= n).then_some(spans)
        })
        .await
    }
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()?.value)
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_is_one_trace_of_its_admission_hold_upstream_try_and_answer() {
    logs();
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");
    std::env::set_var("STOKE_TEST_OTLP_AUTH", "Bearer otlp-secret");
    let receiver = Receiver::start().await;
    let (listener, orch) = orchestrator_listener().await;
    let rep = free_addr();
    let text = format!(
        "{EDGE}{}{LOCATIONS}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"5s\"\n",
        receiver.config("headers = { X-Team = \"edge\" }\nheaders_env = { authorization = \"STOKE_TEST_OTLP_AUTH\" }"),
        scaled_pool("fra-a", "fra", &["m"], &[rep], orch, "wake_time = \"300ms\"\nidle_timeout = \"1h\""),
    );
    let file = ConfigFile::new(&text);
    let orch = start_orchestrator(listener, &file, OrchestratorOptions::default()).await;
    let edge = edge_from(&file, "fra").await;

    // Sampled by the client's traceparent (sample = 0: nothing else is).
    let r = send(
        edge.bound.http.expect("http"),
        Req::chat("m").header("traceparent", &format!("00-{TRACE}-{CLIENT_SPAN}-01")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let waited: f64 = r.header("stoke-wait-ms").and_then(|v| v.parse().ok()).expect("stoke-wait-ms");
    assert!(waited >= 250.0, "held {waited} ms for a 300 ms boot");

    let spans = receiver.trace(&unhex(TRACE), 5).await;
    let edge_span = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap_or_else(|| panic!("no edge span in {spans:#?}"));
    assert!(edge_span.name.starts_with("POST "), "{}", edge_span.name);
    assert_eq!(edge_span.kind, SpanKind::Server as i32);
    assert_eq!(edge_span.parent_span_id, unhex(CLIENT_SPAN), "the client's span is the edge's parent");
    assert_eq!(attribute(edge_span, "http.response.status_code"), Some(Value::IntValue(200)));
    assert_eq!(attribute(edge_span, "stoke.pool"), Some(Value::StringValue("fra-a".into())));
    let admission = named(&spans, "admission");
    let hold = named(&spans, "hold");
    let answer = named(&spans, "answer");
    let upstream =
        spans.iter().find(|s| s.kind == SpanKind::Client as i32).unwrap_or_else(|| panic!("no try in {spans:#?}"));
    for child in [admission, hold, upstream, answer] {
        assert_eq!(child.parent_span_id, edge_span.span_id, "{} is a child of the edge's span", child.name);
        assert!(
            child.start_time_unix_nano >= edge_span.start_time_unix_nano
                && child.end_time_unix_nano <= edge_span.end_time_unix_nano,
            "{} lies within the edge's span",
            child.name
        );
    }
    assert_eq!(attribute(admission, "stoke.decision"), Some(Value::StringValue("hold".into())));
    assert_eq!(attribute(hold, "stoke.pool_state"), Some(Value::StringValue("waking".into())));
    let held_ms = (hold.end_time_unix_nano - hold.start_time_unix_nano) as f64 / 1e6;
    assert!((held_ms - waited).abs() <= 1.0, "the hold span lasts {held_ms} ms, stoke-wait-ms says {waited}");
    assert!(upstream.start_time_unix_nano >= hold.end_time_unix_nano, "the try starts when the hold ends");
    assert_eq!(attribute(upstream, "server.port"), Some(Value::IntValue(i64::from(rep.port()))));
    assert_eq!(attribute(upstream, "http.response.status_code"), Some(Value::IntValue(200)));
    assert!(answer.start_time_unix_nano >= upstream.start_time_unix_nano);
    // The hold links to the wake it waited for: a trace of its own.
    let link = hold.links.first().unwrap_or_else(|| panic!("the hold links to its wake: {hold:#?}"));
    let wake = receiver.trace(&link.trace_id, 1).await;
    let wake = &wake[0];
    assert_eq!((wake.name.as_str(), &wake.span_id), ("wake fra-a", &link.span_id));
    assert_eq!(attribute(wake, "stoke.wake.result"), Some(Value::StringValue("ready".into())));
    assert_eq!(attribute(wake, "stoke.wake.hook_calls"), Some(Value::IntValue(1)));
    assert!(
        wake.start_time_unix_nano <= hold.end_time_unix_nano && wake.end_time_unix_nano >= hold.start_time_unix_nano
    );
    // Every export carries the configured fields, one from the environment.
    let heard = receiver.headers.lock().clone();
    assert!(!heard.is_empty());
    for h in heard {
        assert_eq!(h["x-team"], "edge");
        assert_eq!(h["authorization"], "Bearer otlp-secret");
    }
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_gets_the_upstream_try_as_its_parent_and_unsampled_contexts_pass_unchanged() {
    logs();
    let receiver = Receiver::start().await;
    let (upstream, _task) = echo_upstream(false).await;
    let (pem, key, root) = certificate(&["localhost"]);
    let text = format!(
        "{EDGE}https = \"127.0.0.1:0\"\nh3 = \"127.0.0.1:0\"\n[[tls]]\nhosts = [\"localhost\"]\ncert = \"c.crt\"\nkey = \"c.key\"\n\
         {}{LOCATIONS}{}\n[[route]]\npath_prefix = \"/\"\nservice = \"m\"\n",
        receiver.config("sample = 0.0"),
        pool("fra-a", "fra", &["m"], &[upstream], ""),
    );
    let file = ConfigFile::new(&text);
    file.write("c.crt", pem.as_bytes());
    file.write("c.key", key.as_bytes());
    let edge = edge_from(&file, "fra").await;
    let http = edge.bound.http.expect("http");

    let traces =
        ["0af7651916cd43dd8448eb211c80319c", "0af7651916cd43dd8448eb211c80319d", "0af7651916cd43dd8448eb211c80319e"];
    let context = |trace: &str| format!("00-{trace}-{CLIENT_SPAN}-01");
    let h1 = send(http, Req::get("/x").header("traceparent", &context(traces[0]))).await.json();
    let h2 = send_h2c(http, Req::get("/x").header("traceparent", &context(traces[1]))).await.json();
    let mut h3 = h3_client(edge.bound.h3.expect("h3"), root).await;
    let r = h3.request("GET", "/x", None, &[("traceparent", &context(traces[2]))]).await;
    assert_eq!(r.status, 200);
    let h3 = serde_json::from_slice::<serde_json::Value>(&r.body).expect("json");
    for (echoed, trace) in [(h1, traces[0]), (h2, traces[1]), (h3, traces[2])] {
        let sent = echoed["headers"]["traceparent"].as_str().expect("a traceparent upstream").to_owned();
        let (version, rest) = sent.split_at(3);
        assert_eq!(version, "00-");
        assert!(rest.starts_with(trace) && rest.ends_with("-01"), "{sent}");
        let parent = unhex(&rest[33..49]);
        assert_ne!(parent, unhex(CLIENT_SPAN), "the replica's parent is the edge's try, not the client");
        let spans = receiver.trace(&unhex(trace), 4).await;
        let tried = spans.iter().find(|s| s.kind == SpanKind::Client as i32).expect("the upstream try");
        assert_eq!(tried.span_id, parent, "{sent}");
        assert_eq!(attribute(named(&spans, "admission"), "stoke.decision"), Some(Value::StringValue("forward".into())));
    }

    // Not sampled: the client's context goes on as it came, and nothing is
    // recorded.
    let unsampled = format!("00-{TRACE}-{CLIENT_SPAN}-00");
    let r = send(http, Req::get("/x").header("traceparent", &unsampled)).await;
    assert_eq!(r.json()["headers"]["traceparent"], unsampled.as_str());
    // Without a context and with sample = 0, none is started.
    let r = send(http, Req::get("/x")).await;
    assert!(r.json()["headers"].get("traceparent").is_none());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(receiver.spans.lock().iter().all(|s| s.trace_id != unhex(TRACE)), "an unsampled request was recorded");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_the_requests_nothing_and_drops_are_counted() {
    logs();
    let (upstream, _task) = echo_upstream(false).await;
    // Nothing listens there.
    let down = free_addr();
    let text = format!(
        "{EDGE}\n[tracing]\nendpoint = \"http://{down}/v1/traces\"\nsample = 1.0\nqueue = 8\n{LOCATIONS}{}\n[[route]]\npath_prefix = \"/\"\nservice = \"m\"\n",
        pool("fra-a", "fra", &["m"], &[upstream], ""),
    );
    let (edge, _file) = edge(&text, "fra").await;
    let http = edge.bound.http.expect("http");
    for _ in 0..50 {
        let r = send(http, Req::get("/x")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.json()["headers"]["traceparent"].as_str().is_some_and(|t| t.ends_with("-01")));
    }
    // 50 requests make 200 spans: a queue of 8 drops most, and what is
    // sent fails. (The metrics are the process's: other tests export.)
    eventually(Duration::from_secs(10), "dropped and failed spans in /metrics", || async {
        let m = send(edge.bound.admin, Req::get("/metrics")).await.text();
        (m.contains("stoke_trace_spans_total{result=\"dropped\"}")
            && m.contains("stoke_trace_spans_total{result=\"failed\"}"))
        .then_some(())
    })
    .await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracing_is_turned_on_and_off_by_a_live_reload() {
    logs();
    let receiver = Receiver::start().await;
    let (upstream, _task) = echo_upstream(false).await;
    let without = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\npath_prefix = \"/\"\nservice = \"m\"\n",
        pool("fra-a", "fra", &["m"], &[upstream], ""),
    );
    let with = format!("{without}{}", receiver.config("sample = 1.0"));
    let file = ConfigFile::new(&without);
    let edge = edge_from(&file, "fra").await;
    let http = edge.bound.http.expect("http");
    let sent = || async {
        let r = send(http, Req::get("/x")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["headers"]["traceparent"].as_str().map(str::to_owned)
    };
    assert_eq!(sent().await, None, "no [tracing], no trace");

    file.rewrite(&with);
    let parent =
        eventually(Duration::from_secs(10), "a trace started after the reload", || async { sent().await }).await;
    let trace = unhex(&parent[3..35]);
    let spans = receiver.trace(&trace, 4).await;
    assert!(spans.iter().any(|s| s.kind == SpanKind::Client as i32 && s.span_id == unhex(&parent[36..52])));

    file.rewrite(&without);
    eventually(Duration::from_secs(10), "no trace after the next reload", || async {
        sent().await.is_none().then_some(())
    })
    .await;
    edge.shutdown().await;
}
