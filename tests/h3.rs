//! HTTP/3 through the edge with a quinn + h3 client: GET, a POST routed by
//! the body's model with the body intact, an SSE stream, Alt-Svc on HTTPS
//! answers, and in-flight counts back to zero after resets.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use stoke_router::sim::OrchestratorOptions;
use support::*;

struct World {
    edge: stoke_router::edge::Edge,
    _file: ConfigFile,
    root: rustls::pki_types::CertificateDer<'static>,
    fra: stoke_router::sim::Replica,
    sin: stoke_router::sim::Replica,
}

async fn world() -> World {
    let fra = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let sin = replica("sin-1").await;
    let (pem, key, der) = certificate(&["localhost"]);
    let text = format!(
        "[edge]\nhttps = \"127.0.0.1:0\"\nh3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\ndebug_headers = true\n\
         [[tls]]\nhosts = [\"localhost\"]\ncert = \"c.crt\"\nkey = \"c.key\"\n{LOCATIONS}{}{}\n\
         [[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\n\
         [[route]]\npath_prefix = \"/api/\"\nservice = \"small\"\nstrip_prefix = true\n",
        pool("fra-a", "fra", &["small"], &[fra.addr], ""),
        pool("sin-a", "sin", &["big"], &[sin.addr], ""),
    );
    let file = ConfigFile::new(&text);
    file.write("c.crt", pem.as_bytes());
    file.write("c.key", key.as_bytes());
    let edge = edge_from(&file, "fra").await;
    World { edge, _file: file, root: der, fra, sin }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_routed_by_the_body_over_http3() {
    logs();
    let w = world().await;
    let h3 = w.edge.bound.h3.expect("h3 listener");
    let mut c = h3_client(h3, w.root.clone()).await;

    let r = c.request("GET", "/api/v1/models", None, &[]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers.get("stoke-pool").and_then(|v| v.to_str().ok()), Some("fra-a"));
    assert_eq!(r.headers.get("x-request-id").map(|v| v.len()), Some(32));

    for size in [100usize, 300 * 1024] {
        let pad = "x".repeat(size);
        let body = serde_json::json!({"messages": [{"role": "user", "content": pad}], "model": "big", "max_tokens": 2})
            .to_string();
        let r = c
            .request("POST", "/v1/chat/completions", Some(body.as_bytes()), &[("content-type", "application/json")])
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.headers.get("stoke-pool").and_then(|v| v.to_str().ok()), Some("sin-a"));
        assert!(w.sin.last_body() == body.as_bytes(), "{size} byte body changed on the way");
    }
    // Errors are proper HTTP/3 answers.
    let r = c.request("POST", "/v1/chat/completions", Some(b"{\"model\":\"nope\"}"), &[]).await;
    assert_eq!(r.status, 404);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_drained(&w.edge).await;
    w.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_over_http3() {
    logs();
    let w = world().await;
    let mut c = h3_client(w.edge.bound.h3.expect("h3"), w.root.clone()).await;
    let req = http::Request::post(format!("{}/v1/chat/completions", c.base)).body(()).expect("req");
    let mut s = c.send.send_request(req).await.expect("send");
    s.send_data(Bytes::from(chat_body("small", true, 20))).await.expect("body");
    s.finish().await.expect("finish");
    let resp = s.recv_response().await.expect("head");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let mut first = s.recv_data().await.expect("data").expect("first event");
    let first = first.copy_to_bytes(first.remaining());
    assert!(first.starts_with(b"data: {"), "{first:?}");
    assert_eq!(w.fra.stats.running.load(Ordering::Relaxed), 1, "the replica is still generating");
    let mut all = first.to_vec();
    while let Some(mut c) = s.recv_data().await.expect("data") {
        all.extend_from_slice(&c.copy_to_bytes(c.remaining()));
    }
    let text = String::from_utf8(all).expect("utf-8");
    assert_eq!(text.matches("data: ").count(), 22);
    assert_drained(&w.edge).await;
    w.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_closed_connections_free_the_slot() {
    logs();
    let w = world().await;
    let h3 = w.edge.bound.h3.expect("h3");

    // The client stops reading a stream.
    let mut c = h3_client(h3, w.root.clone()).await;
    let req = http::Request::post(format!("{}/v1/chat/completions", c.base)).body(()).expect("req");
    let mut s = c.send.send_request(req).await.expect("send");
    s.send_data(Bytes::from(chat_body("small", true, 400))).await.expect("body");
    s.finish().await.expect("finish");
    let _ = s.recv_response().await.expect("head");
    let _ = s.recv_data().await.expect("one event");
    assert_eq!(in_flight(&w.edge)[0].1, 1);
    drop(s);
    assert_drained(&w.edge).await;
    eventually(Duration::from_secs(5), "the replica stops generating", || async {
        (w.fra.stats.aborted.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;

    // The client closes its whole connection mid-stream.
    let mut c = h3_client(h3, w.root.clone()).await;
    let req = http::Request::post(format!("{}/v1/chat/completions", c.base)).body(()).expect("req");
    let mut s = c.send.send_request(req).await.expect("send");
    s.send_data(Bytes::from(chat_body("small", true, 400))).await.expect("body");
    s.finish().await.expect("finish");
    let _ = s.recv_response().await.expect("head");
    assert_eq!(in_flight(&w.edge)[0].1, 1);
    c.conn.close(quinn::VarInt::from_u32(0x10c), b"bye");
    assert_drained(&w.edge).await;
    w.edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_answers_advertise_http3() {
    logs();
    let w = world().await;
    let port = w.edge.bound.h3.expect("h3").port();
    let https = w.edge.bound.https.expect("https");
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let r = send_tls(
            https,
            std::slice::from_ref(&w.root),
            "localhost",
            &[alpn],
            Req::get("/api/v1/models").host("localhost"),
        )
        .await;
        assert_eq!(r.resp.status, 200);
        assert_eq!(r.resp.header("alt-svc"), Some(format!("h3=\":{port}\"; ma=86400").as_str()), "{:?}", r.alpn);
        // Answers the edge makes itself advertise it too: the model list
        // of a body-routed route, and an error.
        for (path, status) in [("/v1/models", 200), ("/nowhere", 404)] {
            let r =
                send_tls(https, std::slice::from_ref(&w.root), "localhost", &[alpn], Req::get(path).host("localhost"))
                    .await;
            assert_eq!(r.resp.status, status, "{path}");
            assert_eq!(
                r.resp.header("alt-svc"),
                Some(format!("h3=\":{port}\"; ma=86400").as_str()),
                "{path} over {:?}",
                r.alpn
            );
        }
    }
    // And so do answers over HTTP/3 itself, forwarded or the edge's own.
    let mut c = h3_client(w.edge.bound.h3.expect("h3"), w.root.clone()).await;
    for path in ["/api/v1/models", "/v1/models", "/nowhere"] {
        let r = c.request("GET", path, None, &[]).await;
        assert_eq!(
            r.headers.get("alt-svc").and_then(|v| v.to_str().ok()),
            Some(format!("h3=\":{port}\"; ma=86400").as_str()),
            "{path} over HTTP/3"
        );
    }
    c.conn.close(quinn::VarInt::from_u32(0x100), b"done");
    w.edge.shutdown().await;
}

/// A config file with `edge` as the body of its `[edge]` table, the
/// localhost certificate as its `[[tls]]`, the test locations and `rest`
/// (pools and routes); and the certificate's root, for clients.
fn tls_config(edge: &str, rest: &str) -> (ConfigFile, rustls::pki_types::CertificateDer<'static>) {
    let (pem, key, der) = certificate(&["localhost"]);
    let file = ConfigFile::new(&format!(
        "[edge]\n{edge}\n[[tls]]\nhosts = [\"localhost\"]\ncert = \"c.crt\"\nkey = \"c.key\"\n{LOCATIONS}{rest}"
    ));
    file.write("c.crt", pem.as_bytes());
    file.write("c.key", key.as_bytes());
    (file, der)
}

/// A replica that answers the first request on each connection and keeps
/// the connection open, then closes it without an answer when a second
/// request arrives on it: what a replica that restarted, or timed out an
/// idle connection, does to a request sent on a pooled connection.
async fn one_answer_per_connection() -> (SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let lost = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = lost.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let lost = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = false;
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    buf.clear();
                    if answered {
                        lost.fetch_add(1, Ordering::Relaxed);
                        return; // closed with the request unanswered
                    }
                    answered = true;
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_on_a_stale_pooled_connection_is_retried_on_every_protocol() {
    logs();
    let (upstream, lost) = one_answer_per_connection().await;
    let (file, der) = tls_config(
        "http = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nh3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"",
        &format!(
            "{}\n[[route]]\npath_prefix = \"/\"\nservice = \"small\"\n",
            pool_probed("fra-a", "fra", &["small"], &[upstream], SLOW_PROBES, "")
        ),
    );
    let edge = edge_from(&file, "fra").await;

    // HTTP/1.1: the second request goes out on the pooled connection,
    // which the replica drops; it is sent again on a new one.
    let http = edge.bound.http.expect("http");
    for i in 0..3 {
        let r = send(http, Req::get("/x")).await;
        assert_eq!(r.status, 200, "HTTP/1.1 request {i}: {}", r.text());
    }
    let lost_h1 = lost.load(Ordering::Relaxed);
    assert!(lost_h1 >= 1, "no request went out on a stale connection");

    // HTTP/3, over the same kind of pooled upstream connection.
    let mut c = h3_client(edge.bound.h3.expect("h3"), der).await;
    for i in 0..3 {
        let r = c.request("GET", "/x", None, &[]).await;
        assert_eq!(r.status, 200, "HTTP/3 request {i}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.body, b"ok");
    }
    assert!(lost.load(Ordering::Relaxed) > lost_h1, "no HTTP/3 request went out on a stale connection");
    c.conn.close(quinn::VarInt::from_u32(0x100), b"done");
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_client_that_leaves_while_held_is_never_forwarded() {
    logs();
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");
    let (listener, orch) = orchestrator_listener().await;
    let (file, der) = tls_config(
        "h3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"",
        &format!(
            "{}\n[[route]]\npath_prefix = \"/v1/\"\nservice = \"m\"\nmax_wait = \"30s\"\n",
            scaled_pool("fra-a", "fra", &["m"], &[free_addr()], orch, "wake_time = \"300ms\"")
        ),
    );
    let orch =
        start_orchestrator(listener, &file, OrchestratorOptions { ignore_wakes: true, ..Default::default() }).await;
    let edge = edge_from(&file, "fra").await;
    let queue = || async { pool_state(&edge, "fra-a").await["queue"].as_u64() };
    let post = || {
        http::Request::post(format!("https://localhost:{}/v1/chat/completions", edge.bound.h3.expect("h3").port()))
            .header("content-type", "application/json")
            .header("content-length", "1000")
            .body(())
            .expect("request")
    };

    // The client resets its stream with the body half sent.
    let mut c = h3_client(edge.bound.h3.expect("h3"), der.clone()).await;
    let mut s = c.send.send_request(post()).await.expect("send");
    s.send_data(Bytes::from_static(b"{\"model\":\"m\",")).await.expect("part of the body");
    eventually(Duration::from_secs(5), "HTTP/3 request held", || async { (queue().await == Some(1)).then_some(()) })
        .await;
    s.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    eventually(Duration::from_secs(2), "stream reset: queue empty", || async {
        (queue().await == Some(0)).then_some(())
    })
    .await;

    // The client stops reading the answer (STOP_SENDING) of a request whose
    // body it finished: nothing was written to it yet.
    let mut s = c.send.send_request(post()).await.expect("send");
    s.send_data(Bytes::from(vec![b' '; 1000])).await.expect("body");
    s.finish().await.expect("finish");
    eventually(Duration::from_secs(5), "HTTP/3 request held", || async { (queue().await == Some(1)).then_some(()) })
        .await;
    s.stop_sending(h3::error::Code::H3_REQUEST_CANCELLED);
    eventually(Duration::from_secs(2), "STOP_SENDING: queue empty", || async {
        (queue().await == Some(0)).then_some(())
    })
    .await;
    drop(s);

    // The client closes its connection while held.
    let mut s = c.send.send_request(post()).await.expect("send");
    s.send_data(Bytes::from(vec![b' '; 1000])).await.expect("body");
    s.finish().await.expect("finish");
    eventually(Duration::from_secs(5), "HTTP/3 request held", || async { (queue().await == Some(1)).then_some(()) })
        .await;
    c.conn.close(quinn::VarInt::from_u32(0x10c), b"bye");
    eventually(Duration::from_secs(2), "connection closed: queue empty", || async {
        (queue().await == Some(0)).then_some(())
    })
    .await;

    assert_nothing_reached(&edge, &orch, "fra-a").await;
    assert_drained(&edge).await;
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_connections_count_against_max_connections() {
    logs();
    let rep = replica("fra-1").await;
    let (file, der) = tls_config(
        "http = \"127.0.0.1:0\"\nh3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nmax_connections = 1",
        &format!(
            "{}\n[[route]]\npath_prefix = \"/\"\nservice = \"small\"\n",
            pool("fra-a", "fra", &["small"], &[rep.addr], "")
        ),
    );
    let edge = edge_from(&file, "fra").await;
    let h3 = edge.bound.h3.expect("h3");
    let mut first = h3_client(h3, der.clone()).await;
    assert_eq!(first.request("GET", "/v1/models", None, &[]).await.status, 200);
    // The one connection allowed is taken: a second QUIC connection is
    // refused at its handshake, and so is a TCP one.
    assert!(try_h3(h3, der.clone()).await.is_err(), "a second HTTP/3 connection was accepted");
    let mut tcp = tokio::net::TcpStream::connect(edge.bound.http.expect("http")).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.write_all(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.expect("answered or closed");
    assert!(matches!(read, Ok(0) | Err(_)), "a TCP connection beyond max_connections was served");
    // Once the first goes, a new one is served.
    first.conn.close(quinn::VarInt::from_u32(0x100), b"done");
    drop(first);
    eventually(Duration::from_secs(5), "a new HTTP/3 connection once the first closed", || {
        let der = der.clone();
        async move { try_h3(h3, der).await.ok() }
    })
    .await;
    edge.shutdown().await;
}

/// Open an HTTP/3 connection; an error if the handshake fails.
async fn try_h3(addr: SocketAddr, root: rustls::pki_types::CertificateDer<'static>) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).map_err(|e| e.to_string())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(addr, "localhost").map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
    conn.close(quinn::VarInt::from_u32(0x100), b"probe");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_the_limits_get_431_on_every_protocol() {
    logs();
    let rep = replica("fra-1").await;
    let (file, der) = tls_config(
        "http = \"127.0.0.1:0\"\nh3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nmax_headers = 8\nmax_header_bytes = \"1KiB\"",
        &format!("{}\n[[route]]\npath_prefix = \"/\"\nservice = \"small\"\n", pool("fra-a", "fra", &["small"], &[rep.addr], "")),
    );
    let edge = edge_from(&file, "fra").await;
    let http = edge.bound.http.expect("http");
    let many: Vec<(String, String)> = (0..20).map(|i| (format!("x-h{i}"), "1".to_owned())).collect();
    let big = vec![("x-big".to_owned(), "b".repeat(2000))];
    let mut c = h3_client(edge.bound.h3.expect("h3"), der).await;
    for (what, headers) in [("20 fields", &many), ("2000 bytes", &big)] {
        let with = |mut r: Req| {
            for (k, v) in headers {
                r = r.header(k, v);
            }
            r
        };
        let h1 = send(http, with(Req::get("/v1/models"))).await;
        let h2 = send_h2c(http, with(Req::get("/v1/models"))).await;
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let h3 = c.request("GET", "/v1/models", None, &hs).await;
        let answers = [
            ("HTTP/1.1", h1.status.as_u16(), h1.json()),
            ("HTTP/2", h2.status.as_u16(), h2.json()),
            ("HTTP/3", h3.status, serde_json::from_slice(&h3.body).unwrap_or_default()),
        ];
        for (proto, status, body) in answers {
            assert_eq!(status, 431, "{what} over {proto}: {body}");
            assert_eq!(body["error"]["code"], "headers_too_large", "{what} over {proto}");
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("at most 8 fields and 1024 bytes"),
                "{what} over {proto}: the same rule and message: {message}"
            );
        }
    }
    assert_eq!(rep.stats.requests.load(Ordering::Relaxed), 0, "nothing over the limits reached the replica");
    c.conn.close(quinn::VarInt::from_u32(0x100), b"done");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_stream_held_for_a_wake_says_it_is_held() {
    logs();
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");
    let (listener, orch) = orchestrator_listener().await;
    let (file, der) = tls_config(
        "h3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"",
        &format!("{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"5s\"\nhold_keepalive = \"200ms\"\n", scaled_pool("fra-a", "fra", &["m"], &[free_addr()], orch, "wake_time = \"1s\"")),
    );
    let opts = OrchestratorOptions { boot_time: Some(Duration::from_millis(1200)), ..Default::default() };
    let orch = start_orchestrator(listener, &file, opts).await;
    let edge = edge_from(&file, "fra").await;
    let mut c = h3_client(edge.bound.h3.expect("h3"), der).await;
    let body = chat_body("m", true, 5);
    let r =
        c.request("POST", "/v1/chat/completions", Some(body.as_bytes()), &[("content-type", "application/json")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.starts_with(": waking fra-a, eta "), "{text}");
    assert!(text.matches("\n: ").count() >= 2, "comments every 200 ms while the pool boots: {text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    c.conn.close(quinn::VarInt::from_u32(0x100), b"done");
    assert_drained(&edge).await;
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_http3_body_lost_on_a_stale_connection_is_sent_again_from_the_retry_buffer() {
    logs();
    let (upstream, lost) = one_answer_per_connection().await;
    let (file, der) = tls_config(
        "h3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"",
        &format!(
            "{}\n[[route]]\npath_prefix = \"/\"\nservice = \"small\"\n",
            pool_probed("fra-a", "fra", &["small"], &[upstream], SLOW_PROBES, "")
        ),
    );
    let edge = edge_from(&file, "fra").await;
    let mut c = h3_client(edge.bound.h3.expect("h3"), der).await;
    // A first request leaves a pooled upstream connection behind.
    assert_eq!(c.request("GET", "/x", None, &[]).await.status, 200);
    // The edge returns that connection to its pool just after the answer
    // ends (nothing tells the client when): wait until it shows it kept.
    eventually(Duration::from_secs(5), "the upstream connection kept idle", || async {
        (idle_connections(&edge, "fra-a").await == 1).then_some(())
    })
    .await;
    // A body without a length, sent in two parts: it streams upstream on
    // the pooled connection, which the replica drops. What went upstream is
    // kept (it is under the retry buffer), so the request goes again, whole,
    // on a new connection.
    let req = http::Request::post(format!("{}/upload", c.base)).body(()).expect("request");
    let mut s = c.send.send_request(req).await.expect("send");
    s.send_data(Bytes::from_static(b"first part, ")).await.expect("part 1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.send_data(Bytes::from_static(b"second part")).await.expect("part 2");
    s.finish().await.expect("finish");
    let resp = s.recv_response().await.expect("response");
    assert_eq!(resp.status(), 200, "a streamed body under the retry buffer was not sent again");
    assert!(lost.load(Ordering::Relaxed) >= 1);
    c.conn.close(quinn::VarInt::from_u32(0x100), b"done");
    edge.shutdown().await;
}

/// A pool put to sleep behind this edge's back (its home edge elsewhere,
/// before this edge's next probe): the HTTP/3 request that finds its
/// replica gone is held for the wake, as on HTTP/1.1, not answered 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_request_whose_pool_went_to_sleep_under_it_waits_for_the_wake() {
    logs();
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");
    let (listener, orch) = orchestrator_listener().await;
    // Probes a minute apart: only the failed connection tells the edge.
    let mut pool = pool_probed("fra-a", "fra", &["m"], &[free_addr()], SLOW_PROBES, "");
    pool.push_str(&format!(
        "[pool.scale]\nwake = {{ url = \"http://{orch}/pools/fra-a/wake\", token_env = \"STOKE_TEST_ORCH_TOKEN\" }}\n\
         wake_time = \"300ms\"\nidle_timeout = \"1h\"\n"
    ));
    let (file, der) = tls_config(
        "h3 = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"",
        &format!("{pool}\n[[route]]\npath_prefix = \"/v1/\"\nservice = \"m\"\nmax_wait = \"10s\"\n"),
    );
    let orch = start_orchestrator(listener, &file, OrchestratorOptions::default()).await;
    let edge = edge_from(&file, "fra").await;
    let mut c = h3_client(edge.bound.h3.expect("h3"), der).await;
    let body = chat_body("m", false, 4);
    let headers = [("content-type", "application/json")];
    let r = c.request("POST", "/v1/chat/completions", Some(body.as_bytes()), &headers).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The pool stops; this edge still counts its replica ready.
    orch.stop_pool("fra-a").await;
    assert_eq!(pool_state(&edge, "fra-a").await["state"], "warm");
    let r = c.request("POST", "/v1/chat/completions", Some(body.as_bytes()), &headers).await;
    assert_eq!(r.status, 200, "held for the wake: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(orch.calls_for("fra-a", "wake").len(), 2, "woken again");
    c.conn.close(quinn::VarInt::from_u32(0x100), b"done");
    assert_drained(&edge).await;
    edge.shutdown().await;
    orch.shutdown().await;
}
