//! A 10× overload burst: the hold queue stays bounded, excess requests are
//! answered at once, every request gets an answer, and memory stays flat
//! across repeated bursts.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_under_repeated_ten_times_overload() {
    logs();
    // Capacity: 4 slots + 20 held = 24; each burst sends 240.
    let rep = replica_with("fra-1", |o| {
        o.tokens_per_sec = 100.0;
        o.max_concurrency = 4;
    })
    .await;
    let text = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\nmax_wait = \"10s\"\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "max_concurrency = 4\nmax_queue = 20")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    let mut rss_after = Vec::new();
    for burst in 0..20 {
        let started = Instant::now();
        let tasks: Vec<_> = (0..240)
            .map(|_| tokio::spawn(send(addr, Req::post("/v1/chat/completions", chat_body("m", false, 10)))))
            .collect();
        // While the burst is on, nothing beyond the bound is held.
        let mut max_queue_seen = 0;
        let sampler = async {
            for _ in 0..20 {
                let q = pool_state(&edge, "fra-a").await["queue"].as_u64().unwrap_or(0);
                max_queue_seen = max_queue_seen.max(q);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        sampler.await;
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            let r = tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("every request is answered")
                .expect("task");
            match r.status.as_u16() {
                200 => ok += 1,
                503 => refused += 1,
                s => panic!("unexpected status {s}: {}", r.text()),
            }
        }
        assert!(max_queue_seen <= 20, "burst {burst}: queue reached {max_queue_seen}");
        assert!(ok >= 24, "burst {burst}: only {ok} served");
        assert!(refused >= 100, "burst {burst}: only {refused} refused; the excess must be answered at once");
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_drained(&edge).await;
        rss_after.push(rss_kib());
    }
    // The first bursts warm up allocator arenas and connection pools (RSS
    // rises for about eight bursts, then levels off). After that, the peak
    // over five late bursts must not be above the peak over five early
    // ones: 2,400 more requests, most refused, must not add up.
    let early = rss_after[5..10].iter().max().copied().unwrap_or(0);
    let late = rss_after[15..20].iter().max().copied().unwrap_or(0);
    let growth = late.saturating_sub(early);
    assert!(growth < 4 * 1024, "RSS grew {growth} KiB after warm-up: {rss_after:?}");
    edge.shutdown().await;
}
