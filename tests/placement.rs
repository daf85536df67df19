//! The nearest pool with warm capacity serves, seen from several edges; a
//! full, unhealthy or dead pool is passed over, and traffic returns when it
//! recovers.

mod support;

use std::time::Duration;

use support::*;

fn config(pools: &[String]) -> String {
    format!("{EDGE}{LOCATIONS}{}{BODY_ROUTE}", pools.concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_pool_from_several_edges() {
    logs();
    let fra = replica("fra-1").await;
    let sin = replica("sin-1").await;
    let text = config(&[pool("fra-a", "fra", &["m"], &[fra.addr], ""), pool("sin-a", "sin", &["m"], &[sin.addr], "")]);
    for (edge_at, expected) in [("fra", "fra-a"), ("par", "fra-a"), ("sin", "sin-a"), ("syd", "sin-a")] {
        let (edge, _file) = edge(&text, edge_at).await;
        let addr = edge.bound.http.expect("http listener");
        let r = send(addr, Req::chat("m")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("stoke-edge"), Some(edge_at));
        assert_eq!(r.header("stoke-pool"), Some(expected), "from {edge_at}");
        assert_eq!(r.json()["object"], "chat.completion");
        edge.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_pool_spills_to_the_next_and_traffic_returns() {
    logs();
    let fra = replica_with("fra-1", |o| o.tokens_per_sec = 50.0).await;
    let par = replica("par-1").await;
    let text = config(&[
        pool("fra-a", "fra", &["m"], &[fra.addr], "max_concurrency = 1"),
        pool("par-a", "par", &["m"], &[par.addr], ""),
    ]);
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");

    // A long stream takes Frankfurt's only slot.
    let long = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 50))).await;
    assert_eq!(long.headers().get("stoke-pool").and_then(|v| v.to_str().ok()), Some("fra-a"));

    let r = send(addr, Req::chat("m")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("stoke-pool"), Some("par-a"), "full pool must be passed over");

    // The stream ends, the slot frees, traffic comes home.
    let done = collect(long).await;
    assert!(done.text().ends_with("data: [DONE]\n\n"));
    assert_drained(&edge).await;
    let r = send(addr, Req::chat("m")).await;
    assert_eq!(r.header("stoke-pool"), Some("fra-a"));
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_pool_is_passed_over_until_it_recovers() {
    logs();
    let fra = replica("fra-1").await;
    let par = replica("par-1").await;
    let text = config(&[pool("fra-a", "fra", &["m"], &[fra.addr], ""), pool("par-a", "par", &["m"], &[par.addr], "")]);
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    assert_eq!(send(addr, Req::chat("m")).await.header("stoke-pool"), Some("fra-a"));

    fra.set_sick(true);
    eventually(Duration::from_secs(5), "traffic moves to par-a", || async {
        (send(addr, Req::chat("m")).await.header("stoke-pool") == Some("par-a")).then_some(())
    })
    .await;
    // Once marked down, it stays out.
    for _ in 0..5 {
        assert_eq!(send(addr, Req::chat("m")).await.header("stoke-pool"), Some("par-a"));
    }

    fra.set_sick(false);
    eventually(Duration::from_secs(5), "traffic returns to fra-a", || async {
        (send(addr, Req::chat("m")).await.header("stoke-pool") == Some("fra-a")).then_some(())
    })
    .await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_retried_and_marks_the_replica_down() {
    logs();
    let a = replica("fra-1").await;
    let b = replica("fra-2").await;
    // Slow probes: the passive mark, not a probe, must take the dead
    // replica out.
    let text = format!(
        "{EDGE}{LOCATIONS}{}{BODY_ROUTE}",
        pool_probed("fra-a", "fra", &["m"], &[a.addr, b.addr], SLOW_PROBES, "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    let dead = a.addr;
    a.kill().await;

    for _ in 0..10 {
        let r = send(addr, Req::chat("m")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-sim-replica"), Some("fra-2"));
    }
    let live = edge.router.live();
    let replica = live.pools[0].replicas.iter().find(|r| r.addr == dead).expect("replica");
    assert!(!replica.is_ready(), "a refused connection marks the replica down");
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_capacity_anywhere_is_503_with_retry_after() {
    logs();
    let fra = replica("fra-1").await;
    let text = config(&[pool("fra-a", "fra", &["m"], &[fra.addr], "")]);
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    fra.kill().await;
    let r = eventually(Duration::from_secs(5), "503 once the only replica is gone", || async {
        let r = send(addr, Req::chat("m")).await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(r.json()["error"]["code"], "no_capacity");
    assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|n| n >= 1)));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_spreads_over_replicas() {
    logs();
    let reps = [replica("r1").await, replica("r2").await, replica("r3").await];
    let addrs: Vec<_> = reps.iter().map(|r| r.addr).collect();
    let text = config(&[pool("fra-a", "fra", &["m"], &addrs, "")]);
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    // Concurrent streams: p2c on in-flight must put some on every replica.
    let mut streams = Vec::new();
    for _ in 0..12 {
        streams.push(open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 20))).await);
    }
    let running: Vec<u32> = reps.iter().map(|r| r.stats.running.load(std::sync::atomic::Ordering::Relaxed)).collect();
    assert!(running.iter().all(|&n| n >= 1), "every replica busy: {running:?}");
    for s in streams {
        collect(s).await;
    }
    assert_drained(&edge).await;
    edge.shutdown().await;
}

/// Health probes measure each pool's round trip, and placement ranks by it
/// once it has samples: a pool in this edge's own location whose replicas
/// answer 50 ms away loses to a pool a city away that answers at once. A
/// `[[rtt]]` in the file still wins over a measurement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_round_trips_rank_the_pools_unless_the_file_gives_them() {
    logs();
    let far = replica("fra-1").await;
    let near = replica("par-1").await;
    // 25 ms each way through a userspace proxy.
    let slow = delay_proxy(far.addr, Duration::from_millis(25)).await;
    let pools = [pool("fra-a", "fra", &["m"], &[slow], ""), pool("par-b", "par", &["m"], &[near.addr], "")];
    let text = config(&pools).replace("measure_rtt = false", "measure_rtt = true");
    let (edge, file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http listener");

    let fra = pool_state(&edge, "fra-a").await;
    assert_eq!(fra["rtt"]["source"], "measured", "{fra}");
    assert_eq!(fra["rtt"]["estimate_ms"], 0.0, "same location");
    let measured = fra["rtt"]["measured_ms"].as_f64().expect("measured_ms");
    assert!(measured >= 45.0, "the probe's first byte came 50 ms late, measured {measured} ms");
    assert!(fra["rtt"]["last_connect_ms"].as_f64().is_some());
    let par = pool_state(&edge, "par-b").await;
    assert!(par["rtt_ms"].as_f64().expect("rtt_ms") < 10.0, "{par}");
    let r = send(addr, Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("stoke-pool"), Some("par-b"), "the pool that answers sooner serves");

    // Given in the file, Paris is 200 ms away: that is believed.
    file.rewrite(&format!("{text}\n[[rtt]]\nbetween = [\"fra\", \"par\"]\nms = 200\n"));
    eventually(Duration::from_secs(5), "the given RTT in force", || async {
        let p = pool_state(&edge, "par-b").await;
        (p["rtt"]["source"] == "given").then_some(())
    })
    .await;
    let r = send(addr, Req::chat("m")).await;
    assert_eq!(r.header("stoke-pool"), Some("fra-a"), "{}", r.text());
    edge.shutdown().await;
}
