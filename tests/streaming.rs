//! Streams pass through unbuffered, in-flight counts are exact however a
//! request ends, and shutdown lets in-flight requests finish.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;

fn one_pool(replica: std::net::SocketAddr, extra: &str) -> String {
    format!("{EDGE}{LOCATIONS}{}{BODY_ROUTE}", pool("fra-a", "fra", &["m"], &[replica], extra))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_while_the_replica_is_still_generating() {
    logs();
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let (edge, _file) = edge(&one_pool(rep.addr, ""), "fra").await;
    let addr = edge.bound.http.expect("http");

    let resp = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 20))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    let mut body = resp.into_body();
    let first = loop {
        let frame = body.frame().await.expect("a frame").expect("no error");
        if let Ok(data) = frame.into_data() {
            if !data.is_empty() {
                break data;
            }
        }
    };
    assert!(first.starts_with(b"data: {"), "{first:?}");
    // The first event is here and the replica is still generating the
    // other nineteen: nothing was buffered on the way.
    assert_eq!(rep.stats.running.load(Ordering::Relaxed), 1);
    let mut rest = Vec::from(&first[..]);
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.expect("frame").into_data() {
            rest.extend_from_slice(&d);
        }
    }
    let text = String::from_utf8(rest).expect("utf-8");
    assert_eq!(text.matches("data: ").count(), 22, "20 tokens, a final chunk and [DONE]");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_is_exact_for_complete_and_streamed_requests() {
    logs();
    let rep = replica("fra-1").await;
    let (edge, _file) = edge(&one_pool(rep.addr, ""), "fra").await;
    let addr = edge.bound.http.expect("http");
    for stream in [false, true] {
        let mut tasks = Vec::new();
        // Fewer than the replica's 16 slots: all are admitted at once.
        for _ in 0..12 {
            tasks.push(tokio::spawn(send(addr, Req::post("/v1/chat/completions", chat_body("m", stream, 8)))));
        }
        for t in tasks {
            assert_eq!(t.await.expect("task").status, 200);
        }
        assert_drained(&edge).await;
    }
    // Upstream connections are pooled: 24 requests, a dozen at a time,
    // need no more than a dozen connections (plus the health probes').
    let conns = rep.stats.connections.load(Ordering::Relaxed);
    let probes = 10; // one per 100 ms probe, generously
    assert!(conns <= 12 + probes, "{conns} upstream connections for 24 requests");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    logs();
    let rep = replica("fra-1").await;
    let (edge, _file) = edge(&one_pool(rep.addr, ""), "fra").await;
    let addr = edge.bound.http.expect("http");
    let before = rep.stats.connections.load(Ordering::Relaxed);
    let started = std::time::Instant::now();
    for _ in 0..50 {
        assert_eq!(send(addr, Req::chat("m")).await.status, 200);
    }
    let probes = started.elapsed().as_millis() as u64 / 100 + 2;
    let opened = rep.stats.connections.load(Ordering::Relaxed) - before;
    assert!(opened <= 1 + probes, "{opened} connections for 50 sequential requests ({probes} for probes)");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_stream_frees_the_slot_and_stops_the_replica() {
    logs();
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let (edge, _file) = edge(&one_pool(rep.addr, ""), "fra").await;
    let addr = edge.bound.http.expect("http");

    let resp = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 200))).await;
    let mut body = resp.into_body();
    let _ = body.frame().await;
    assert_eq!(in_flight(&edge)[0].1, 1);
    drop(body); // the client goes away (its connection task ends)
    assert_drained(&edge).await;
    eventually(Duration::from_secs(5), "the replica stops generating", || async {
        (rep.stats.aborted.load(Ordering::Relaxed) == 1 && rep.stats.running.load(Ordering::Relaxed) == 0).then_some(())
    })
    .await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_dying_mid_stream_frees_the_slot() {
    logs();
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let (edge, _file) = edge(&one_pool(rep.addr, ""), "fra").await;
    let addr = edge.bound.http.expect("http");

    let resp = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 200))).await;
    let mut body = resp.into_body();
    let _ = body.frame().await;
    rep.kill().await;
    // The client sees the stream end early (error or truncation), never hangs.
    let mut ended = false;
    for _ in 0..1000 {
        match body.frame().await {
            None | Some(Err(_)) => {
                ended = true;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    assert!(ended, "the stream must end");
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_timeout_is_504_and_frees_the_slot() {
    logs();
    let (hole, _task) = echo_upstream(true).await;
    let (edge, _file) = edge(&one_pool(hole, "read_timeout = \"300ms\""), "fra").await;
    let addr = edge.bound.http.expect("http");
    let r = send(addr, Req::chat("m")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_stream_finish() {
    logs();
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let (edge, _file) = edge(&one_pool(rep.addr, ""), "fra").await;
    let addr = edge.bound.http.expect("http");

    let resp = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 20))).await;
    let reader = tokio::spawn(collect(resp));
    let stopping = tokio::spawn(edge.shutdown());
    // New connections are refused once the listener is closed.
    eventually(Duration::from_secs(5), "listener closed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    let done = reader.await.expect("reader");
    assert_eq!(done.status, 200);
    assert!(done.text().ends_with("data: [DONE]\n\n"), "the stream completed: {}", done.text());
    assert!(stopping.await.expect("shutdown"), "drained within the timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_cut_by_the_replicas_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    logs();
    let (up, _task) = echo_upstream(false).await;
    let route = "\n[[route]]\npath_prefix = \"/\"\nservice = \"m\"\n";
    let file = format!("{EDGE}{LOCATIONS}{}{route}", pool("fra-a", "fra", &["m"], &[up], "read_timeout = \"300ms\""));
    let (edge, _file) = edge(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    // A chunked upload whose parts come further apart than the replica's
    // read timeout: that timeout counts from the body's end, not while
    // the client is still sending it.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nfirst\r\n",
    )
    .await
    .expect("head");
    tokio::time::sleep(Duration::from_millis(700)).await;
    s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.expect("rest");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await.expect("answered").expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_len\":11"), "the whole body reached the replica: {answer}");
    assert_drained(&edge).await;
    edge.shutdown().await;
}
