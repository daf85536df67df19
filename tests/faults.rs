//! Faults and hostile clients: a replica killed under load, upstreams that
//! stall mid-stream, a whole pool unreachable, an orchestrator that is down,
//! slowloris clients and a connection flood.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_fails_only_what_it_was_serving() {
    logs();
    let a = replica_with("r1", |o| o.tokens_per_sec = 200.0).await;
    let b = replica_with("r2", |o| o.tokens_per_sec = 200.0).await;
    // Slow probes: the failed connections, not a probe, must take r1 out.
    let text = format!(
        "{EDGE}{LOCATIONS}{}{BODY_ROUTE}",
        pool_probed("fra-a", "fra", &["m"], &[a.addr, b.addr], SLOW_PROBES, "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");

    // Long streams on both replicas.
    let mut streams = Vec::new();
    for _ in 0..6 {
        let resp = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 600))).await;
        let on = resp.headers().get("x-sim-replica").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        streams.push((on, tokio::spawn(async move { resp.into_body().collect().await.map(|b| b.to_bytes()) })));
    }
    assert!(streams.iter().any(|(on, _)| on == "r1") && streams.iter().any(|(on, _)| on == "r2"), "streams on both");

    // Short requests from four clients, before and after the kill.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            tokio::spawn(async move {
                while Instant::now() < stop_at {
                    let r = send(addr, Req::post("/v1/chat/completions", chat_body("m", false, 1))).await;
                    if r.status == 200 { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dead = a.addr;
    a.kill().await;
    for w in workers {
        w.await.expect("worker");
    }
    // Only what r1 had in hand could fail: at most one short request per
    // client, and the streams it was serving.
    assert!(failed.load(Ordering::Relaxed) <= 4, "{} short requests failed", failed.load(Ordering::Relaxed));
    assert!(ok.load(Ordering::Relaxed) > 20);
    for (on, s) in streams {
        let body = s.await.expect("task");
        let complete = body.as_ref().is_ok_and(|b| b.ends_with(b"data: [DONE]\n\n"));
        if on == "r2" {
            assert!(complete, "a stream on the surviving replica was cut");
        } else {
            assert!(!complete, "a stream on the killed replica cannot have finished");
        }
    }
    let live = edge.router.live();
    assert!(!live.pools[0].replicas.iter().find(|r| r.addr == dead).expect("r1").is_ready(), "r1 is marked down");
    // Afterwards every request succeeds.
    for _ in 0..10 {
        assert_eq!(send(addr, Req::chat("m")).await.status, 200);
    }
    assert_drained(&edge).await;
    edge.shutdown().await;
}

/// An upstream that answers `/health` and, for anything else, starts an SSE
/// answer, sends two events, then stalls forever.
async fn stalling_upstream() -> SocketAddr {
    use stoke_router::net::server::{serve_http, HttpBody};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = tx;
        serve_http(listener, rx, |req: http::Request<hyper::body::Incoming>| async move {
            if req.uri().path() == "/health" {
                return Ok(http::Response::new(HttpBody::Left(http_body_util::Full::new(Bytes::from_static(b"ok")))));
            }
            let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(2);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"data: {\"n\":1}\n\n")).await;
                let _ = tx.send_data(Bytes::from_static(b"data: {\"n\":2}\n\n")).await;
                std::future::pending::<()>().await;
                drop(tx);
            });
            let mut resp = http::Response::new(HttpBody::Right(body));
            resp.headers_mut().insert("content-type", http::HeaderValue::from_static("text/event-stream"));
            Ok(resp)
        })
        .await
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_stream_ends_the_stream_and_frees_the_slot() {
    logs();
    let up = stalling_upstream().await;
    let text =
        format!("{EDGE}{LOCATIONS}{}{BODY_ROUTE}", pool("fra-a", "fra", &["m"], &[up], "read_timeout = \"500ms\""));
    let (edge, _file) = edge(&text, "fra").await;
    let started = Instant::now();
    let resp = open(edge.bound.http.expect("http"), &Req::post("/v1/chat/completions", chat_body("m", true, 10))).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => got.extend_from_slice(f.data_ref().map(|d| &d[..]).unwrap_or(&[])),
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client is not left hanging");
    assert!(String::from_utf8_lossy(&got).contains("\"n\":2"), "the events sent before the stall arrived");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_pool_unreachable_moves_traffic_to_the_next() {
    logs();
    let reps = [replica("fra-1").await, replica("fra-2").await];
    let par = replica("par-1").await;
    let addrs: Vec<_> = reps.iter().map(|r| r.addr).collect();
    let text = format!(
        "{EDGE}{LOCATIONS}{}{}{BODY_ROUTE}",
        pool("fra-a", "fra", &["m"], &addrs, ""),
        pool("par-a", "par", &["m"], &[par.addr], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    assert_eq!(send(addr, Req::chat("m")).await.header("stoke-pool"), Some("fra-a"));
    let [r1, r2] = reps;
    r1.kill().await;
    r2.kill().await;
    // Every request succeeds (retried on the next pool), and within one
    // health interval (100 ms here) they all go there directly.
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_millis(600) {
        let r = send(addr, Req::chat("m")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        last = r.header("stoke-pool").unwrap_or("").to_owned();
    }
    assert_eq!(last, "par-a");
    assert!(edge.router.live().pools[0].replicas.iter().all(|r| !r.is_ready()));
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_that_is_down_still_gets_held_requests_answered_by_their_deadline() {
    logs();
    // The wake hook points at a port where nothing listens.
    let nothing = free_addr();
    let rep = free_addr();
    let text = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\nmax_wait = \"700ms\"\n",
        scaled_pool("fra-a", "fra", &["m"], &[rep], nothing, "wake_time = \"100ms\"")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let started = Instant::now();
    let r = send(edge.bound.http.expect("http"), Req::chat("m")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(650) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(pool_state(&edge, "fra-a").await["queue"], 0);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_do_not_slow_anyone_else_down() {
    logs();
    let rep = replica("fra-1").await;
    let text = format!(
        "{}{LOCATIONS}{}{BODY_ROUTE}",
        EDGE.replace("debug_headers", "client_header_timeout = \"2s\"\ndebug_headers"),
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    // Three hundred clients send a request line and then a byte now and then.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        slow.push(s);
    }
    let trickle = tokio::spawn(async move {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            for s in slow.iter_mut() {
                let _ = s.write_all(b"X").await;
            }
        }
        slow
    });
    // Meanwhile ordinary requests see ordinary latency.
    let mut worst = Duration::ZERO;
    for _ in 0..30 {
        let t = Instant::now();
        let r = send(addr, Req::chat("m")).await;
        assert_eq!(r.status, 200);
        worst = worst.max(t.elapsed());
    }
    assert!(worst < Duration::from_secs(2), "worst latency {worst:?} under slowloris");
    // A slow client that goes quiet is cut off after the header timeout.
    let mut slow = trickle.await.expect("trickle");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), slow[0].read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a silent slow client is disconnected: {closed:?}");
    edge.shutdown().await;
}

/// Read one HTTP/1.1 answer with a `Content-Length` from `s`; its status.
async fn read_answer(s: &mut tokio::net::TcpStream) -> u16 {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if got.len() >= end + 4 + length {
                return head[9..12].parse().expect("a status");
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "the connection closed mid-answer: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_waits_the_keepalive_timeout_not_the_header_timeout() {
    logs();
    let rep = replica("fra-1").await;
    let text = format!(
        "{}{LOCATIONS}{}{BODY_ROUTE}",
        EDGE.replace("debug_headers", "client_header_timeout = \"1s\"\nkeepalive_timeout = \"10s\"\ndebug_headers"),
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    assert_eq!(read_answer(&mut s).await, 200);
    // Idle between requests for longer than the header timeout: a reused
    // connection waits for its next request as long as the keep-alive
    // timeout says.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.write_all(request.as_bytes()).await.expect("write again");
    assert_eq!(read_answer(&mut s).await, 200, "the kept-alive connection still serves");
    // A new connection that says nothing is closed after the header timeout.
    let mut quiet = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), quiet.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a silent new connection is closed: {closed:?}");
    edge.shutdown().await;
}

/// An HTTP/2 connection is sent GOAWAY and closed once no stream has been
/// open on it for the keep-alive timeout; a stream that runs longer than
/// that timeout is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_keepalive_timeout() {
    logs();
    // Six tokens at four a second: the stream outlives the timeout.
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 4.0).await;
    let text = format!(
        "{}{LOCATIONS}{}{BODY_ROUTE}",
        EDGE.replace("debug_headers", "client_header_timeout = \"1s\"\nkeepalive_timeout = \"1s\"\ndebug_headers"),
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let (mut sender, mut conn) = h2c_connect(edge.bound.http.expect("http")).await;
    let started = Instant::now();
    let req = Req::post("/v1/chat/completions", chat_body("m", true, 6));
    let resp = collect(sender.send_request(req.build_h2("http")).await.expect("answer")).await;
    assert_eq!(resp.status, 200);
    assert!(resp.text().trim_end().ends_with("data: [DONE]"), "the stream ran to its end: {}", resp.text());
    assert!(started.elapsed() > Duration::from_millis(1200), "the stream outlived the keep-alive timeout");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut conn).await.is_err(),
        "the connection stays open right after its stream ends"
    );
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok(), "an idle HTTP/2 connection is closed after the keep-alive timeout");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_once() {
    logs();
    let rep = replica("fra-1").await;
    let text = format!(
        "{}{LOCATIONS}{}{BODY_ROUTE}",
        EDGE.replace("debug_headers", "max_connections = 20\ndebug_headers"),
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // The edge takes connections in on several threads, so which one is
    // the 21st it counts is not known: keep every connection it serves, and
    // one more is refused once it counts 20.
    let mut refused = false;
    for _ in 0..5 {
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = extra.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                refused = true;
                break;
            }
            _ => idle.push(extra),
        }
    }
    assert!(refused, "a connection beyond max_connections was served");
    drop(idle);
    // Once they go, new connections are served again.
    eventually(Duration::from_secs(5), "served again", || async {
        let r = stoke_router::net::client::get(addr, "localhost", "/v1/models", Duration::from_secs(1)).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    edge.shutdown().await;
}

/// An upstream that counts the requests it reads and answers each with
/// its path; `close_without_answer` drops the connection instead.
async fn counting_upstream(close_without_answer: bool) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Every request line in the stream, as the replica parses it.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
                        let body_end = if chunked {
                            match buf[end + 4..].windows(5).position(|w| w == b"0\r\n\r\n") {
                                Some(p) => end + 4 + p + 5,
                                None => break,
                            }
                        } else {
                            end + 4 + len
                        };
                        if buf.len() < body_end {
                            break;
                        }
                        buf.drain(..body_end);
                        if path != "/health" {
                            log.lock().expect("log").push(path.clone());
                        }
                        if close_without_answer && path != "/health" {
                            return;
                        }
                        let body = format!("{{\"path\":\"{path}\"}}");
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_both_content_length_and_chunked_never_reaches_a_replica_as_two() {
    logs();
    let (upstream, seen) = counting_upstream(false).await;
    let text =
        format!("{EDGE}{LOCATIONS}{}\n[[route]]\nservice = \"m\"\n", pool("fra-a", "fra", &["m"], &[upstream], ""));
    let (edge, _file) = edge(&text, "fra").await;
    // The classic smuggling shape: a chunked body that ends at once, and a
    // Content-Length that covers a second request hidden behind it.
    let hidden = "GET /smuggled HTTP/1.1\r\nhost: localhost\r\n\r\n";
    let body = format!("0\r\n\r\n{hidden}");
    let request = format!(
        "POST /first HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let mut client = tokio::net::TcpStream::connect(edge.bound.http.expect("http")).await.expect("connect");
    client.write_all(request.as_bytes()).await.expect("send");
    let mut answers = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1500), client.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answers.extend_from_slice(&buf[..n]);
    }
    let answers = String::from_utf8_lossy(&answers);
    let told = answers.matches("HTTP/1.1 ").count();
    let seen = seen.lock().expect("log").clone();
    // Whatever the edge makes of it (refused, or the hidden request taken
    // as the client's own next one), the replica never sees more requests
    // than the client got answers for.
    assert!(seen.len() <= told, "the replica saw {seen:?}, the client got {told} answers:\n{answers}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_the_client_abandons_free_their_slots() {
    logs();
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let (edge, _file) =
        edge(&format!("{EDGE}{LOCATIONS}{}{BODY_ROUTE}", pool("fra-a", "fra", &["m"], &[rep.addr], "")), "fra").await;
    let (mut sender, conn) = h2c_connect(edge.bound.http.expect("http")).await;
    let req = || {
        http::Request::post("http://localhost/v1/chat/completions")
            .body(http_body_util::Full::new(Bytes::from(chat_body("m", true, 200))))
            .expect("request")
    };
    // Two streams on one connection: one reset, one ended with the connection.
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let resp = sender.send_request(req()).await.expect("response");
        let mut body = resp.into_body();
        let _ = body.frame().await;
        bodies.push(body);
    }
    assert_eq!(in_flight(&edge)[0].1, 2);
    drop(bodies.remove(0)); // RST_STREAM
    eventually(Duration::from_secs(5), "one stream's slot freed", || async {
        (in_flight(&edge)[0].1 == 1).then_some(())
    })
    .await;
    conn.abort(); // the connection goes
    drop(bodies);
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_and_timeouts_are_502_and_504() {
    logs();
    let (closing, _) = counting_upstream(true).await;
    let (hanging, _task) = echo_upstream(true).await;
    let text = format!(
        "{EDGE}{LOCATIONS}{}{}\n[[route]]\npath_prefix = \"/close/\"\nservice = \"a\"\n[[route]]\npath_prefix = \"/hang/\"\nservice = \"b\"\n",
        pool_probed("fra-a", "fra", &["a"], &[closing], SLOW_PROBES, ""),
        pool_probed("fra-b", "fra", &["b"], &[hanging], SLOW_PROBES, "read_timeout = \"300ms\""),
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    let r = send(addr, Req::get("/close/x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_error");
    let r = send(addr, Req::get("/hang/x")).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert_drained(&edge).await;
    edge.shutdown().await;
}
