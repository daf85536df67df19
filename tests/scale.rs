//! Scale to zero with the simulated orchestrator: wake on demand (once),
//! hold with a deadline, admission by ETA, route away then warm, sleep at
//! the home edge only.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stoke_router::sim::OrchestratorOptions;
use support::*;

/// The body route with a short `max_wait`, so that holds end within a test.
const SHORT_WAIT_ROUTE: &str =
    "\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"3s\"\n";

/// A network with one scaled pool `fra-a` (and the pools in `extra`), its
/// orchestrator, and a config file. Returns the replica address too.
async fn world(
    scale: &str,
    extra: &[String],
    route: &str,
    opts: OrchestratorOptions,
) -> (stoke_router::sim::Orchestrator, ConfigFile, SocketAddr) {
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");
    let (listener, orch) = orchestrator_listener().await;
    let rep = free_addr();
    let text = format!(
        "{EDGE}{LOCATIONS}{}{}{route}",
        scaled_pool("fra-a", "fra", &["m"], &[rep], orch, scale),
        extra.concat()
    );
    let file = ConfigFile::new(&text);
    let orch = start_orchestrator(listener, &file, opts).await;
    (orch, file, rep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_pool_wakes_and_the_held_request_succeeds() {
    logs();
    let (orch, file, _) =
        world("wake_time = \"400ms\"\nidle_timeout = \"1h\"", &[], SHORT_WAIT_ROUTE, Default::default()).await;
    let edge = edge_from(&file, "fra").await;
    assert_eq!(pool_state(&edge, "fra-a").await["state"], "cold");

    let started = Instant::now();
    let r = send(edge.bound.http.expect("http"), Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("stoke-pool"), Some("fra-a"));
    let waited: u64 = r.header("stoke-wait-ms").and_then(|v| v.parse().ok()).expect("stoke-wait-ms");
    assert!((350..2000).contains(&waited), "held {waited} ms for a 400 ms boot");
    assert!(started.elapsed() >= Duration::from_millis(400));

    let calls = orch.calls_for("fra-a", "wake");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].edge, "fra");
    assert!(calls[0].authorized, "the bearer token from token_env was sent");
    let state = pool_state(&edge, "fra-a").await;
    assert_eq!(state["state"], "warm");
    assert_eq!(state["queue"], 0);

    // The wake loop records its outcome on its next turn.
    let metrics = eventually(Duration::from_secs(5), "the wake's outcome in /metrics", || async {
        let m = send(edge.bound.admin, Req::get("/metrics")).await.text();
        m.contains("stoke_wakeups_total{pool=\"fra-a\",result=\"ready\"}").then_some(m)
    })
    .await;
    assert!(metrics.contains("stoke_wake_duration_seconds_bucket{pool=\"fra-a\""));
    assert!(metrics.contains("stoke_pool_queue_depth{pool=\"fra-a\"}"));
    assert!(metrics.contains("stoke_pool_warm_capacity{pool=\"fra-a\"}"));
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_requests_cause_exactly_one_wake() {
    logs();
    let (orch, file, _) =
        world("wake_time = \"300ms\"\nidle_timeout = \"1h\"", &[], SHORT_WAIT_ROUTE, Default::default()).await;
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    let tasks: Vec<_> = (0..100).map(|_| tokio::spawn(send(addr, Req::chat("m")))).collect();
    for t in tasks {
        let r = t.await.expect("task");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(orch.calls_for("fra-a", "wake").len(), 1);
    assert_drained(&edge).await;
    assert_eq!(pool_state(&edge, "fra-a").await["queue"], 0);
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_that_never_completes_answers_every_held_request_by_its_deadline() {
    logs();
    let route = "\n[[route]]\nservice_from = \"body:model\"\nmax_wait = \"1s\"\n";
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"300ms\"", &[], route, opts).await;
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    let started = Instant::now();
    let tasks: Vec<_> = (0..10).map(|_| tokio::spawn(send(addr, Req::chat("m")))).collect();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(5), t).await.expect("no request hangs").expect("task");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "wait_timeout");
        assert!(r.header("retry-after").is_some());
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(950) && took < Duration::from_secs(3), "answered after {took:?}");
    assert_eq!(pool_state(&edge, "fra-a").await["queue"], 0);
    assert!(!orch.calls_for("fra-a", "wake").is_empty());
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_orchestrator_is_counted_and_held_requests_still_get_answers() {
    logs();
    let route = "\n[[route]]\nservice_from = \"body:model\"\nmax_wait = \"800ms\"\n";
    let opts = OrchestratorOptions { fail_wakes: true, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"200ms\"", &[], route, opts).await;
    let edge = edge_from(&file, "fra").await;
    let r = send(edge.bound.http.expect("http"), Req::chat("m")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    eventually(Duration::from_secs(5), "the failed hook call in /metrics", || async {
        let m = send(edge.bound.admin, Req::get("/metrics")).await.text();
        m.contains("stoke_wakeups_total{pool=\"fra-a\",result=\"hook_error\"}").then_some(())
    })
    .await;
    // The failure shows in /state, not a pool waking forever.
    let state = pool_state(&edge, "fra-a").await;
    assert_eq!(state["state"], "wake_failed", "{state}");
    assert!(state["wake_error"].as_str().is_some_and(|e| e.contains("500")), "{state}");
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_at_once() {
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"300ms\"", &[], SHORT_WAIT_ROUTE, opts).await;
    file.rewrite(
        &std::fs::read_to_string(&file.path).expect("read").replace("[pool.scale]", "max_queue = 2\n[pool.scale]"),
    );
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(send(addr, Req::chat("m")))).collect();
    eventually(Duration::from_secs(5), "two requests held", || async {
        (pool_state(&edge, "fra-a").await["queue"] == 2).then_some(())
    })
    .await;
    let started = Instant::now();
    let r = send(addr, Req::chat("m")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    // At once: a smoke bound here; the immediate answer itself is checked
    // on a paused clock (proxy::admit's tests).
    assert!(started.elapsed() < Duration::from_secs(2), "a full queue answers at once");
    assert!(r.header("retry-after").is_some());
    for h in held {
        assert_eq!(h.await.expect("task").status, 503);
    }
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_while_held_is_removed_and_nothing_is_forwarded() {
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"300ms\"", &[], SHORT_WAIT_ROUTE, opts).await;
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    for req in [Req::chat("m"), Req::post("/v1/completions", chat_body("m", true, 4))] {
        let client = tokio::spawn(send(addr, req));
        eventually(Duration::from_secs(5), "request held", || async {
            (pool_state(&edge, "fra-a").await["queue"] == 1).then_some(())
        })
        .await;
        client.abort(); // the client goes away
        eventually(Duration::from_secs(5), "queue empty again", || async {
            (pool_state(&edge, "fra-a").await["queue"] == 0).then_some(())
        })
        .await;
    }
    // The pool comes up: nothing was left to forward to it.
    orch.start_pool("fra-a").await.expect("start");
    eventually(Duration::from_secs(5), "pool warm", || async {
        (pool_state(&edge, "fra-a").await["state"] == "warm").then_some(())
    })
    .await;
    assert_eq!(orch.requests_received("fra-a").await, 0);
    assert_drained(&edge).await;
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_longer_than_the_deadline_is_refused_at_once_and_still_wakes() {
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"10s\"", &[], SHORT_WAIT_ROUTE, opts).await;
    let edge = edge_from(&file, "fra").await;
    let started = Instant::now();
    // The route allows 3 s; the pool needs 10 s.
    let r = send(edge.bound.http.expect("http"), Req::chat("m")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "wait_exceeds_deadline");
    assert!(started.elapsed() < Duration::from_secs(2));
    let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("retry-after");
    assert!((9..=11).contains(&retry), "retry after {retry} s");
    eventually(Duration::from_secs(5), "the wake starts anyway", || async {
        (orch.calls_for("fra-a", "wake").len() == 1).then_some(())
    })
    .await;
    // A client deadline shorter than the route's is honoured too.
    let r = send(edge.bound.http.expect("http"), Req::chat("m").header("stoke-max-wait-ms", "100")).await;
    assert_eq!(r.json()["error"]["code"], "wait_exceeds_deadline");
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_away_then_warm() {
    logs();
    let (listener, orch_addr) = orchestrator_listener().await;
    let (par_rep, fra_rep) = (free_addr(), free_addr());
    let text = format!(
        "{EDGE}{LOCATIONS}{}{}{SHORT_WAIT_ROUTE}",
        // Paris sleeps and takes long to wake; Frankfurt is always on.
        scaled_pool("par-a", "par", &["m"], &[par_rep], orch_addr, "wake_time = \"20s\"\nidle_timeout = \"1h\""),
        pool("fra-a", "fra", &["m"], &[fra_rep], ""),
    );
    let file = ConfigFile::new(&text);
    // The simulated boot is quick, whatever the config expects.
    let opts = OrchestratorOptions { boot_time: Some(Duration::from_millis(200)), ..Default::default() };
    let orch = start_orchestrator(listener, &file, opts).await;
    let edge = edge_from(&file, "par").await;
    let addr = edge.bound.http.expect("http");

    // Frankfurt (9 ms away) beats a 20 s wake: the first requests go there.
    for i in 0..3 {
        let r = send(addr, Req::chat("m")).await;
        assert_eq!(r.header("stoke-pool"), Some("fra-a"), "request {i}");
    }
    // Demand persisted: Paris was woken meanwhile, and traffic comes home.
    let calls = orch.calls_for("par-a", "wake");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].reason, "demand");
    eventually(Duration::from_secs(5), "traffic moves to the woken near pool", || async {
        (send(addr, Req::chat("m")).await.header("stoke-pool") == Some("par-a")).then_some(())
    })
    .await;
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pool_gets_one_sleep_call_from_its_home_edge_only() {
    logs();
    let (orch, file, _) =
        world("wake_time = \"200ms\"\nidle_timeout = \"600ms\"", &[], SHORT_WAIT_ROUTE, Default::default()).await;
    let home = edge_from(&file, "fra").await;
    let other = edge_from(&file, "par").await;
    // Paris's traffic wakes Frankfurt's pool.
    let r = send(other.bound.http.expect("http"), Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("stoke-pool"), Some("fra-a"));

    let sleeps = eventually(Duration::from_secs(5), "a sleep call", || async {
        let s = orch.calls_for("fra-a", "sleep");
        (!s.is_empty()).then_some(s)
    })
    .await;
    // Several idle timeouts later there is still only the one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sleeps_after = orch.calls_for("fra-a", "sleep");
    assert_eq!(sleeps_after.len(), 1, "{sleeps_after:?}");
    assert_eq!(sleeps[0].edge, "fra", "only the home edge puts the pool to sleep");
    assert!(!orch.is_running("fra-a").await);
    home.shutdown().await;
    other.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_another_edge_wakes_again_is_put_to_sleep_again() {
    logs();
    let (orch, file, _) =
        world("wake_time = \"200ms\"\nidle_timeout = \"600ms\"", &[], SHORT_WAIT_ROUTE, Default::default()).await;
    let home = edge_from(&file, "fra").await;
    let other = edge_from(&file, "par").await;
    let paris = other.bound.http.expect("http");
    for round in 1..=2 {
        // Only Paris sends; the home edge sees the pool come up through
        // its own probes, and must still put it to sleep each time.
        let r = send(paris, Req::chat("m")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("stoke-pool"), Some("fra-a"));
        eventually(Duration::from_secs(6), "asleep again", || async {
            (orch.calls_for("fra-a", "sleep").len() >= round && !orch.is_running("fra-a").await).then_some(())
        })
        .await;
    }
    assert_eq!(orch.calls_for("fra-a", "wake").len(), 2);
    assert!(orch.calls_for("fra-a", "sleep").iter().all(|c| c.edge == "fra"));
    home.shutdown().await;
    other.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_keeps_the_pool_awake() {
    logs();
    let (orch, file, _) =
        world("wake_time = \"200ms\"\nidle_timeout = \"300ms\"", &[], SHORT_WAIT_ROUTE, Default::default()).await;
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    // Two seconds of tokens (200 tokens at 200/s), far beyond the idle timeout.
    let stream = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 400))).await;
    assert_eq!(stream.status(), 200);
    let body = collect(stream).await;
    assert!(body.text().ends_with("data: [DONE]\n\n"), "the stream was not cut");
    assert!(orch.calls_for("fra-a", "sleep").is_empty(), "no sleep while the stream was open");
    // Once it ends, the pool goes to sleep after the idle timeout.
    eventually(Duration::from_secs(5), "sleep after the stream", || async {
        (!orch.calls_for("fra-a", "sleep").is_empty()).then_some(())
    })
    .await;
    edge.shutdown().await;
    orch.shutdown().await;
}

/// A fixed-service route with a long `max_wait`: a held request stays held
/// until its client leaves (the edge reads no body to route it).
const FIXED_LONG_WAIT_ROUTE: &str = "\n[[route]]\npath_prefix = \"/v1/\"\nservice = \"m\"\nmax_wait = \"30s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_held_is_never_forwarded_whatever_the_protocol() {
    use tokio::io::AsyncWriteExt;
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"300ms\"", &[], FIXED_LONG_WAIT_ROUTE, opts).await;
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    let queue = || async { pool_state(&edge, "fra-a").await["queue"].as_u64() };
    let body = chat_body("m", false, 4);

    // HTTP/1.1: a POST whose body the edge has not read, and a GET.
    let post = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    for head in [post, "GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n".to_owned()] {
        let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        client.write_all(head.as_bytes()).await.expect("send");
        eventually(Duration::from_secs(5), "HTTP/1.1 request held", || async {
            (queue().await == Some(1)).then_some(())
        })
        .await;
        drop(client);
        eventually(Duration::from_secs(2), "HTTP/1.1 client gone: queue empty", || async {
            (queue().await == Some(0)).then_some(())
        })
        .await;
    }

    // HTTP/2: the request's stream is reset while its connection stays,
    // then a request whose whole connection goes.
    for reset_only in [true, false] {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let mut request_sender = sender.clone();
        let req = http::Request::post("http://localhost/v1/chat/completions")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .expect("request");
        let pending = tokio::spawn(async move { request_sender.send_request(req).await });
        eventually(Duration::from_secs(5), "HTTP/2 request held", || async {
            (queue().await == Some(1)).then_some(())
        })
        .await;
        pending.abort();
        if !reset_only {
            conn.abort();
        }
        eventually(Duration::from_secs(2), "HTTP/2 client gone: queue empty", || async {
            (queue().await == Some(0)).then_some(())
        })
        .await;
        drop(sender);
    }

    // The pool comes up: nothing was left to forward to it.
    assert_nothing_reached(&edge, &orch, "fra-a").await;
    assert_drained(&edge).await;
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sleep_hook_is_called_again() {
    logs();
    let opts = OrchestratorOptions { fail_sleeps: 1, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"200ms\"\nidle_timeout = \"600ms\"", &[], SHORT_WAIT_ROUTE, opts).await;
    let edge = edge_from(&file, "fra").await;
    let r = send(edge.bound.http.expect("http"), Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The first sleep call fails (500); the second, a second later, stops the pool.
    let sleeps = eventually(Duration::from_secs(8), "a second sleep call", || async {
        let s = orch.calls_for("fra-a", "sleep");
        (s.len() >= 2).then_some(s)
    })
    .await;
    assert!(sleeps[1].at_ms >= sleeps[0].at_ms + 900, "resent after a backoff: {sleeps:?}");
    eventually(Duration::from_secs(5), "the pool stopped", || async {
        (!orch.is_running("fra-a").await).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(orch.calls_for("fra-a", "sleep").len(), 2, "no more calls once one succeeded");
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_held_in_memory_have_an_edge_wide_budget() {
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let route = "\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"30s\"\n";
    let (orch, file, _) = world("wake_time = \"300ms\"", &[], route, opts).await;
    file.rewrite(
        &std::fs::read_to_string(&file.path)
            .expect("read")
            .replace("debug_headers = true", "debug_headers = true\nmax_buffered_bodies = \"1MiB\""),
    );
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    // Bodies of 400 KiB, read to find the model, then held for a wake.
    let big =
        || Req::post("/v1/chat/completions", format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(400 << 10)));
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(send(addr, big()))).collect();
    eventually(Duration::from_secs(5), "two held", || async {
        (pool_state(&edge, "fra-a").await["queue"] == 2).then_some(())
    })
    .await;
    let state = admin_json(&edge, "/state").await;
    assert!(state["buffered_body_bytes"].as_u64().is_some_and(|b| b >= 800 << 10), "{}", state["buffered_body_bytes"]);
    // A third would pass the 1 MiB budget: refused, not buffered.
    let r = send(addr, big()).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "body_budget_exhausted");
    assert!(r.header("retry-after").is_some());
    // The held ones go (their clients leave): the budget is whole again.
    for h in held {
        h.abort();
    }
    eventually(Duration::from_secs(5), "budget given back", || async {
        (admin_json(&edge, "/state").await["buffered_body_bytes"] == 0).then_some(())
    })
    .await;
    let again = tokio::spawn(send(addr, big()));
    eventually(Duration::from_secs(5), "a big body is taken again", || async {
        (pool_state(&edge, "fra-a").await["queue"] == 1).then_some(())
    })
    .await;
    again.abort();
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_hook_that_brings_nothing_is_called_again() {
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let (orch, file, _) = world("wake_time = \"100ms\"", &[], SHORT_WAIT_ROUTE, opts).await;
    let edge = edge_from(&file, "fra").await;
    let held = tokio::spawn(send(edge.bound.http.expect("http"), Req::chat("m")));
    // First resend: 1.5 × the expected wake, and never sooner than 2 s.
    let calls = eventually(Duration::from_secs(5), "a second wake call", || async {
        let c = orch.calls_for("fra-a", "wake");
        (c.len() >= 2).then_some(c)
    })
    .await;
    assert!(calls[1].at_ms >= calls[0].at_ms + 1900, "resent too soon: {calls:?}");
    assert_eq!(held.await.expect("task").status, 503, "answered at its deadline");
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_alone_refuses_a_wait_it_cannot_meet() {
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let route = "\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"30s\"\n";
    let (orch, file, _) = world("wake_time = \"2s\"", &[], route, opts).await;
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    // The route would hold it for the 2 s wake; the client allows 500 ms.
    let r = send(addr, Req::chat("m").header("stoke-max-wait-ms", "500")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "wait_exceeds_deadline");
    assert!(r.header("retry-after").is_some());
    // Without the header the same request is held.
    let held = tokio::spawn(send(addr, Req::chat("m")));
    eventually(Duration::from_secs(5), "held without the header", || async {
        (pool_state(&edge, "fra-a").await["queue"] == 1).then_some(())
    })
    .await;
    held.abort();
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_that_replicas_report_keeps_their_pool_awake() {
    logs();
    let opts = OrchestratorOptions { tokens_per_sec: 100.0, ..Default::default() };
    let scale = "wake_time = \"200ms\"\nidle_timeout = \"600ms\"";
    let (orch, file, rep) = world(scale, &[], SHORT_WAIT_ROUTE, opts).await;
    // Scrape the replicas' own load (vLLM's metric names) ten times a second.
    file.rewrite(&std::fs::read_to_string(&file.path).expect("read").replace(
        "[pool.scale]",
        "load = { path = \"/metrics\", format = \"vllm\", interval = \"100ms\" }\n[pool.scale]",
    ));
    let edge = edge_from(&file, "fra").await;
    let r = send(edge.bound.http.expect("http"), Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Another edge's long generation, straight at the replica: this edge
    // has nothing in flight, but the replica says it is busy.
    let started = Instant::now();
    let other_edge = tokio::spawn(send(rep, Req::post("/v1/chat/completions", chat_body("m", true, 300))));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(orch.calls_for("fra-a", "sleep").is_empty(), "put to sleep while its replica was busy");
    assert_eq!(other_edge.await.expect("task").status, 200);
    assert!(started.elapsed() >= Duration::from_millis(2500));
    // Once the replica is idle too, the pool sleeps.
    eventually(Duration::from_secs(5), "asleep once idle", || async {
        (!orch.calls_for("fra-a", "sleep").is_empty()).then_some(())
    })
    .await;
    edge.shutdown().await;
    orch.shutdown().await;
}

/// The body route with keep-alive comments for held streams.
const KEEPALIVE_ROUTE: &str = "\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"5s\"\nhold_keepalive = \"200ms\"\n";

/// Read an SSE response's body as it comes; `(elapsed, line)` for each
/// non-empty line, until the end or `limit`.
async fn sse_lines(resp: http::Response<hyper::body::Incoming>, limit: Duration) -> Vec<(Duration, String)> {
    use http_body_util::BodyExt;
    let started = Instant::now();
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut lines = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(limit.saturating_sub(started.elapsed()), body.frame()).await {
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
            while let Some(i) = text.find('\n') {
                let line: String = text.drain(..=i).collect();
                let line = line.trim_end().to_owned();
                if !line.is_empty() {
                    lines.push((started.elapsed(), line));
                }
            }
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_stream_says_it_is_held_then_streams_the_replica() {
    logs();
    let opts = OrchestratorOptions { boot_time: Some(Duration::from_millis(1200)), ..Default::default() };
    let (orch, file, _) = world("wake_time = \"1s\"", &[], KEEPALIVE_ROUTE, opts).await;
    let edge = edge_from(&file, "fra").await;
    let started = Instant::now();
    let resp = open(edge.bound.http.expect("http"), &Req::post("/v1/chat/completions", chat_body("m", true, 5))).await;
    let head_after = started.elapsed();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    assert!(head_after < Duration::from_millis(1000), "the head came at once, not after the wake: {head_after:?}");
    let lines = sse_lines(resp, Duration::from_secs(10)).await;
    let comments: Vec<&String> = lines.iter().map(|(_, l)| l).filter(|l| l.starts_with(':')).collect();
    assert!(comments.len() >= 3, "{lines:?}");
    assert!(comments[0].starts_with(": waking fra-a, eta "), "{comments:?}");
    let data: Vec<&String> = lines.iter().map(|(_, l)| l).filter(|l| l.starts_with("data: ")).collect();
    assert!(data.len() >= 2, "the replica's stream follows: {lines:?}");
    assert_eq!(data.last().map(|s| s.as_str()), Some("data: [DONE]"));
    assert!(!data.iter().any(|d| d.contains("\"error\"")), "{data:?}");
    assert_eq!(orch.calls_for("fra-a", "wake").len(), 1);
    assert_drained(&edge).await;
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_stream_whose_hold_fails_ends_with_an_openai_error_event() {
    logs();
    let opts = OrchestratorOptions { ignore_wakes: true, ..Default::default() };
    let route = KEEPALIVE_ROUTE.replace("max_wait = \"5s\"", "max_wait = \"1500ms\"");
    let (orch, file, _) = world("wake_time = \"1s\"", &[], &route, opts).await;
    let edge = edge_from(&file, "fra").await;
    let resp = open(edge.bound.http.expect("http"), &Req::post("/v1/chat/completions", chat_body("m", true, 5))).await;
    assert_eq!(resp.status(), 200);
    let lines = sse_lines(resp, Duration::from_secs(10)).await;
    let last = lines.last().map(|(_, l)| l.clone()).unwrap_or_default();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap_or("null")).expect("the last line is a data event");
    assert_eq!(event["error"]["code"], "wait_timeout", "{lines:?}");
    assert!(lines.iter().filter(|(_, l)| l.starts_with(':')).count() >= 3, "{lines:?}");
    assert_eq!(pool_state(&edge, "fra-a").await["queue"], 0);
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_held_with_keepalives_reads_fine_with_the_openai_client() {
    logs();
    // The interpreter: STOKE_TEST_PYTHON, else the README's test venv.
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py/bin/python");
    let python = std::env::var("STOKE_TEST_PYTHON").unwrap_or_else(|_| venv.to_owned());
    let opts = OrchestratorOptions { boot_time: Some(Duration::from_millis(1200)), ..Default::default() };
    let (orch, file, _) = world("wake_time = \"1s\"", &[], KEEPALIVE_ROUTE, opts).await;
    let edge = edge_from(&file, "fra").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/scripts/openai_held_stream.py");
    let base = format!("http://{}/v1", edge.bound.http.expect("http"));
    let out =
        tokio::process::Command::new(&python).arg(script).arg(&base).arg("m").output().await.unwrap_or_else(|e| {
            panic!("cannot run {python} (set STOKE_TEST_PYTHON to a Python with the openai package): {e}")
        });
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the OpenAI client failed on a held stream:\n{stdout}\n{stderr}");
    assert!(stdout.contains("streamed"), "{stdout}");
    edge.shutdown().await;
    orch.shutdown().await;
}

/// Whether the replica at `addr` says it sleeps (vLLM's `/is_sleeping`).
async fn sleeping(addr: SocketAddr) -> Option<bool> {
    let r = send(addr, Req::get("/is_sleeping")).await;
    (r.status == 200).then(|| r.json()["is_sleeping"].as_bool()).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_sleeps_lightly_then_deeply_and_wakes_from_each_depth_its_own_way() {
    logs();
    let scale = "wake_time = \"400ms\"\nidle_timeout = \"3s\"\nlight = { kind = \"vllm\" }\n\
                 light_timeout = \"500ms\"\nlight_wake_time = \"500ms\"";
    let (orch, file, rep) = world(scale, &[], SHORT_WAIT_ROUTE, Default::default()).await;
    let edge = edge_from(&file, "fra").await;
    let http = edge.bound.http.expect("http");
    assert_eq!(pool_state(&edge, "fra-a").await["depth"], "deep");

    // A cold start: the pool's own wake hook.
    let r = send(http, Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(orch.calls_for("fra-a", "wake").len(), 1);

    // Idle for the light window: the replica is put to sleep through its own
    // API, and stays running.
    eventually(Duration::from_secs(5), "the replica in light sleep", || async {
        (sleeping(rep).await == Some(true)).then_some(())
    })
    .await;
    let state = eventually(Duration::from_secs(2), "light depth in /state", || async {
        let s = pool_state(&edge, "fra-a").await;
        (s["depth"] == "light").then_some(s)
    })
    .await;
    assert_eq!(state["state"], "cold");
    assert_eq!(state["replicas"][0]["asleep"], true);
    assert_eq!(state["replicas"][0]["ready"], false);
    assert_eq!(state["light"]["window_ms"], 500);
    assert!(orch.is_running("fra-a").await);
    assert!(orch.calls_for("fra-a", "sleep").is_empty(), "no deep sleep yet");

    // A request wakes it from light sleep: POST /wake_up, not the pool's hook.
    let r = send(http, Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let waited: u64 = r.header("stoke-wait-ms").and_then(|v| v.parse().ok()).expect("stoke-wait-ms");
    assert!((450..2500).contains(&waited), "held {waited} ms for a 500 ms light wake");
    assert_eq!(orch.calls_for("fra-a", "wake").len(), 1, "the deep wake hook is not called");
    assert_eq!(sleeping(rep).await, Some(false));
    let metrics = eventually(Duration::from_secs(5), "the light wake in /metrics", || async {
        let m = send(edge.bound.admin, Req::get("/metrics")).await.text();
        m.contains("stoke_light_wakeups_total{pool=\"fra-a\"} 1").then_some(m)
    })
    .await;
    assert!(metrics.contains("stoke_light_sleeps_total{pool=\"fra-a\"} 1"), "{metrics}");

    // Idle again: light sleep, then, at the deep window, the pool's sleep
    // hook stops the replica.
    let sleeps = eventually(Duration::from_secs(8), "a deep sleep call", || async {
        let s = orch.calls_for("fra-a", "sleep");
        (!s.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(sleeps.len(), 1);
    eventually(Duration::from_secs(3), "deep depth in /state", || async {
        (pool_state(&edge, "fra-a").await["depth"] == "deep").then_some(())
    })
    .await;
    assert!(!orch.is_running("fra-a").await);

    // From deep sleep, the pool's wake hook again.
    let r = send(http, Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(orch.calls_for("fra-a", "wake").len(), 2);
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_its_replica_asleep_is_held_for_a_light_wake_not_answered_503() {
    logs();
    // The replica goes to light sleep behind this edge's back (another
    // edge, its home, put it there), and probes are a minute apart: the
    // next request finds vLLM answering 503.
    let rep = replica_with("fra-1", |o| o.light_wake_time = Duration::from_millis(300)).await;
    let (_listener, orch) = orchestrator_listener().await;
    let mut p = pool_probed("fra-a", "par", &["m"], &[rep.addr], SLOW_PROBES, "");
    p.push_str(&format!(
        "[pool.scale]\nwake = {{ url = \"http://{orch}/pools/fra-a/wake\" }}\nwake_time = \"20s\"\nidle_timeout = \"1h\"\n\
         light = {{ kind = \"vllm\" }}\nlight_timeout = \"30m\"\n"
    ));
    let file = ConfigFile::new(&format!("{EDGE}{LOCATIONS}{p}{SHORT_WAIT_ROUTE}"));
    let edge = edge_from(&file, "fra").await;
    let http = edge.bound.http.expect("http");
    let r = send(http, Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    assert_eq!(send(rep.addr, Req::post("/sleep?level=1", "")).await.status, 200);
    let started = Instant::now();
    let r = send(http, Req::chat("m")).await;
    assert_eq!(r.status, 200, "held for the light wake and served: {}", r.text());
    assert!(started.elapsed() >= Duration::from_millis(300), "served after the 300 ms light wake");
    assert!(!rep.is_sleeping(), "woken through /wake_up");
    assert_eq!(rep.stats.wakes.load(std::sync::atomic::Ordering::Relaxed), 1);
    edge.shutdown().await;
}
