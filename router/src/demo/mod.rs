//! `stoke demo`: a whole ten-location network on loopback — ten edges,
//! simulated GPU pools that sleep and wake, the simulated orchestrator, and
//! users whose demand follows the sun over a day compressed into minutes —
//! with one status page for the whole network.

pub mod nats;
pub mod traffic;
pub mod world;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::edge::Edge;
use crate::net::server::{serve_http, HttpBody};
use crate::sim::{Orchestrator, OrchestratorOptions};
use traffic::{Clock, Stats};
use world::{Ports, POOLS, SITES};

/// Settings of the demo world.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Real time one simulated day takes.
    pub day: Duration,
    /// Simulated UTC hour at the start (6: morning in Europe, afternoon in Asia).
    pub start_hour: f64,
    /// Address of the status page (port 0: any free port).
    pub status: SocketAddr,
    /// Idle time after which a pool sleeps (`None`: `"auto"`).
    pub idle_timeout: Option<Duration>,
    /// Whether to send traffic.
    pub traffic: bool,
    /// Write every request sent to this file, as a trace for `stoke simulate`.
    pub record: Option<std::path::PathBuf>,
    /// Run the edges as one cluster on a local `nats-server` when it is
    /// installed (`false`: every edge alone, as `--no-cluster`).
    pub cluster: bool,
    /// Give the scaling pools a light depth (`false`: one depth, as
    /// `--one-depth`).
    pub light: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            day: Duration::from_secs(240),
            start_hour: 6.0,
            status: SocketAddr::from(([127, 0, 0, 1], 0)),
            idle_timeout: None,
            traffic: true,
            record: None,
            cluster: true,
            light: true,
        }
    }
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A socket could not be bound.
    #[error("cannot bind a loopback port: {0}")]
    Io(#[from] std::io::Error),
    /// The generated config did not load (a bug).
    #[error("the demo config is invalid: {0}")]
    Config(#[from] stoke_config::ConfigError),
    /// An edge did not start.
    #[error("an edge did not start: {0}")]
    Edge(#[from] crate::edge::StartError),
}

/// A running demo world.
pub struct Demo {
    /// The status page.
    pub status_url: String,
    /// Each edge: location id and plain HTTP address.
    pub edges: Vec<(&'static str, SocketAddr)>,
    world: Arc<World>,
    recorder: traffic::Recorder,
    record_to: Option<std::path::PathBuf>,
    config_text: String,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    orchestrator: Orchestrator,
    edge_handles: Vec<Edge>,
    _config: tempfile_lite::TempFile,
    /// The cluster's server, stopped after the edges.
    _nats: Option<nats::NatsServer>,
}

/// What the status page reads.
struct World {
    routers: Vec<(&'static str, Arc<crate::state::Router>)>,
    /// The cluster's NATS URL, or why the edges run alone.
    cluster: Result<String, String>,
    clock: Clock,
    stats: Arc<Stats>,
    started: Instant,
}

/// The figures printed when the demo ends.
#[derive(Debug)]
pub struct Summary {
    /// How long it ran.
    pub ran: Duration,
    /// Requests sent by the simulated users.
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Latency percentiles, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Requests held for capacity or a wake, and their total hold time.
    pub held: u64,
    /// Milliseconds held, in total.
    pub held_ms: u64,
    /// Times a sleeping pool was started.
    pub wakes: usize,
    /// Wake hook calls the orchestrator received (with resends, and one
    /// from each edge that wanted the pool).
    pub wake_calls: usize,
    /// Sleep hook calls.
    pub sleeps: usize,
    /// Light sleeps and wakes from light sleep, counted per pool.
    pub light_sleeps: u64,
    /// See [`Summary::light_sleeps`].
    pub light_wakes: u64,
    /// GPU-seconds used (time in light sleep at its cost), and what an
    /// always-on fleet would have used.
    pub gpu_seconds: f64,
    /// Always-on equivalent.
    pub always_on_gpu_seconds: f64,
    /// What the same traffic would have used with a fixed 5-minute idle
    /// timeout (replayed by `stoke simulate` when the demo stops).
    pub fixed_gpu_seconds: Option<f64>,
    /// What it would have used with one depth of sleep under `"auto"`
    /// (replayed the same way), when the demo's pools have two.
    pub one_depth_gpu_seconds: Option<f64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = if self.requests == 0 { 100.0 } else { self.ok as f64 * 100.0 / self.requests as f64 };
        let avg_held = if self.held == 0 { 0.0 } else { self.held_ms as f64 / self.held as f64 / 1000.0 };
        let share =
            if self.always_on_gpu_seconds > 0.0 { self.gpu_seconds * 100.0 / self.always_on_gpu_seconds } else { 0.0 };
        writeln!(f, "stoke demo: ran {:.0} s, 10 edges, {} pools", self.ran.as_secs_f64(), POOLS.len())?;
        let ids = |on: bool| POOLS.iter().filter(|p| p.wake_time.is_none() == on).map(|p| p.id).collect::<Vec<_>>();
        writeln!(f, "  always on     {}", ids(true).join(", "))?;
        writeln!(f, "  scale to zero {}", ids(false).join(", "))?;
        writeln!(f, "  requests      {} ({:.1} % ok)", self.requests, rate)?;
        writeln!(f, "  latency       p50 {:.0} ms, p99 {:.0} ms", self.p50_ms, self.p99_ms)?;
        writeln!(
            f,
            "  held          {} requests waited for capacity or a wake, {:.2} s on average",
            self.held, avg_held
        )?;
        writeln!(f, "  wakes         {} ({} wake calls)", self.wakes, self.wake_calls)?;
        writeln!(f, "  sleeps        {}", self.sleeps)?;
        if self.light_sleeps > 0 {
            writeln!(f, "  light sleeps  {} ({} woken from light sleep)", self.light_sleeps, self.light_wakes)?;
        }
        write!(
            f,
            "  GPU-seconds   {:.0} used vs {:.0} for an always-on fleet ({:.0} %)",
            self.gpu_seconds, self.always_on_gpu_seconds, share
        )?;
        if let Some(fixed) = self.fixed_gpu_seconds.filter(|f| *f > 0.0) {
            write!(
                f,
                "\n                vs {:.0} with a fixed 5-minute idle timeout ({:.0} %, replayed)",
                fixed,
                self.gpu_seconds * 100.0 / fixed
            )?;
        }
        if let Some(one) = self.one_depth_gpu_seconds.filter(|f| *f > 0.0) {
            write!(
                f,
                "\n                vs {:.0} with one depth of sleep, \"auto\" ({:.0} %, replayed)",
                one,
                self.gpu_seconds * 100.0 / one
            )?;
        }
        Ok(())
    }
}

impl Demo {
    /// Start the world on the current runtime.
    pub async fn start(opts: DemoOptions) -> Result<Demo, DemoError> {
        let orch_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let ports = Ports {
            orchestrator: orch_listener.local_addr()?,
            // Bound only when a pool wakes: outside the ephemeral range,
            // where no outgoing connection can take them first.
            replicas: POOLS
                .iter()
                .map(|p| (0..p.replicas).map(|_| crate::sim::ports::replica_addr()).collect())
                .collect::<Result<_, _>>()?,
        };
        let mut text = world::config(&ports, opts.idle_timeout, opts.light);
        let nats = if opts.cluster { nats::NatsServer::start() } else { Err("--no-cluster".to_owned()) };
        let cluster = match &nats {
            Ok(n) => {
                text.push_str(&format!(
                    "\n# The edges act as one network through a local NATS server.\n[cluster]\nnats = [\"{}\"]\nname = \"stoke-demo\"\n",
                    n.url
                ));
                Ok(n.url.clone())
            }
            Err(why) => Err(why.clone()),
        };
        let config = tempfile_lite::TempFile::new("stoke-demo", &text)?;
        let network = stoke_config::load(config.path())?;
        let orchestrator = Orchestrator::start_on(orch_listener, network, OrchestratorOptions::default()).await?;

        let mut edge_handles = Vec::new();
        let mut edges = Vec::new();
        for site in SITES {
            let source =
                crate::reload::ConfigSource { path: config.path().to_path_buf(), location: Some(site.id.to_owned()) };
            let edge = Edge::start_from(source).await?;
            if let Some(addr) = edge.bound.http {
                edges.push((site.id, addr));
            }
            edge_handles.push(edge);
        }
        let clock = Clock { started: Instant::now(), day: opts.day, start_hour: opts.start_hour };
        let stats = Arc::new(Stats::default());
        let world = Arc::new(World {
            routers: SITES.iter().zip(&edge_handles).map(|(s, e)| (s.id, e.router.clone())).collect(),
            cluster,
            clock,
            stats: stats.clone(),
            started: Instant::now(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let recorder = traffic::Recorder::default();
        // A file that cannot be written is said now, not after the run.
        if let Some(path) = &opts.record {
            std::fs::File::create(path)?;
        }
        if opts.traffic {
            for (site, (_, addr)) in SITES.iter().zip(&edges) {
                let rec = recorder.clone();
                tasks.push(tokio::spawn(traffic::run_site(site, *addr, clock, stats.clone(), rec, stop_rx.clone())));
            }
        }
        let listener = tokio::net::TcpListener::bind(opts.status).await?;
        let status_addr = listener.local_addr()?;
        let page_world = world.clone();
        tasks.push(tokio::spawn(serve_http(listener, stop_rx, move |req| {
            let world = page_world.clone();
            async move { Ok::<_, Infallible>(world.handle(req)) }
        })));
        Ok(Demo {
            status_url: format!("http://{status_addr}/"),
            edges,
            world,
            recorder,
            record_to: opts.record.clone(),
            config_text: text,
            stop,
            tasks,
            orchestrator,
            edge_handles,
            _config: config,
            _nats: nats.ok(),
        })
    }

    /// The generated config file every edge reads (and reloads when it changes).
    pub fn config_path(&self) -> &std::path::Path {
        self._config.path()
    }

    /// GPU-seconds of each pool so far (light sleep at its cost).
    pub fn pool_gpu_seconds(&self) -> Vec<(String, f64)> {
        self.orchestrator.pool_gpu_seconds()
    }

    /// The figures so far.
    pub fn summary(&self) -> Summary {
        let s = &self.world.stats;
        let calls = self.orchestrator.calls();
        Summary {
            ran: self.world.started.elapsed(),
            requests: s.requests.load(Ordering::Relaxed),
            ok: s.ok.load(Ordering::Relaxed),
            p50_ms: s.latency_ms(0.5),
            p99_ms: s.latency_ms(0.99),
            held: s.held.load(Ordering::Relaxed),
            held_ms: s.held_ms.load(Ordering::Relaxed),
            wakes: self.orchestrator.boots(),
            wake_calls: calls.iter().filter(|c| c.action == "wake").count(),
            sleeps: calls.iter().filter(|c| c.action == "sleep").count(),
            light_sleeps: self.orchestrator.light_sleeps_and_wakes().0,
            light_wakes: self.orchestrator.light_sleeps_and_wakes().1,
            gpu_seconds: self.orchestrator.gpu_seconds(),
            always_on_gpu_seconds: self.orchestrator.always_on_gpu_seconds(),
            fixed_gpu_seconds: None,
            one_depth_gpu_seconds: None,
        }
    }

    /// The whole network's state, as the status page reads it.
    pub fn state(&self) -> Value {
        self.world.state()
    }

    /// Stop the users, drain and stop every edge, stop the simulated
    /// fleet; returns the final figures.
    pub async fn stop(self) -> Summary {
        let _ = self.stop.send(true);
        // Let requests already sent finish (edges drain them too).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut summary = self.summary();
        let trace = self.recorded();
        if let Some(path) = &self.record_to {
            if let Err(e) = write_trace(path, &trace) {
                eprintln!("stoke demo: cannot write the trace to {}: {e}", path.display());
            }
        }
        // What a fixed 5-minute idle timeout would have cost on this very
        // traffic: the demo's own requests replayed through the same
        // decisions on a virtual clock.
        let (text, until) = (self.config_text.clone(), summary.ran.as_secs_f64());
        let policies: &[&str] = if summary.light_sleeps > 0 || self.config_text.contains("light = ") {
            &["fixed:5m", "auto"]
        } else {
            &["fixed:5m"]
        };
        let replay = tokio::task::spawn_blocking(move || replay_policies(&text, trace, until, policies)).await;
        let figures = replay.unwrap_or_default();
        summary.fixed_gpu_seconds = figures.first().copied();
        summary.one_depth_gpu_seconds = figures.get(1).copied();
        for e in self.edge_handles {
            e.shutdown().await;
        }
        for t in self.tasks {
            t.abort();
        }
        self.orchestrator.shutdown().await;
        summary
    }
}

impl Demo {
    /// The requests the users sent so far, as a trace.
    pub fn recorded(&self) -> crate::simulate::Trace {
        let requests = self.recorder.lock().map(|r| r.clone()).unwrap_or_default();
        crate::simulate::Trace { requests, source: "stoke demo".into(), format: "jsonl", assign: None }
    }

    /// The generated config every edge runs.
    pub fn config_text(&self) -> &str {
        &self.config_text
    }
}

/// Write a trace as JSON lines.
fn write_trace(path: &std::path::Path, trace: &crate::simulate::Trace) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in &trace.requests {
        crate::simulate::trace::write_line(&mut out, r)?;
    }
    out.flush()
}

/// GPU-seconds of the demo's pools under each of `policies` (`fixed:5m`:
/// every scaling pool with a fixed 5-minute idle timeout), replayed over
/// `until` seconds; empty if the replay fails.
fn replay_policies(config: &str, trace: crate::simulate::Trace, until: f64, policies: &[&str]) -> Vec<f64> {
    let opts = crate::simulate::Options {
        config,
        config_path: std::path::Path::new("demo.toml"),
        policies: policies.iter().map(|p| p.to_string()).collect(),
        replicas: crate::simulate::ReplicaModel { default_rates: world::replica_rates(), ..Default::default() },
        seed: 1,
        progress: false,
        until: Some(until),
    };
    let Ok(report) = crate::simulate::run(&opts, &trace) else { return Vec::new() };
    report.policies.iter().map(|p| p.total.gpu_seconds).collect()
}

impl World {
    fn handle(&self, req: Request<Incoming>) -> Response<HttpBody> {
        match req.uri().path() {
            "/" => {
                let mut r =
                    Response::new(Either::Left(Full::new(Bytes::from_static(crate::admin::status::PAGE.as_bytes()))));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
                r
            }
            "/state" => {
                let mut r = Response::new(Either::Left(Full::new(Bytes::from(self.state().to_string()))));
                r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
                r
            }
            _ => {
                let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(b"not found\n"))));
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            }
        }
    }

    /// The network as all edges see it together: a pool is warm if any
    /// edge has a ready replica, waking if any edge wakes it; in-flight and
    /// queues are summed over edges.
    fn state(&self) -> Value {
        let lives: Vec<_> = self.routers.iter().map(|(id, r)| (*id, r.live())).collect();
        let Some((_, first)) = lives.first() else { return json!({}) };
        let net = &first.snapshot.network;
        let mut flows = Vec::new();
        for (edge, live) in &lives {
            for v in live.pools.iter() {
                flows.push(json!({"edge": edge, "pool": &*v.state.id, "routed_total": v.state.routed()}));
            }
        }
        let pools: Vec<Value> = net
            .pools
            .iter()
            .enumerate()
            .map(|(i, pool)| {
                let views: Vec<_> = lives.iter().map(|(_, l)| l.pools[i].clone()).collect();
                let warm = views.iter().any(|v| v.is_warm());
                let waking = views.iter().any(|v| v.state.waking_since().is_some());
                let wake_error = views.iter().find_map(|v| v.state.wake_error());
                let state = match (warm, &wake_error, waking, pool.scale.is_some()) {
                    (true, ..) => "warm",
                    (false, Some(_), ..) => "wake_failed",
                    (false, None, true, _) => "waking",
                    (false, None, false, true) => "cold",
                    _ => "down",
                };
                let in_flight: u32 = views.iter().map(|v| v.state.in_flight()).sum();
                let queue: u32 = views.iter().map(|v| v.queue.len()).sum();
                let home = &views[pool.home_edge.index()];
                let ready = home.ready_count() as u32;
                let capacity = (ready * pool.max_concurrency).saturating_sub(in_flight);
                let replicas: Vec<Value> = home
                    .replicas
                    .iter()
                    .enumerate()
                    .map(|(r, rep)| {
                        let busy: u32 = views.iter().map(|v| v.replicas[r].in_flight()).sum();
                        json!({"addr": &*rep.addr_text, "ready": rep.is_ready(), "asleep": rep.is_asleep(), "in_flight": busy})
                    })
                    .collect();
                json!({
                    "id": pool.id,
                    "location": net.location(pool.location).id,
                    "state": state,
                    "wake_error": wake_error,
                    "scales": pool.scale.is_some(),
                    "services": pool.services.iter().map(|s| net.service(*s).name.as_str()).collect::<Vec<_>>(),
                    "warm_capacity": capacity,
                    "in_flight": in_flight,
                    "queue": queue,
                    "max_queue": pool.max_queue,
                    "max_concurrency": pool.max_concurrency,
                    "routed_total": views.iter().map(|v| v.state.routed()).sum::<u64>(),
                    "expected_wake_ms": home.state.expected_wake().as_millis() as u64,
                    "idle": pool.scale.as_ref().map(|scale| crate::admin::idle_json(&home.state, scale.idle_timeout)),
                    "depth": pool.scale.as_ref().map(|_| home.state.depth(warm)),
                    "light": pool
                        .scale
                        .as_ref()
                        .and_then(|s| s.light.as_ref())
                        .map(|l| crate::admin::light_json(&home.state, l)),
                    "waking_for_ms": views
                        .iter()
                        .filter_map(|v| v.state.waking_since())
                        .map(|t| t.elapsed().as_millis() as u64)
                        .max(),
                    "replicas": replicas,
                })
            })
            .collect();
        let s = &self.stats;
        let requests = s.requests.load(Ordering::Relaxed);
        let ok = s.ok.load(Ordering::Relaxed);
        let cluster = match &self.cluster {
            Ok(url) => {
                let members: Vec<_> = self.routers.iter().filter_map(|(_, r)| crate::control::cluster::of(r)).collect();
                let won: u64 = members.iter().map(|c| c.state_json()["claims"]["won"].as_u64().unwrap_or(0)).sum();
                json!({
                    "clustered": true,
                    "nats": url,
                    "edges": self.routers.len(),
                    "connected": members.iter().filter(|c| c.is_up()).count(),
                    "claims_won": won,
                })
            }
            Err(why) => json!({"clustered": false, "why": why}),
        };
        json!({
            "mode": "demo",
            "cluster": cluster,
            "edges": SITES.iter().map(|s| s.id).collect::<Vec<_>>(),
            "version": first.version,
            "clock": {"utc_hour": self.clock.utc_hour()},
            "locations": net.locations.iter().map(|l| json!({
                "id": l.id, "name": l.name, "lat": l.coord.lat, "lon": l.coord.lon, "edge": l.edge,
            })).collect::<Vec<_>>(),
            "pools": pools,
            "flows": flows,
            "summary": {
                "requests": requests,
                "ok_percent": if requests == 0 { 100.0 } else { ok as f64 * 100.0 / requests as f64 },
                "p50_ms": s.latency_ms(0.5).round(),
                "p99_ms": s.latency_ms(0.99).round(),
                "held": s.held.load(Ordering::Relaxed),
            },
        })
    }
}

/// A loopback port that was free a moment ago.
/// Run the demo until Ctrl-C (or for `duration`), print the summary.
pub async fn run(opts: DemoOptions, duration: Option<Duration>) -> Result<Summary, DemoError> {
    let stop = crate::signals::stop_signal();
    let demo = Demo::start(opts).await?;
    println!("stoke demo: ten edges, {} GPU pools, a day every {} s", POOLS.len(), demo.world.clock.day.as_secs());
    println!("  status page   {}", demo.status_url);
    println!("  config        {}", demo.config_path().display());
    match &demo.world.cluster {
        Ok(url) => println!("  cluster       {url} (one wake per pool across the edges)"),
        Err(why) => println!("  cluster       none, every edge decides alone ({why})"),
    }
    for (id, addr) in &demo.edges {
        println!("  edge {id:<4}     http://{addr}/v1/chat/completions");
    }
    println!("  try           curl -s http://{}/v1/chat/completions -d '{{\"model\":\"llama-3.1-8b\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}' -i", demo.edges.first().map(|e| e.1).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))));
    match duration {
        // Ctrl-C ends a timed run early, with its summary.
        Some(d) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = stop => {}
            }
        }
        None => {
            println!("  Ctrl-C stops it.");
            stop.await;
        }
    }
    let summary = demo.stop().await;
    println!("{summary}");
    Ok(summary)
}

/// A config file in the temp directory, removed on drop.
mod tempfile_lite {
    use std::path::{Path, PathBuf};

    pub struct TempFile {
        path: PathBuf,
    }

    impl TempFile {
        pub fn new(prefix: &str, text: &str) -> std::io::Result<Self> {
            let dir = std::env::temp_dir().join(format!("{prefix}-{}-{:08x}", std::process::id(), fastrand::u32(..)));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("stoke-demo.toml");
            std::fs::write(&path, text)?;
            Ok(TempFile { path })
        }

        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
