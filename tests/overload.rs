//! A 10× overload burst: the hold queue stays bounded, excess requests are
//! answered at once, every request gets an answer, and memory stays flat
//! across repeated bursts.
//!
//! Memory is measured as live heap bytes, counted by this test binary's
//! global allocator: RSS moves in steps of whole allocator arenas and heaps
//! (glibc grows a thread arena by 4 MiB at a time, whenever two threads
//! happen to allocate at once), so it cannot tell a leak from fragmentation.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// `System`, counting the bytes currently allocated.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// The workspace denies `unsafe_code`; `GlobalAlloc` is an unsafe trait, and
// every call here is forwarded unchanged to `System`, so this allocator keeps
// `System`'s contract; the counter is only bookkeeping.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is `System`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_kib() -> i64 {
    LIVE.load(Ordering::Relaxed) as i64 / 1024
}

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
    let mut heap_after = Vec::new();
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
        // Closed client connections end their tasks a moment later.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Histogram samples wait for the recorder's upkeep (every 5 s in a
        // running edge) to be folded into buckets; fold them now.
        stoke_router::metrics::install().run_upkeep();
        heap_after.push(live_kib());
        rss_after.push(rss_kib());
    }
    // The first bursts warm up connection pools, metric series and buffers.
    // After that, the live heap over five late bursts must not be above the
    // heap over five early ones: 2,400 more requests, most refused, must not
    // add up. A leak of 400 bytes a request would show as about 1 MiB. What
    // does move a little is bounded: histogram sample blocks freed lazily
    // (epoch-based reclamation) and pingora's fast timers, kept until their
    // deadline (15 s at most; longer timeouts use tokio's timer).
    eprintln!("live heap KiB after each burst: {heap_after:?}\nRSS KiB: {rss_after:?}");
    let early = heap_after[5..10].iter().max().copied().unwrap_or(0);
    let late = heap_after[15..20].iter().max().copied().unwrap_or(0);
    let growth = late - early;
    assert!(growth < 1024, "live heap grew {growth} KiB after warm-up: {heap_after:?} (RSS {rss_after:?})");
    // RSS only has a coarse bound: fragmentation and arenas, not requests.
    let rss_growth = rss_after[19].saturating_sub(rss_after[4]);
    assert!(rss_growth < 32 * 1024, "RSS grew {rss_growth} KiB after warm-up: {rss_after:?}");
    edge.shutdown().await;
}
