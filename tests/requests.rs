//! The service from the body or a header, bodies forwarded byte-identical,
//! the error answers, and the headers stoke adds and removes.

mod support;

use bytes::Bytes;
use support::*;

fn body_config(fra: std::net::SocketAddr, sin: std::net::SocketAddr) -> String {
    format!(
        "{EDGE}{LOCATIONS}{}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\n\
         \n[[route]]\npath_prefix = \"/h/\"\nservice_from = \"header:x-model\"\nstrip_prefix = true\n",
        pool("fra-a", "fra", &["small"], &[fra], ""),
        pool("sin-a", "sin", &["big"], &[sin], ""),
    )
}

/// A JSON body of about `size` bytes for `model`.
fn sized_body(model: &str, size: usize) -> Bytes {
    let pad = "x".repeat(size.saturating_sub(80));
    Bytes::from(
        serde_json::json!({"messages": [{"role": "user", "content": pad}], "model": model, "max_tokens": 2})
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_from_the_body_picks_the_pool_and_the_body_arrives_intact() {
    logs();
    let fra = replica("fra-1").await;
    let sin = replica("sin-1").await;
    let (edge, _file) = edge(&body_config(fra.addr, sin.addr), "fra").await;
    let addr = edge.bound.http.expect("http");
    // Sizes below, at and well above pingora's 64 KiB retry buffer, up to
    // the 1 MiB limit.
    for size in [100, 64 * 1024 - 10, 64 * 1024 + 10, 300 * 1024, 1_000_000] {
        for (model, rep, pool_id) in [("small", &fra, "fra-a"), ("big", &sin, "sin-a")] {
            let body = sized_body(model, size);
            let r = send(addr, Req::post("/v1/chat/completions", body.clone())).await;
            assert_eq!(r.status, 200, "{size} bytes: {}", r.text());
            assert_eq!(r.header("stoke-pool"), Some(pool_id));
            assert!(rep.last_body() == body, "{size} byte body changed on the way");
        }
    }
    // The same over HTTP/2 (h2c, prior knowledge).
    for size in [100, 200 * 1024] {
        let body = sized_body("big", size);
        let r = send_h2c(addr, Req::post("/v1/chat/completions", body.clone())).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("stoke-pool"), Some("sin-a"));
        assert!(sin.last_body() == body, "h2 body changed");
    }
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies() {
    logs();
    let fra = replica("fra-1").await;
    let sin = replica("sin-1").await;
    let (edge, _file) = edge(&body_config(fra.addr, sin.addr), "fra").await;
    let addr = edge.bound.http.expect("http");

    let body = sized_body("big", 20_000);
    let chunks: Vec<Bytes> = body.chunks(3000).map(Bytes::copy_from_slice).collect();
    let r = send_chunked(addr, "/v1/chat/completions", chunks).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(sin.last_body() == body);

    // Over the retry buffer without a length: cannot be replayed, so it is
    // refused rather than left hanging.
    let big = sized_body("big", 200_000);
    let chunks: Vec<Bytes> = big.chunks(8000).map(Bytes::copy_from_slice).collect();
    let r = send_chunked(addr, "/v1/chat/completions", chunks).await;
    assert_eq!(r.status, 411, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "length_required");
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_json_errors() {
    logs();
    let fra = replica("fra-1").await;
    let sin = replica("sin-1").await;
    let (edge, _file) = edge(&body_config(fra.addr, sin.addr), "fra").await;
    let addr = edge.bound.http.expect("http");

    let cases: Vec<(Req, u16, &str, &str)> = vec![
        (Req::get("/nowhere"), 404, "no_route", "no route for host"),
        (Req::post("/v1/chat/completions", "not json"), 400, "invalid_body", "not a JSON object"),
        (Req::post("/v1/chat/completions", "{\"messages\":[]}"), 400, "invalid_body", "no \"model\" field"),
        (Req::post("/v1/chat/completions", "{\"model\":42}"), 400, "invalid_body", "must be a string"),
        (
            Req::post("/v1/chat/completions", "{\"model\":\"small\",\"model\":\"big\"}"),
            400,
            "invalid_body",
            "\"model\" field more than once",
        ),
        (Req::chat("gpt-nonexistent"), 404, "model_not_found", "gpt-nonexistent"),
        (Req::post("/v1/chat/completions", sized_body("small", 2 << 20)), 413, "body_too_large", "max_body_read"),
        (Req::get("/h/v1/models"), 400, "missing_model", "x-model"),
        (Req::get("/h/v1/models").header("x-model", "nope"), 404, "model_not_found", "x-model"),
    ];
    for (req, status, code, needle) in cases {
        let path = req.path.clone();
        let r = send(addr, req).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{path}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains(needle)), "{path}: {v}");
        assert!(r.header("x-request-id").is_some());
    }
    // The OpenAI model list is answered by the edge on a body route.
    let r = send(addr, Req::get("/v1/models")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ids: Vec<String> =
        r.json()["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(ids, ["small", "big"]);
    // The model from a header, with the prefix stripped.
    let r = send(addr, Req::get("/h/v1/models").header("x-model", "big")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("stoke-pool"), Some("sin-a"));
    assert_eq!(r.json()["object"], "list");
    assert_drained(&edge).await;
    edge.shutdown().await;
}

/// A client that sends its whole (too large) body before it reads the
/// answer gets the answer, not a reset connection: the edge answers 413 at
/// once from Content-Length, then reads and drops the rest of the body
/// before it closes (a lingering close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_still_being_sent_gets_the_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    logs();
    let fra = replica("fra-1").await;
    let sin = replica("sin-1").await;
    let (edge, _file) = edge(&body_config(fra.addr, sin.addr), "fra").await;
    let addr = edge.bound.http.expect("http");
    for _ in 0..3 {
        let len = 8usize << 20;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("head");
        // Give the edge time to answer and, without lingering, to close.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let chunk = vec![b' '; 64 << 10];
        for _ in 0..len / chunk.len() {
            s.write_all(&chunk).await.expect("the edge reads the rest of the body instead of resetting");
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        read.expect("answered in time").expect("the answer, not a reset");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("body_too_large"), "{text}");
    }
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_and_hop_by_hop_headers() {
    logs();
    let (echo, _task) = echo_upstream(false).await;
    let text = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nhost = \"api.example.com\"\npath_prefix = \"/svc/\"\nservice = \"m\"\nstrip_prefix = true\n",
        pool("fra-a", "fra", &["m"], &[echo], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");

    let r = send(
        addr,
        Req::get("/svc/v1/models?x=1")
            .host("API.example.com:8080")
            .header("x-forwarded-for", "6.6.6.6")
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic eA==")
            .header("x-custom", "kept"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    let h = &seen["headers"];
    assert_eq!(seen["path"], "/v1/models?x=1", "prefix stripped, query kept");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "a client's own X-Forwarded-For is replaced");
    assert_eq!(h["x-forwarded-host"], "API.example.com:8080");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-custom"], "kept");
    for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(h.get(gone).is_none(), "{gone} must not be forwarded: {h}");
    }
    let id = r.header("x-request-id").expect("request id on the response");
    assert_eq!(h["x-request-id"], id, "the same id upstream and downstream");
    assert_eq!(id.len(), 32);
    assert_eq!(r.header("stoke-edge"), Some("fra"));
    assert_eq!(r.header("stoke-pool"), Some("fra-a"));
    assert_eq!(r.header("stoke-replica"), Some(echo.to_string().as_str()));
    assert_eq!(r.header("stoke-wait-ms"), Some("0"));

    // A client's request id is kept.
    let r = send(addr, Req::get("/svc/x").host("api.example.com").header("x-request-id", "client-id-1")).await;
    assert_eq!(r.header("x-request-id"), Some("client-id-1"));
    assert_eq!(r.json()["headers"]["x-request-id"], "client-id-1");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_headers_are_off_by_default() {
    logs();
    let (echo, _task) = echo_upstream(false).await;
    let text = format!(
        "[edge]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n{LOCATIONS}{}\n[[route]]\nservice = \"m\"\n",
        pool("fra-a", "fra", &["m"], &[echo], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let r = send(edge.bound.http.expect("http"), Req::get("/x")).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-request-id").is_some());
    for h in ["stoke-edge", "stoke-pool", "stoke-replica", "stoke-wait-ms"] {
        assert!(r.header(h).is_none(), "{h} present without debug_headers");
    }
    edge.shutdown().await;
}

/// `CONNECT` asks for a tunnel: the edge answers 405 with its own JSON
/// error, and nothing reaches a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_the_edges_own_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fra = replica("fra-1").await;
    let sin = replica("sin-1").await;
    let (edge, _file) = edge(&body_config(fra.addr, sin.addr), "fra").await;
    let mut s = tokio::net::TcpStream::connect(edge.bound.http.expect("http")).await.expect("connect");
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n").await.expect("send");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the JSON body has arrived (or the edge closes).
    while !answer.ends_with(b"}") {
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await;
        match read.expect("answered in time") {
            Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(text.contains("\"method_not_allowed\""), "{text}");
    assert_eq!(fra.stats.requests.load(std::sync::atomic::Ordering::Relaxed), 0);
    edge.shutdown().await;
}
