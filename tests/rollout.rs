//! Staged config rollout (`stoke push`) over a real `nats-server`, with
//! three edges as `stoke serve` processes, each with its own local file in
//! its own directory: a valid file that makes every pool unreachable is
//! applied only by the canary, which rolls back within the bake time plus
//! 10 s while the other edges never load it; a good file reaches every
//! edge; NATS going down during a rollout leaves every edge on a version it
//! validated, and the rollout finishes when NATS is back; a version that
//! fails its check on one edge stops the rollout there and sends the rest
//! back. Every edge's version shows in `/state` and on the status page (in
//! chromium), an edge that starts serves the settled version from its first
//! request, and a push removes versions older than the newest twenty.
//!
//! `nats-server` and chromium must be installed (Debian's packages; `.ci/run`
//! installs them).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stoke_router::sim::Replica;
use support::browser::*;
use support::nats::Nats;
use support::*;

const STOKE: &str = env!("CARGO_BIN_EXE_stoke");

/// The edges of every test: fra is the canary.
const EDGES: [&str; 3] = ["fra", "par", "sin"];

/// The network: one pool at fra with `replica`, the cluster at `nats`.
fn network(nats: &str, replica: SocketAddr, extra: &str) -> String {
    format!(
        "{EDGE}\n[cluster]\nnats = [\"{nats}\"]\nname = \"t\"\ntimeout = \"1s\"\n{LOCATIONS}{}{BODY_ROUTE}{extra}",
        pool("fra-a", "fra", &["m"], &[replica], "")
    )
}

/// One `stoke serve` process, killed when dropped.
struct EdgeProcess {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
    file: ConfigFile,
    log: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EdgeProcess {
    async fn state(&self) -> serde_json::Value {
        send(self.admin, Req::get("/state")).await.json()
    }

    /// The cluster version this edge runs (`None`: its local file), and
    /// its config's hash.
    async fn running(&self) -> (Option<u64>, String) {
        let s = self.state().await;
        (s["config"]["cluster_version"].as_u64(), s["config"]["hash"].as_str().unwrap_or_default().to_owned())
    }

    fn log(&self) -> String {
        self.log.lock().join("\n")
    }
}

/// Start `stoke serve` at `location` from its own copy of `text`; returns
/// once it says it is listening (its clients are served from then on).
async fn start_edge(location: &str, text: &str) -> EdgeProcess {
    let file = ConfigFile::new(text);
    let log = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut child = Command::new(STOKE)
        .args(["--log-format", "json", "serve", "--location", location, "--config"])
        .arg(&file.path)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("stoke serve");
    let stderr = child.stderr.take().expect("stderr");
    let log2 = log.clone();
    let Listeners { http, admin, .. } =
        tokio::task::spawn_blocking(move || listening(stderr, log2)).await.expect("listening");
    EdgeProcess { child, http, admin, file, log }
}

/// Start the three edges, each from its own copy of `text`, and wait until
/// each has reported to the cluster.
async fn start_edges(text: &str) -> Vec<EdgeProcess> {
    let mut out = Vec::new();
    for location in EDGES {
        out.push(start_edge(location, text).await);
    }
    let first = out[0].admin;
    eventually(Duration::from_secs(20), "every edge reported to the cluster", || async {
        let r = send(first, Req::get("/rollout")).await;
        let edges = r.json()["edges"].as_array().cloned().unwrap_or_default();
        (edges.iter().filter(|e| e["present"] == true).count() == EDGES.len()).then_some(())
    })
    .await;
    out
}

/// What `stoke push` came to: its exit, everything it printed, how long it took.
struct Pushed {
    ok: bool,
    output: String,
    took: Duration,
}

async fn push(file: &Path, args: &[&str]) -> Pushed {
    let (file, args): (PathBuf, Vec<String>) = (file.to_owned(), args.iter().map(|s| s.to_string()).collect());
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(STOKE).arg("push").arg("--config").arg(file).args(args).output().expect("stoke push")
    })
    .await
    .expect("join");
    Pushed {
        ok: out.status.success(),
        output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        took: started.elapsed(),
    }
}

/// A file beside `edge`'s config, with `text`.
fn beside(edge: &EdgeProcess, name: &str, text: &str) -> PathBuf {
    edge.file.write(name, text.as_bytes());
    edge.file.dir.path().join(name)
}

async fn answers(edge: &EdgeProcess) -> u16 {
    send(edge.http, Req::chat("m")).await.status.as_u16()
}

async fn world() -> (Nats, Replica, String) {
    logs();
    let nats = Nats::start().await;
    let replica = replica("r").await;
    let text = network(&nats.url(), replica.addr, "");
    (nats, replica, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_makes_every_pool_unreachable_is_rolled_back_by_the_canary_alone() {
    let (nats, replica, text) = world().await;
    let edges = start_edges(&text).await;
    for e in &edges {
        assert_eq!(answers(e).await, 200, "{}", e.log());
    }
    let local: Vec<String> = {
        let mut v = Vec::new();
        for e in &edges {
            v.push(e.running().await.1);
        }
        v
    };
    // Valid, but its only pool's replica is a port nothing listens on.
    let bad = beside(&edges[0], "bad.toml", &network(&nats.url(), free_addr(), ""));

    // Watch par and sin through the whole rollout: they never run it.
    let watched: Vec<SocketAddr> = edges[1..].iter().map(|e| e.admin).collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        while !*stopped.borrow() {
            for a in &watched {
                let s = send(*a, Req::get("/state")).await.json();
                seen.insert((s["config"]["cluster_version"].as_u64(), s["config"]["hash"].to_string()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    });

    // A long bake: a gate that fails on every check ends it early.
    let pushed = push(&bad, &["--canary", "fra", "--bake", "60s", "--note", "move the replica"]).await;
    assert!(!pushed.ok, "the push fails: {}", pushed.output);
    assert!(pushed.output.contains("rolled back"), "{}", pushed.output);
    assert!(pushed.output.contains("service \"m\" has no reachable pool"), "{}", pushed.output);
    assert!(pushed.took < Duration::from_secs(20), "rolled back well within the bake: {:?}", pushed.took);
    let _ = stop.send(true);
    let seen = watcher.await.expect("watcher");
    assert!(seen.iter().all(|(v, _)| v.is_none()), "par and sin only ever ran their own file: {seen:?}");

    // fra is back on its own file, and serves.
    let s = edges[0].state().await;
    assert_eq!(s["config"]["source"], "file", "{s}");
    assert_eq!(edges[0].running().await, (None, local[0].clone()));
    assert_eq!(s["rollout"]["verdict"]["pass"], false, "{s}");
    assert_eq!(s["rollout"]["rollout"]["phase"], "rolled_back", "{s}");
    for e in &edges {
        assert_eq!(answers(e).await, 200, "{}", e.log());
    }
    let log = edges[0].log();
    assert!(log.contains("the gate failed; rolling back"), "the canary's log says why:\n{log}");
    assert!(log.contains("ending the bake early"), "{log}");
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_file_goes_through_the_canary_to_every_edge() {
    let (nats, _replica, text) = world().await;
    let edges = start_edges(&text).await;
    let good = beside(&edges[0], "good.toml", &format!("{text}\n# the same network, pushed\n"));
    let pushed = push(&good, &["--canary", "fra", "--bake", "2s"]).await;
    assert!(pushed.ok, "{}", pushed.output);
    assert!(pushed.output.contains("version 1 runs on every edge (3)"), "{}", pushed.output);
    assert!(pushed.output.contains("fra: version 1, gate on version 1: passed"), "{}", pushed.output);
    let hash = edges[0].running().await.1;
    for e in &edges {
        assert_eq!(e.running().await, (Some(1), hash.clone()));
        assert_eq!(answers(e).await, 200);
    }
    let status = Command::new(STOKE).args(["push", "--status", "--config"]).arg(&good).output().expect("status");
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{printed}");
    assert!(printed.starts_with("version 1 (") && printed.contains("): all"), "{printed}");
    for edge in EDGES {
        assert!(printed.contains(&format!("  {edge}: version 1")), "{printed}");
    }
    // While the cluster's version is in force, the local file is not read.
    let r = send(edges[1].admin, Req::post("/reload", "")).await;
    assert_eq!(r.status, 422);
    assert!(r.text().contains("stoke push"), "{}", r.text());
    // Every edge's /state has every edge's version, and so has its status
    // page, drawn in a browser.
    eventually(Duration::from_secs(10), "par's /state lists every edge on version 1", || async {
        let s = edges[1].state().await;
        let listed: Vec<(String, Option<u64>)> = s["rollout"]["edges"]
            .as_array()
            .map(|a| a.iter().map(|e| (e["edge"].as_str().unwrap_or("").to_owned(), e["version"].as_u64())).collect())
            .unwrap_or_default();
        (listed == EDGES.map(|e| (e.to_owned(), Some(1)))).then_some(())
    })
    .await;
    let dom = browse(&chromium(), &["--dump-dom"], &format!("http://{}/", edges[1].admin)).await;
    let rows: Vec<(String, String, String)> = elements_with_tag(&dom, "tr")
        .iter()
        .filter_map(|t| Some((attr(t, "data-edge")?, attr(t, "data-runs")?, attr(t, "data-gate")?)))
        .collect();
    let expected: Vec<(String, String, String)> = [("fra", "pass"), ("par", ""), ("sin", "")]
        .map(|(e, g)| (e.to_owned(), "v1".to_owned(), g.to_owned()))
        .to_vec();
    assert_eq!(rows, expected, "the status page's rollout rows");
    let line = elements_with_tag(&dom, "span").into_iter().find(|t| attr(t, "id").as_deref() == Some("rolloutLine"));
    let line = line.expect("the rollout line");
    assert_eq!(
        (attr(&line, "data-version").as_deref(), attr(&line, "data-phase").as_deref()),
        (Some("1"), Some("all"))
    );
    assert!(dom.contains(" · cluster v1</b>"), "the header says the cluster's version is in force");

    // An edge that starts (here: sin, again, from its own file) serves the
    // version the network settled on from its first request.
    let sin_file = edges[2].file.path.clone();
    let sin_text = std::fs::read_to_string(&sin_file).expect("sin's file");
    let mut edges = edges;
    drop(edges.pop());
    let sin = start_edge("sin", &sin_text).await;
    assert_eq!(sin.running().await, (Some(1), hash.clone()), "{}", sin.log());
    assert_eq!(answers(&sin).await, 200);
    edges.push(sin);

    // And a second push rolls back to version 1, not to the local files.
    let bad = beside(&edges[0], "bad.toml", &network(&nats.url(), free_addr(), ""));
    let pushed = push(&bad, &["--canary", "fra", "--bake", "1s"]).await;
    assert!(!pushed.ok && pushed.output.contains("version 2 rolled back"), "{}", pushed.output);
    for e in &edges {
        assert_eq!(e.running().await, (Some(1), hash.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_during_a_rollout_leaves_every_edge_on_a_version_it_validated() {
    let (mut nats, _replica, text) = world().await;
    let edges = start_edges(&text).await;
    let v1 = beside(&edges[0], "v1.toml", &format!("{text}\n# v1\n"));
    let pushed = push(&v1, &[]).await;
    assert!(pushed.ok, "without canaries every edge applies it at once: {}", pushed.output);
    let h1 = edges[0].running().await.1;
    let v2 = beside(&edges[0], "v2.toml", &format!("{text}\n# v2\n"));
    let pushed = push(&v2, &["--canary", "fra", "--bake", "3s", "--no-wait"]).await;
    assert!(pushed.ok, "{}", pushed.output);
    eventually(Duration::from_secs(10), "fra bakes version 2", || async {
        (edges[0].state().await["rollout"]["baking"]["version"] == 2).then_some(())
    })
    .await;
    let h2 = edges[0].running().await.1;
    nats.kill();
    // The bake ends without the cluster: fra judges itself, passes, and
    // keeps version 2; par and sin keep version 1.
    eventually(Duration::from_secs(10), "fra's gate passed", || async {
        let v = edges[0].state().await["rollout"]["verdict"].clone();
        (v["version"] == 2).then_some(v)
    })
    .await;
    assert_eq!(edges[0].running().await, (Some(2), h2.clone()));
    for e in &edges[1..] {
        assert_eq!(e.running().await, (Some(1), h1.clone()));
    }
    for e in &edges {
        assert_eq!(answers(e).await, 200, "every edge serves while NATS is down");
    }
    // NATS back: fra promotes the rollout, and every edge takes version 2.
    nats.restart().await;
    for e in &edges {
        eventually(Duration::from_secs(20), "the edge runs version 2", || async {
            (e.running().await == (Some(2), h2.clone())).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_fails_its_check_on_one_edge_stops_the_rollout() {
    let (_nats, _replica, text) = world().await;
    let edges = start_edges(&text).await;
    // A certificate that fra and par have beside their files, and sin has not.
    let (cert, key, _) = certificate(&["localhost"]);
    for e in &edges[..2] {
        e.file.write("edge.crt", cert.as_bytes());
        e.file.write("edge.key", key.as_bytes());
    }
    let tls = "\n[[tls]]\nhosts = [\"localhost\"]\ncert = \"edge.crt\"\nkey = \"edge.key\"\n";
    let with_tls = beside(&edges[0], "tls.toml", &format!("{text}{tls}"));
    let pushed = push(&with_tls, &[]).await;
    assert!(!pushed.ok, "{}", pushed.output);
    assert!(pushed.output.contains("version 1 stopped: edge sin cannot apply version 1"), "{}", pushed.output);
    assert!(pushed.output.contains("edge.crt"), "the reason names the file: {}", pushed.output);
    // Every edge is back on (or never left) its own file.
    for e in &edges {
        eventually(Duration::from_secs(10), "the edge runs its local file", || async {
            (e.running().await.0.is_none()).then_some(())
        })
        .await;
        assert_eq!(answers(e).await, 200);
    }
    let s = edges[2].state().await;
    assert_eq!(s["rollout"]["failed"][0]["version"], 1, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_removes_versions_older_than_the_newest_twenty() {
    use stoke_router::control::cluster::rollout::{self, Push, KEEP_VERSIONS};
    logs();
    let nats = Nats::start().await;
    let client = async_nats::connect(nats.url()).await.expect("connect to nats");
    let store = rollout::open_bucket(&async_nats::jetstream::new(client), "t").await.expect("the config bucket");
    let pushes = KEEP_VERSIONS + 5;
    for n in 1..=pushes {
        let push = Push {
            text: format!("# version {n}\n"),
            hash: format!("h{n}"),
            canary: Vec::new(),
            bake: Duration::ZERO,
            note: String::new(),
            author: "test".into(),
        };
        assert_eq!(rollout::publish(&store, push).await.expect("publish").version, n);
    }
    let mut kept = Vec::new();
    for n in 1..=pushes {
        if rollout::read_version(&store, n).await.is_ok() {
            kept.push(n);
        }
    }
    assert_eq!(kept, (pushes - KEEP_VERSIONS + 1..=pushes).collect::<Vec<_>>());
}
