//! The status page in a real headless browser: an edge with the ten
//! locations of `config/examples/network.toml` and pools on simulated
//! replicas serves its admin page; Debian's chromium loads it, the test
//! checks that the map draws every location and every pool, and saves a
//! screenshot to `target/test-artifacts/status_page.png`.
//!
//! Needs chromium (`apt-get install chromium`, or `CHROMIUM=/path/to/it`):
//! without it the test fails, it never skips.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::browser::*;
use support::*;

/// OpenAI style: the model comes from the body.
const ROUTE: &str = "\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"2s\"\n";

/// Models the background traffic asks for: each goes to a different pool
/// from London.
const MODELS: [&str; 3] = ["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-coder-32b"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_every_location_and_pool_in_chromium() {
    logs();
    let chromium = chromium();
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");

    // Warm pools in Europe, North America and Asia; a pool scaled to zero
    // (its wake hook goes nowhere, and London never picks it); a pool whose
    // only replica does not answer.
    let fra = [replica("fra-1").await, replica("fra-2").await];
    let par = replica("par-1").await;
    let iad = [replica("iad-1").await, replica("iad-2").await];
    let sin = replica("sin-1").await;
    // A pool in light sleep: its replica runs and says it sleeps.
    let gru = replica("gru-1").await;
    let slept = send(gru.addr, Req::post("/sleep?level=1", "")).await;
    assert_eq!(slept.status, 200, "{}", slept.text());
    let pools = [
        pool("fra-h100", "fra", &["llama-3.1-8b", "llama-3.1-70b"], &[fra[0].addr, fra[1].addr], "max_concurrency = 8"),
        pool("par-l40s", "par", &["llama-3.1-8b"], &[par.addr], "max_concurrency = 4"),
        pool(
            "iad-h100",
            "iad",
            &["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-coder-32b"],
            &[iad[0].addr, iad[1].addr],
            "max_concurrency = 8",
        ),
        pool("sin-l4", "sin", &["llama-3.1-8b"], &[sin.addr], "max_concurrency = 4"),
        scaled_pool(
            "nrt-h100",
            "nrt",
            &["llama-3.1-70b", "qwen2.5-coder-32b"],
            &[free_addr()],
            free_addr(),
            "wake_time = \"45s\"\nidle_timeout = \"1h\"",
        ),
        pool("sfo-a100", "sfo", &["qwen2.5-coder-32b"], &[free_addr()], ""),
        scaled_pool(
            "gru-l4",
            "gru",
            &["llama-3.1-8b"],
            &[gru.addr],
            free_addr(),
            "wake_time = \"45s\"\nidle_timeout = \"1h\"\nlight = { kind = \"vllm\" }\nlight_timeout = \"1m\"",
        ),
    ];
    let file = ConfigFile::new(&format!("{EDGE}{TEN_LOCATIONS}{}{ROUTE}", pools.concat()));
    let edge = edge_from(&file, "lon").await;
    let admin = edge.bound.admin;
    let http = edge.bound.http.expect("plain listener");

    eventually(Duration::from_secs(10), "the four warm pools ready", || async {
        let state = admin_json(&edge, "/state").await;
        let warm = state["pools"].as_array().map_or(0, |p| p.iter().filter(|p| p["state"] == "warm").count());
        (warm == 4).then_some(())
    })
    .await;
    for model in MODELS {
        let r = send(http, Req::chat(model)).await;
        assert_eq!(r.status, 200, "{model}: {}", r.text());
    }

    // The page as served: one self-contained file.
    let page = send(admin, Req::get("/")).await;
    assert_eq!(page.status, 200, "GET / on the admin listener: {}", page.text());
    assert!(page.header("content-type").is_some_and(|t| t.starts_with("text/html")), "{:?}", page.headers);
    let html = page.text();
    assert!(html.contains("<svg"), "the map is inline SVG");
    let external = external_references(&html);
    assert!(external.is_empty(), "the status page must not load anything from elsewhere: {external:?}");

    // Routing decisions keep happening while the browser watches.
    let traffic = Traffic::start(http);
    let url = format!("http://{admin}/");

    let started = Instant::now();
    let dom = browse(&chromium, &["--dump-dom"], &url).await;
    let dom_time = started.elapsed();
    let locs = elements_with_class(&dom, "loc");
    let mut drawn: Vec<String> = locs.iter().filter_map(|t| attr(t, "data-id")).collect();
    drawn.sort();
    let mut expected: Vec<String> = TEN_EDGES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(drawn, expected, "one .loc marker per location");
    let pool_markers = elements_with_class(&dom, "pool");
    assert_eq!(pool_markers.len(), pools.len(), "one .pool marker per pool: {pool_markers:?}");
    let states =
        [("fra-h100", "warm"), ("iad-h100", "warm"), ("nrt-h100", "cold"), ("sfo-a100", "down"), ("gru-l4", "light")];
    for (id, state) in states {
        let marker = pool_markers.iter().find(|t| attr(t, "data-id").as_deref() == Some(id));
        let marker = marker.unwrap_or_else(|| panic!("no marker for {id}: {pool_markers:?}"));
        assert_eq!(attr(marker, "data-state").as_deref(), Some(state), "{id}: {marker}");
    }
    let body = elements_with_tag(&dom, "body").into_iter().next().expect("a <body> in the DOM");
    let renders: u32 = attr(&body, "data-rendered").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(renders >= 1, "the page never rendered /state: {body}");
    assert_eq!(attr(&body, "data-locations").as_deref(), Some("10"), "{body}");
    assert_eq!(attr(&body, "data-pools").as_deref(), Some("7"), "{body}");
    assert!(dom.contains("light sleep (wakes in ~1 s)"), "the legend names the light depth");
    let light_rows =
        elements_with_class(&dom, "st").into_iter().filter(|t| attr(t, "data-state").as_deref() == Some("light"));
    assert_eq!(light_rows.count(), 1, "one pool's row says light sleep");

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("create target/test-artifacts");
    let png = artifacts.join("status_page.png");
    let _ = std::fs::remove_file(&png);
    let started = Instant::now();
    let shot = format!("--screenshot={}", png.display());
    browse(&chromium, &[&shot, "--window-size=1400,900", "--hide-scrollbars"], &url).await;
    let shot_time = started.elapsed();
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", png.display());
    assert!(bytes.len() > 20_000, "the screenshot is suspiciously small ({} bytes)", bytes.len());
    println!("status page: {renders} renders; DOM in {dom_time:.1?}, screenshot in {shot_time:.1?}: {}", png.display());

    let sent = traffic.stop().await;
    assert!(sent > 0, "the background traffic sent nothing");
    edge.shutdown().await;
}

/// `src=`/`href=` values and CSS imports that point at another host.
fn external_references(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut found = Vec::new();
    for attr in ["src=", "href="] {
        for (at, _) in lower.match_indices(attr) {
            let value = lower[at + attr.len()..].trim_start_matches(['"', '\'', ' ']);
            if ["http://", "https://", "//"].iter().any(|p| value.starts_with(p)) {
                found.push(lower[at..].chars().take(80).collect());
            }
        }
    }
    for pattern in ["@import", "url(http", "url(//", "url(\"http", "url('http"] {
        if let Some(at) = lower.find(pattern) {
            found.push(lower[at..].chars().take(80).collect());
        }
    }
    found
}

/// Clients asking for the three models in a loop, so that the page has
/// routing decisions to draw.
struct Traffic {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl Traffic {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..6)
            .map(|i| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut sent = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let model = MODELS[(i + sent as usize) % MODELS.len()];
                        let body = chat_body(model, false, 24);
                        send(addr, Req::post("/v1/chat/completions", body)).await;
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        Traffic { stop, tasks }
    }

    /// Stop, and return how many requests were sent.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        for t in self.tasks {
            sent += t.await.expect("traffic task");
        }
        sent
    }
}

/// The demo's page for the whole network: ten edges, every pool, live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_status_page_draws_the_whole_network_in_chromium() {
    logs();
    let chromium = chromium();
    let demo = stoke_router::demo::Demo::start(stoke_router::demo::DemoOptions {
        day: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .expect("demo starts");
    let pools = demo.state()["pools"].as_array().map_or(0, Vec::len);
    let dom = browse(&chromium, &["--dump-dom"], &demo.status_url).await;
    let locations = elements_with_class(&dom, "loc");
    for id in TEN_EDGES {
        assert!(
            locations.iter().any(|tag| attr(tag, "data-id").as_deref() == Some(id)),
            "location {id} not drawn on the demo page"
        );
    }
    assert_eq!(elements_with_class(&dom, "pool").len(), pools, "every pool drawn");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    let shot = dir.join("demo_status_page.png");
    let shot_arg = format!("--screenshot={}", shot.display());
    browse(&chromium, &[&shot_arg, "--window-size=1400,900", "--hide-scrollbars"], &demo.status_url).await;
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "screenshot saved");
    demo.stop().await;
}
