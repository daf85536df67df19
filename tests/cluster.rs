//! The network acting as one over a real `nats-server` (JetStream on, in a
//! temp dir, on a free port): one wake per pool across ten edges, a claim
//! whose edge died is taken over, a NATS outage fails nothing and falls
//! back to one wake per edge, two edges share one pool's capacity, a pool
//! busy at another edge is not put to sleep, and the production shape (a
//! hub of three servers, a leaf per location) works the same, and an edge
//! upgraded to a new process keeps its wake claim.
//!
//! `nats-server` must be installed (Debian's package; `.ci/run` installs it).

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stoke_router::edge::Edge;
use stoke_router::sim::OrchestratorOptions;
use support::nats::Nats;
use support::*;

/// The route with a `max_wait` long enough for a claim to run out.
const ROUTE: &str = "\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"15s\"\n";

/// `[cluster]` for the server at `url`.
fn cluster(url: &str) -> String {
    format!("\n[cluster]\nnats = [\"{url}\"]\nname = \"t\"\ntimeout = \"1s\"\n")
}

/// Start one edge per location in `edges`, all from `file`.
async fn edges(file: &ConfigFile, edges: &[&str]) -> Vec<Edge> {
    let mut out = Vec::new();
    for e in edges {
        out.push(edge_from(file, e).await);
    }
    out
}

/// Wait until every edge is connected to the cluster, deciding with it,
/// and has its claim bucket open.
async fn all_connected(edges: &[Edge]) {
    for e in edges {
        eventually(Duration::from_secs(15), "the edge joined the cluster", || async {
            let c = admin_json(e, "/state").await["cluster"].clone();
            (c["connected"] == true && c["alone"] == false && c["claims_ready"] == true).then_some(())
        })
        .await;
    }
}

/// Send `per_edge` requests for `model` to every edge at once; every
/// answer's status and `stoke-wait-ms`.
async fn burst(edges: &[Edge], per_edge: usize, model: &str) -> Vec<(u16, u64, String)> {
    let mut tasks = Vec::new();
    for e in edges {
        for _ in 0..per_edge {
            let (addr, model) = (e.bound.http.expect("http"), model.to_owned());
            tasks.push(tokio::spawn(async move {
                let r = send(addr, Req::chat(&model)).await;
                let wait = r.header("stoke-wait-ms").and_then(|v| v.parse().ok()).unwrap_or(0);
                (r.status.as_u16(), wait, r.text())
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

fn assert_all_ok(answers: &[(u16, u64, String)]) {
    for (status, _, text) in answers {
        assert_eq!(*status, 200, "{text}");
    }
}

/// Wake claims each edge won, from `/state`.
async fn claims_won(edges: &[Edge]) -> u64 {
    let mut won = 0;
    for e in edges {
        won += admin_json(e, "/state").await["cluster"]["claims"]["won"].as_u64().expect("claims.won");
    }
    won
}

async fn shutdown(edges: Vec<Edge>) {
    for e in edges {
        e.shutdown().await;
    }
}

/// A network of `locations` with one scaled pool `fra-a` (and `extra`),
/// its orchestrator and the config file.
async fn world(
    locations: &str,
    cluster_conf: &str,
    scale: &str,
    extra: &str,
) -> (stoke_router::sim::Orchestrator, ConfigFile) {
    let (listener, orch) = orchestrator_listener().await;
    let rep = free_addr();
    let text = format!(
        "{EDGE}{cluster_conf}{locations}{}{extra}{ROUTE}",
        scaled_pool("fra-a", "fra", &["m"], &[rep], orch, scale)
    );
    let file = ConfigFile::new(&text);
    // Pools without scale settings are the test's own replicas.
    let opts = OrchestratorOptions { start_always_on: false, ..Default::default() };
    let orch = start_orchestrator(listener, &file, opts).await;
    (orch, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_ten_edges_makes_one_wake_call() {
    logs();
    let nats = Nats::start().await;
    let (orch, file) =
        world(TEN_LOCATIONS, &cluster(&nats.url()), "wake_time = \"1s\"\nidle_timeout = \"1h\"", "").await;
    let edges = edges(&file, &TEN_EDGES).await;
    all_connected(&edges).await;

    let answers = burst(&edges, 3, "m").await;
    assert_all_ok(&answers);
    let calls = orch.calls_for("fra-a", "wake");
    assert_eq!(calls.len(), 1, "one wake call for the whole network: {calls:?}");
    assert_eq!(claims_won(&edges).await, 1);
    assert!(answers.iter().all(|(_, wait, _)| *wait > 0), "every request was held for the one wake");
    shutdown(edges).await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_edge_died_is_taken_over_when_it_runs_out() {
    logs();
    let nats = Nats::start().await;
    let (orch, file) =
        world(TEN_LOCATIONS, &cluster(&nats.url()), "wake_time = \"500ms\"\nidle_timeout = \"1h\"", "").await;
    // An edge claimed the wake and died before calling the hook: its claim
    // lives 2 s more.
    let client = async_nats::connect(nats.url()).await.expect("nats client");
    let js = async_nats::jetstream::new(client);
    let kv = stoke_router::control::cluster::claim::open_bucket(&js, "t").await.expect("bucket");
    let until = stoke_router::control::cluster::claim::unix_ms() + 2000;
    let ghost = format!(r#"{{"edge":"ghost","until_ms":{until},"state":"waking"}}"#);
    kv.create("pool.fra-a", ghost.into()).await.expect("the dead edge's claim");

    let edges = edges(&file, &TEN_EDGES[..3]).await;
    all_connected(&edges).await;
    let started = Instant::now();
    let answers = burst(&edges, 2, "m").await;
    assert_all_ok(&answers);
    let calls = orch.calls_for("fra-a", "wake");
    assert_eq!(calls.len(), 1, "one edge took the claim over: {calls:?}");
    assert!(TEN_EDGES[..3].contains(&calls[0].edge.as_str()), "{calls:?}");
    let least = answers.iter().map(|(_, w, _)| *w).min().unwrap_or(0);
    assert!(least >= 1500, "nobody called the hook while the dead edge's claim lived (waited {least} ms)");
    assert!(started.elapsed() < Duration::from_secs(10));
    shutdown(edges).await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_fails_nothing_and_one_wake_per_pool_comes_back_with_it() {
    logs();
    let mut nats = Nats::start().await;
    let warm = replica("par-w").await;
    let extra = pool("par-w", "par", &["w"], &[warm.addr], "");
    let (orch, file) =
        world(TEN_LOCATIONS, &cluster(&nats.url()), "wake_time = \"500ms\"\nidle_timeout = \"1h\"", &extra).await;
    let edges = edges(&file, &TEN_EDGES[..3]).await;
    all_connected(&edges).await;

    // Steady traffic to the warm pool at every edge, across the outage.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = Vec::new();
    for e in &edges {
        let (addr, stop) = (e.bound.http.expect("http"), stop.clone());
        traffic.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = send(addr, Req::chat("w")).await;
                if r.status == 200 {
                    ok += 1;
                } else {
                    failed.push((r.status, r.text()));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    nats.kill();
    for e in &edges {
        eventually(Duration::from_secs(5), "the edge knows it is alone", || async {
            (admin_json(e, "/state").await["cluster"]["connected"] == false).then_some(())
        })
        .await;
    }
    // Alone, each edge wakes the cold pool itself.
    let answers = burst(&edges, 2, "m").await;
    assert_all_ok(&answers);
    let alone = orch.calls_for("fra-a", "wake");
    assert_eq!(alone.len(), 3, "one wake call per edge without the cluster: {alone:?}");

    // Back: one wake per pool again.
    nats.restart().await;
    all_connected(&edges).await;
    orch.stop_pool("fra-a").await;
    for e in &edges {
        eventually(Duration::from_secs(5), "the pool is cold again", || async {
            (pool_state(e, "fra-a").await["state"] == "cold").then_some(())
        })
        .await;
    }
    let answers = burst(&edges, 2, "m").await;
    assert_all_ok(&answers);
    let calls = orch.calls_for("fra-a", "wake");
    assert_eq!(calls.len(), 4, "one more wake call for the whole network: {calls:?}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in traffic {
        let (ok, failed) = t.await.expect("traffic task");
        assert!(ok > 10, "traffic went on ({ok} answered)");
        assert!(failed.is_empty(), "requests failed during the outage: {failed:?}");
    }
    shutdown(edges).await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_filling_one_pool_stay_within_its_capacity() {
    logs();
    let nats = Nats::start().await;
    // One replica that takes 4 at once, each request about 2 s.
    let rep = replica_with("fra-a", |o| {
        o.max_concurrency = 4;
        o.tokens_per_sec = 20.0;
    })
    .await;
    let text = format!(
        "{EDGE}{}{TEN_LOCATIONS}{}{ROUTE}",
        cluster(&nats.url()),
        pool("fra-a", "fra", &["m"], &[rep.addr], "max_concurrency = 4")
    );
    let file = ConfigFile::new(&text);
    let edges = edges(&file, &["fra", "par"]).await;
    all_connected(&edges).await;

    let long = || Req::post("/v1/chat/completions", chat_body("m", false, 40));
    let send_at = |e: &Edge| {
        let addr = e.bound.http.expect("http");
        tokio::spawn(async move {
            let r = send(addr, long()).await;
            (r.status, r.header("stoke-wait-ms").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0), r.text())
        })
    };
    let first: Vec<_> = (0..4).map(|_| send_at(&edges[0])).collect();
    // Paris sees Frankfurt's four within a second.
    eventually(Duration::from_secs(2), "Paris sees the pool full", || async {
        (pool_state(&edges[1], "fra-a").await["elsewhere"]["in_flight"] == 4).then_some(())
    })
    .await;
    let second: Vec<_> = (0..4).map(|_| send_at(&edges[1])).collect();
    for t in first {
        let (status, _, text) = t.await.expect("task");
        assert_eq!(status, 200, "{text}");
    }
    for t in second {
        let (status, wait, text) = t.await.expect("task");
        assert_eq!(status, 200, "{text}");
        assert!(wait > 500, "held until Frankfurt's requests ended (waited {wait} ms)");
    }
    let peak = rep.stats.peak_busy.load(std::sync::atomic::Ordering::Relaxed);
    assert!(peak <= 4, "the replica had {peak} requests at once; it takes 4");
    shutdown(edges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_busy_only_at_another_edge_is_not_put_to_sleep() {
    logs();
    let nats = Nats::start().await;
    // No load scrape: only the cluster tells Frankfurt of Paris's request.
    let (orch, file) =
        world(TEN_LOCATIONS, &cluster(&nats.url()), "wake_time = \"300ms\"\nidle_timeout = \"1s\"", "").await;
    let edges = edges(&file, &["fra", "par"]).await;
    all_connected(&edges).await;
    let paris = edges[1].bound.http.expect("http");

    // Paris wakes the pool and streams a long answer from it (about 4 s at
    // the simulator's 200 tokens/s), four idle windows of Frankfurt's.
    let r = send(paris, Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(paris, Req::post("/v1/chat/completions", chat_body("m", true, 800))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("[DONE]"), "the stream ran to its end: {}", r.text());
    let sleeps = orch.calls_for("fra-a", "sleep");
    assert!(sleeps.is_empty(), "the home edge put the pool to sleep under Paris's stream: {sleeps:?}");
    // Idle everywhere: it sleeps.
    eventually(Duration::from_secs(5), "the pool sleeps once idle everywhere", || async {
        (!orch.calls_for("fra-a", "sleep").is_empty()).then_some(())
    })
    .await;
    assert_eq!(orch.calls_for("fra-a", "sleep")[0].edge, "fra", "by its home edge");
    shutdown(edges).await;
    orch.shutdown().await;
}

/// A hub of three servers (JetStream, one cluster) and a leaf per location
/// without JetStream of its own, each edge talking only to its leaf: the
/// shape production runs (README, "Running a cluster").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_of_three_with_a_leaf_per_location_makes_one_wake_call() {
    logs();
    let ports: Vec<u16> = (0..8).map(|_| free_addr().port()).collect();
    let (client, route, leaf) = (&ports[0..3], &ports[3..6], &ports[6..8]);
    let routes = route.iter().map(|p| format!("\"nats-route://127.0.0.1:{p}\"")).collect::<Vec<_>>().join(", ");
    let mut hub = Vec::new();
    for i in 0..3 {
        let conf = format!(
            "server_name: hub{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{{dir}}\", domain: hub }}\n\
             cluster {{ name: hub, listen: 127.0.0.1:{}, routes: [{routes}] }}\n\
             leafnodes {{ listen: 127.0.0.1:{} }}\n",
            client[i],
            route[i],
            leaf.get(i).copied().unwrap_or_else(|| free_addr().port()),
        );
        hub.push(Nats::from_conf(&conf, client[i]).await);
    }
    let mut leaves = Vec::new();
    for (i, loc) in ["fra", "par"].iter().enumerate() {
        let port = free_addr().port();
        let remotes = leaf.iter().map(|p| format!("\"nats-leaf://127.0.0.1:{p}\"")).collect::<Vec<_>>().join(", ");
        let conf = format!(
            "server_name: leaf-{loc}\nlisten: 127.0.0.1:{port}\nleafnodes {{ remotes: [{{ urls: [{remotes}] }}] }}\n"
        );
        leaves.push(Nats::from_conf(&conf, port).await);
        let _ = i;
    }
    // JetStream elects its meta leader across the hub: wait until a KV
    // bucket can be made through a leaf.
    let client = async_nats::connect(leaves[0].url()).await.expect("client");
    let js = async_nats::jetstream::with_domain(client, "hub");
    eventually(Duration::from_secs(30), "JetStream through the leaf", || async {
        stoke_router::control::cluster::claim::open_bucket(&js, "t").await.ok().map(|_| ())
    })
    .await;

    // One config per edge: the same network, each edge naming its own leaf.
    let (listener, orch) = orchestrator_listener().await;
    let rep = free_addr();
    let body = format!(
        "{TEN_LOCATIONS}{}{ROUTE}",
        scaled_pool("fra-a", "fra", &["m"], &[rep], orch, "wake_time = \"500ms\"\nidle_timeout = \"1h\"")
    );
    let files: Vec<ConfigFile> = leaves
        .iter()
        .map(|l| ConfigFile::new(&format!("{EDGE}{}domain = \"hub\"\n{body}", cluster(&l.url()))))
        .collect();
    let orch = start_orchestrator(listener, &files[0], OrchestratorOptions::default()).await;
    let mut edges = Vec::new();
    for (file, loc) in files.iter().zip(["fra", "par"]) {
        edges.push(edge_from(file, loc).await);
    }
    all_connected(&edges).await;
    // The load view crosses the leaves too.
    eventually(Duration::from_secs(5), "each edge hears the other", || async {
        let a = admin_json(&edges[0], "/state").await["cluster"]["peers"].as_array().map_or(0, |p| p.len());
        let b = admin_json(&edges[1], "/state").await["cluster"]["peers"].as_array().map_or(0, |p| p.len());
        (a == 1 && b == 1).then_some(())
    })
    .await;
    let answers = burst(&edges, 3, "m").await;
    assert_all_ok(&answers);
    let calls = orch.calls_for("fra-a", "wake");
    assert_eq!(calls.len(), 1, "one wake call through the hub: {calls:?}");
    shutdown(edges).await;
    orch.shutdown().await;
    drop((leaves, hub));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_starts_and_serves_while_nats_is_down_and_joins_it_later() {
    logs();
    let mut nats = Nats::start().await;
    nats.kill();
    let warm = replica("fra-w").await;
    let text = format!(
        "{EDGE}{}{TEN_LOCATIONS}{}{ROUTE}",
        cluster(&nats.url()),
        pool("fra-w", "fra", &["w"], &[warm.addr], "")
    );
    let file = ConfigFile::new(&text);
    let started = Instant::now();
    let edges = edges(&file, &["fra", "par"]).await;
    assert!(started.elapsed() < Duration::from_secs(5), "the edges did not wait for NATS");
    for e in &edges {
        let r = send(e.bound.http.expect("http"), Req::chat("w")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let c = admin_json(e, "/state").await["cluster"].clone();
        assert_eq!((c["connected"].clone(), c["alone"].clone()), (false.into(), true.into()), "{c}");
    }
    nats.restart().await;
    all_connected(&edges).await;
    eventually(Duration::from_secs(5), "the edges hear each other", || async {
        let peers = admin_json(&edges[0], "/state").await["cluster"]["peers"].as_array().map_or(0, |p| p.len());
        (peers == 1).then_some(())
    })
    .await;
    shutdown(edges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_edge_keeps_its_wake_claim() {
    logs();
    let nats = Nats::start().await;
    let (orch, file) = world(LOCATIONS, &cluster(&nats.url()), "wake_time = \"3s\"\nidle_timeout = \"1h\"", "").await;
    // fra runs as a process that can be upgraded; par in this one.
    let text = std::fs::read_to_string(&file.path).expect("config");
    let fra_file = ConfigFile::new(&text.replacen(
        "[edge]\n",
        "[edge]\nlocation = \"fra\"\nupgrade_socket = \"upgrade.sock\"\n",
        1,
    ));
    let par = edge_from(&file, "par").await;
    let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut fra = Command::new(env!("CARGO_BIN_EXE_stoke"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&fra_file.path)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("stoke serve");
    let Listeners { http, admin, .. } = listening(fra.stderr.take().expect("stderr"), log);
    all_connected(std::slice::from_ref(&par)).await;
    let joined = || async {
        let c = send(admin, Req::get("/state")).await.json()["cluster"].clone();
        (c["connected"] == true && c["claims_ready"] == true).then_some(())
    };
    eventually(Duration::from_secs(15), "fra joined the cluster", joined).await;

    // fra claims the wake and calls the hook; the pool takes 3 s.
    let held = |addr: SocketAddr, n: usize| {
        (0..n)
            .map(|_| tokio::spawn(async move { send(addr, Req::chat("m")).await.status.as_u16() }))
            .collect::<Vec<_>>()
    };
    let mut answers = held(http, 5);
    eventually(Duration::from_secs(5), "fra called the wake hook", || async {
        (!orch.calls_for("fra-a", "wake").is_empty()).then_some(())
    })
    .await;
    // Upgraded while the pool wakes: the claim is still fra's, so par
    // holds its requests for the wake rather than calling the hook itself.
    let up = upgrade(&fra_file).await;
    assert!(up.ok, "{}\n{}", up.stdout, up.stderr);
    answers.extend(held(par.bound.http.expect("http"), 5));
    answers.extend(held(http, 5));
    for a in answers {
        assert_eq!(a.await.expect("request"), 200);
    }
    let calls = orch.calls_for("fra-a", "wake");
    assert!(calls.iter().all(|c| c.edge == "fra"), "only fra, before or after its upgrade, called: {calls:?}");
    assert_eq!(admin_json(&par, "/state").await["cluster"]["claims"]["won"], 0);
    let state = send(admin, Req::get("/state")).await.json();
    assert_eq!(state["process"]["generation"], 2);
    assert_eq!(state["cluster"]["connected"], true, "the new process is in the cluster");
    terminate(up.pid());
    let _ = tokio::task::spawn_blocking(move || fra.wait()).await;
    par.shutdown().await;
    orch.shutdown().await;
}
