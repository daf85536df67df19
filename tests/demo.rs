//! `stoke demo`: the ten-edge world starts on loopback, serves through its
//! edges, shows every edge in its state, and stops cleanly with a summary.

mod support;

use std::process::Command;
use std::time::Duration;

use stoke_router::demo::{Demo, DemoOptions};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_world_serves_through_its_edges() {
    logs();
    let opts = DemoOptions { day: Duration::from_secs(30), ..DemoOptions::default() };
    let demo = Demo::start(opts).await.expect("demo starts");
    assert_eq!(demo.edges.len(), 10);

    let state = demo.state();
    assert_eq!(state["mode"], "demo");
    assert_eq!(state["edges"].as_array().map(Vec::len), Some(10));
    assert_eq!(state["locations"].as_array().map(Vec::len), Some(10));
    assert!(state["pools"].as_array().is_some_and(|p| p.len() >= 5));
    assert!(state["clock"]["utc_hour"].as_f64().is_some());
    // The edges run as one cluster on a local nats-server (installed by
    // the README's setup line and by CI).
    assert_eq!(state["cluster"]["clustered"], true, "{}", state["cluster"]);
    eventually(Duration::from_secs(10), "every edge joined the cluster", || async {
        (demo.state()["cluster"]["connected"] == 10).then_some(())
    })
    .await;
    // Scaling pools say how long they stay up when idle, and why.
    let pools = state["pools"].as_array().expect("pools");
    let par = pools.iter().find(|p| p["id"] == "par-l40s").expect("par-l40s");
    assert_eq!(par["idle"]["rule"], "auto", "{par}");
    assert!(par["idle"]["min_ms"].is_number() && par["idle"]["max_ms"].is_number(), "{par}");
    let fra = pools.iter().find(|p| p["id"] == "fra-h100").expect("fra-h100");
    assert!(fra["idle"].is_null(), "always on: {fra}");

    // Every edge serves; Sydney has no pool and goes elsewhere.
    for (id, addr) in &demo.edges {
        let r = send(*addr, Req::chat("llama-3.1-8b")).await;
        assert_eq!(r.status, 200, "edge {id}: {}", r.text());
        assert_eq!(r.header("stoke-edge"), Some(*id));
        if *id == "syd" {
            assert_ne!(r.header("stoke-pool"), Some("syd"), "{r:?}");
        }
    }
    // The status page and its state are served.
    let url: std::net::SocketAddr =
        demo.status_url.trim_start_matches("http://").trim_end_matches('/').parse().expect("addr");
    let page = send(url, Req::get("/")).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<svg"), "the status page draws an SVG map");
    assert_eq!(send(url, Req::get("/state")).await.json()["mode"], "demo");

    // The simulated users send traffic.
    eventually(Duration::from_secs(10), "traffic flows", || async { (demo.summary().requests >= 5).then_some(()) })
        .await;
    let summary = demo.stop().await;
    assert!(summary.requests >= 5);
    assert!(summary.ok * 100 >= summary.requests * 95, "{summary}");
    assert!(summary.always_on_gpu_seconds > 0.0);
    // Replicas ran, and pools that scale to zero used less than an
    // always-on fleet would have.
    assert!(summary.gpu_seconds > 0.0, "{summary}");
    assert!(summary.gpu_seconds < summary.always_on_gpu_seconds, "{summary}");
    let text = summary.to_string();
    let line = |label: &str| text.lines().find(|l| l.trim_start().starts_with(label)).map(str::to_owned);
    let always_on = line("always on").expect("always-on pools listed");
    let scaling = line("scale to zero").expect("scaling pools listed");
    assert!(always_on.contains("fra-h100") && !always_on.contains("par-l40s"), "{text}");
    assert!(scaling.contains("par-l40s") && !scaling.contains("fra-h100"), "{text}");
}

#[test]
fn stoke_demo_with_a_duration_exits_zero_with_a_summary() {
    let out = Command::new(env!("CARGO_BIN_EXE_stoke"))
        .args(["demo", "--duration", "3s", "--day", "30s", "--status", "127.0.0.1:0"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "status page",
        "edge syd",
        "cluster       nats://",
        "requests",
        "latency",
        "wakes",
        "sleeps",
        "GPU-seconds",
        "fixed 5-minute",
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    // Without the cluster, as before it.
    let out = Command::new(env!("CARGO_BIN_EXE_stoke"))
        .args(["demo", "--duration", "2s", "--day", "30s", "--status", "127.0.0.1:0", "--no-cluster"])
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("every edge decides alone (--no-cluster)"), "{stdout}");
}

/// The replay is checked against the live system: the demo's own traffic,
/// replayed by `stoke simulate` under the demo's policy, uses GPU-seconds
/// and wakes within 10 % of what the live run measured (a wake at least:
/// a short run has few). The edges decide alone, with one depth of sleep:
/// with light sleep, or as one cluster, a live minute has made one or two
/// wakes more than its replay in some runs (whole days agree within 4 % on
/// GPU-seconds; see `benches/README.md`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_the_demos_own_traffic_matches_the_live_run() {
    logs();
    let opts = DemoOptions { day: Duration::from_secs(120), cluster: false, light: false, ..DemoOptions::default() };
    let demo = Demo::start(opts).await.expect("demo starts");
    assert!(!demo.config_text().contains("[cluster]") && !demo.config_text().contains("light = "));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let config = demo.config_text().to_owned();
    let live_pools: Vec<String> = demo.pool_gpu_seconds().iter().map(|(id, s)| format!("{id}: {s:.0}")).collect();
    let trace = demo.recorded();
    let live = demo.stop().await;
    assert!(live.requests > 50 && live.ok == live.requests, "{live}");
    assert!(live.wakes >= 2, "a morning or two woke pools: {live}");

    let opts = stoke_router::simulate::Options {
        config: &config,
        config_path: std::path::Path::new("demo.toml"),
        policies: vec!["config".into()],
        replicas: stoke_router::simulate::ReplicaModel {
            default_rates: stoke_router::demo::world::replica_rates(),
            ..Default::default()
        },
        seed: 1,
        progress: false,
        until: Some(live.ran.as_secs_f64()),
    };
    let report = stoke_router::simulate::run(&opts, &trace).expect("replay");
    let sim = &report.policies[0].total;
    let pools: Vec<String> = report.policies[0]
        .pools
        .iter()
        .map(|(id, f)| format!("{id}: {:.0} GPU-s, {} wakes, {} light sleeps", f.gpu_seconds, f.wakes, f.light_sleeps))
        .collect();
    let gpu = (sim.gpu_seconds - live.gpu_seconds).abs() / live.gpu_seconds;
    assert!(
        gpu <= 0.10,
        "GPU-seconds: replay {:.0}, live {:.0}\n{live}\nreplay: {}\nlive: {}",
        sim.gpu_seconds,
        live.gpu_seconds,
        pools.join("; "),
        live_pools.join("; ")
    );
    let wakes = (sim.wakes as f64 - live.wakes as f64).abs();
    assert!(wakes <= (0.10 * live.wakes as f64).max(1.0), "wakes: replay {}, live {}\n{live}", sim.wakes, live.wakes);
    assert_eq!(sim.requests, trace.requests.len() as u64);
    assert_eq!(sim.ok, sim.requests, "{:?}", sim.refused);
}
