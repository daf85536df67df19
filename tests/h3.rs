//! HTTP/3 through the edge with a quinn + h3 client: GET, a POST routed by
//! the body's model with the body intact, an SSE stream, Alt-Svc on HTTPS
//! answers, and in-flight counts back to zero after resets.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use support::*;

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

struct H3Client {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: SendRequest,
    base: String,
}

async fn h3_client(addr: SocketAddr, root: rustls::pki_types::CertificateDer<'static>) -> H3Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("root");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic client config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(addr, "localhost").expect("connect").await.expect("QUIC handshake");
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await.expect("h3 client");
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    H3Client { _endpoint: endpoint, conn, send, base: format!("https://localhost:{}", addr.port()) }
}

struct H3Resp {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl H3Client {
    async fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>, headers: &[(&str, &str)]) -> H3Resp {
        let mut req = http::Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.header("content-length", b.len());
        }
        let mut s = self.send.send_request(req.body(()).expect("request")).await.expect("send request");
        if let Some(b) = body {
            for chunk in b.chunks(16 * 1024) {
                s.send_data(Bytes::copy_from_slice(chunk)).await.expect("send body");
            }
        }
        s.finish().await.expect("finish");
        let resp = s.recv_response().await.expect("response");
        let mut out = Vec::new();
        while let Some(mut c) = s.recv_data().await.expect("body") {
            out.extend_from_slice(&c.copy_to_bytes(c.remaining()));
        }
        H3Resp { status: resp.status().as_u16(), headers: resp.headers().clone(), body: out }
    }
}

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
    }
    w.edge.shutdown().await;
}
