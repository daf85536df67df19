//! A simulated GPU orchestrator: answers the wake and sleep webhooks of the
//! pools in a config by starting and stopping simulated replicas at the
//! pools' replica addresses, and reports the calls it got.
//!
//! Endpoints: `POST /pools/{id}/wake`, `POST /pools/{id}/sleep`,
//! `GET /calls` (JSON list), `GET /pools` (which pools run).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use stoke_config::Network;
use tokio::sync::watch;

use super::replica::{Replica, ReplicaOptions, ReplicaStats};
use crate::net::server::{json as json_response, serve_http, HttpBody};

/// Settings of a simulated orchestrator.
#[derive(Clone, Debug)]
pub struct OrchestratorOptions {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Boot time of every replica; `None`: each pool's `wake_time`.
    pub boot_time: Option<Duration>,
    /// Tokens per second of the simulated replicas.
    pub tokens_per_sec: f64,
    /// Start the replicas of pools without `[pool.scale]` at once.
    pub start_always_on: bool,
    /// Answer wake calls with 500 and start nothing (fault injection).
    pub fail_wakes: bool,
    /// Accept wake calls but start nothing (a wake that never completes).
    pub ignore_wakes: bool,
    /// Answer this many sleep calls with 500 before obeying (fault injection).
    pub fail_sleeps: u32,
}

impl Default for OrchestratorOptions {
    fn default() -> Self {
        OrchestratorOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            boot_time: None,
            tokens_per_sec: 200.0,
            start_always_on: true,
            fail_wakes: false,
            ignore_wakes: false,
            fail_sleeps: 0,
        }
    }
}

/// One webhook call received.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Call {
    /// Pool id from the path.
    pub pool: String,
    /// `wake` or `sleep`.
    pub action: String,
    /// The calling edge, from the JSON body.
    pub edge: String,
    /// Why, from the JSON body.
    pub reason: String,
    /// Milliseconds since the orchestrator started.
    pub at_ms: u64,
    /// Whether an `Authorization: Bearer` header came with it.
    pub authorized: bool,
}

struct Fleet {
    opts: OrchestratorOptions,
    network: Network,
    started: Instant,
    /// Sleep calls failed so far (see [`OrchestratorOptions::fail_sleeps`]).
    sleeps_failed: std::sync::atomic::AtomicU32,
    calls: Mutex<Vec<Call>>,
    /// Pools started by a wake call (a call for a pool already running starts nothing).
    boots: std::sync::atomic::AtomicUsize,
    running: tokio::sync::Mutex<HashMap<String, Vec<Replica>>>,
    /// Replica-seconds each pool has run: finished periods, and the start
    /// of the current one.
    uptime: Mutex<HashMap<String, (Duration, Option<Instant>)>>,
    /// Replica-seconds each pool's replicas slept lightly: of stopped
    /// replicas, and the counters of the running ones.
    asleep: Mutex<HashMap<String, Asleep>>,
}

/// Light sleep of one pool's replicas: what its stopped replicas did, and
/// the counters of the running ones.
#[derive(Debug, Default)]
struct Asleep {
    /// Time stopped replicas spent in light sleep.
    done: Duration,
    /// Light sleeps and wakes of the pool before its replicas last stopped
    /// (the most any one replica had).
    sleeps: u64,
    wakes: u64,
    running: Vec<Arc<ReplicaStats>>,
}

/// A running simulated orchestrator.
pub struct Orchestrator {
    /// Where it listens.
    pub addr: SocketAddr,
    fleet: Arc<Fleet>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Orchestrator {
    /// Start serving the pools of `network`.
    pub async fn start(network: Network, opts: OrchestratorOptions) -> std::io::Result<Orchestrator> {
        let listener = tokio::net::TcpListener::bind(opts.listen).await?;
        Self::start_on(listener, network, opts).await
    }

    /// Start on a listener already bound (its address can then appear in
    /// the config that `network` was loaded from).
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        network: Network,
        opts: OrchestratorOptions,
    ) -> std::io::Result<Orchestrator> {
        let addr = listener.local_addr()?;
        let fleet = Arc::new(Fleet {
            opts,
            network,
            started: Instant::now(),
            sleeps_failed: std::sync::atomic::AtomicU32::new(0),
            calls: Mutex::new(Vec::new()),
            boots: std::sync::atomic::AtomicUsize::new(0),
            running: tokio::sync::Mutex::new(HashMap::new()),
            uptime: Mutex::new(HashMap::new()),
            asleep: Mutex::new(HashMap::new()),
        });
        if fleet.opts.start_always_on {
            let ids: Vec<String> =
                fleet.network.pools.iter().filter(|p| p.scale.is_none()).map(|p| p.id.clone()).collect();
            for id in ids {
                fleet.start_pool(&id, Duration::ZERO).await?;
            }
        }
        let (shutdown, rx) = watch::channel(false);
        let handler = fleet.clone();
        let task = tokio::spawn(serve_http(listener, rx, move |req| {
            let fleet = handler.clone();
            async move { Ok::<_, Infallible>(fleet.handle(req).await) }
        }));
        Ok(Orchestrator { addr, fleet, shutdown, task })
    }

    /// Every call received so far.
    pub fn calls(&self) -> Vec<Call> {
        self.fleet.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Times a pool that scales was started by a wake call.
    pub fn boots(&self) -> usize {
        self.fleet.boots.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The calls for one pool and action.
    pub fn calls_for(&self, pool: &str, action: &str) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.pool == pool && c.action == action).collect()
    }

    /// Whether the replicas of `pool` run.
    pub async fn is_running(&self, pool: &str) -> bool {
        self.fleet.running.lock().await.contains_key(pool)
    }

    /// GPU-seconds used so far: for every pool, replicas × time running,
    /// where time in light sleep counts at the pool's `light_cost`.
    pub fn gpu_seconds(&self) -> f64 {
        self.pool_gpu_seconds().iter().map(|(_, s)| s).sum()
    }

    /// [`gpu_seconds`](Self::gpu_seconds) of each pool.
    pub fn pool_gpu_seconds(&self) -> Vec<(String, f64)> {
        let up = self.fleet.uptime.lock().map(|u| u.clone()).unwrap_or_default();
        self.fleet
            .network
            .pools
            .iter()
            .map(|p| {
                let (done, since) = up.get(&p.id).copied().unwrap_or_default();
                let t = done + since.map_or(Duration::ZERO, |s| s.elapsed());
                let cost = p.scale.as_ref().and_then(|s| s.light.as_ref()).map_or(1.0, |l| l.cost);
                (p.id.clone(), t.as_secs_f64() * p.replicas.len() as f64 - self.light_seconds(&p.id) * (1.0 - cost))
            })
            .collect()
    }

    /// Replica-seconds `pool`'s replicas have slept lightly so far.
    pub fn light_seconds(&self, pool: &str) -> f64 {
        let asleep = self.fleet.asleep.lock().unwrap_or_else(|e| e.into_inner());
        asleep
            .get(pool)
            .map_or(0.0, |a| (a.done + a.running.iter().map(|s| s.asleep_for()).sum::<Duration>()).as_secs_f64())
    }

    /// Light sleeps and wakes of every pool so far (a pool's replicas sleep
    /// and wake together: counted once per pool).
    pub fn light_sleeps_and_wakes(&self) -> (u64, u64) {
        let asleep = self.fleet.asleep.lock().unwrap_or_else(|e| e.into_inner());
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        asleep.values().fold((0, 0), |(s, w), a| {
            let now_s = a.running.iter().map(|r| load(&r.sleeps)).max().unwrap_or(0);
            let now_w = a.running.iter().map(|r| load(&r.wakes)).max().unwrap_or(0);
            (s + a.sleeps + now_s, w + a.wakes + now_w)
        })
    }

    /// GPU-seconds an always-on fleet would have used since the start.
    pub fn always_on_gpu_seconds(&self) -> f64 {
        let replicas: usize = self.fleet.network.pools.iter().map(|p| p.replicas.len()).sum();
        self.fleet.started.elapsed().as_secs_f64() * replicas as f64
    }

    /// Completion requests the running replicas of `pool` received.
    pub async fn requests_received(&self, pool: &str) -> u64 {
        self.fleet
            .running
            .lock()
            .await
            .get(pool)
            .map_or(0, |reps| reps.iter().map(|r| r.stats.requests.load(std::sync::atomic::Ordering::Relaxed)).sum())
    }

    /// Start a pool's replicas now (as if woken by someone else).
    pub async fn start_pool(&self, pool: &str) -> std::io::Result<()> {
        self.fleet.start_pool(pool, Duration::ZERO).await
    }

    /// Stop a pool's replicas now.
    pub async fn stop_pool(&self, pool: &str) {
        self.fleet.stop_pool(pool).await;
    }

    /// Stop everything.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
        let pools: Vec<String> = self.fleet.running.lock().await.keys().cloned().collect();
        for p in pools {
            self.fleet.stop_pool(&p).await;
        }
    }
}

impl Fleet {
    async fn start_pool(&self, id: &str, boot: Duration) -> std::io::Result<()> {
        let mut running = self.running.lock().await;
        if running.contains_key(id) {
            return Ok(());
        }
        if self.network.pools.iter().any(|p| p.id == id && p.scale.is_some()) {
            self.boots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(pool) = self.network.pools.iter().find(|p| p.id == id) else {
            return Ok(());
        };
        let models: Vec<String> = pool.services.iter().map(|s| self.network.service(*s).name.clone()).collect();
        let mut replicas = Vec::with_capacity(pool.replicas.len());
        for (i, addr) in pool.replicas.iter().enumerate() {
            let opts = ReplicaOptions {
                listen: *addr,
                name: format!("{id}-{}", i + 1),
                boot_time: boot,
                max_concurrency: pool.max_concurrency as usize,
                tokens_per_sec: self.opts.tokens_per_sec,
                models: models.clone(),
                // A light wake takes what the config expects of it.
                light_wake_time: pool
                    .scale
                    .as_ref()
                    .and_then(|s| s.light.as_ref())
                    .map_or(ReplicaOptions::default().light_wake_time, |l| l.wake_time),
                ..ReplicaOptions::default()
            };
            replicas.push(Replica::start(opts).await?);
        }
        if let Ok(mut up) = self.uptime.lock() {
            up.entry(id.to_owned()).or_default().1 = Some(Instant::now());
        }
        if let Ok(mut asleep) = self.asleep.lock() {
            asleep.entry(id.to_owned()).or_default().running = replicas.iter().map(|r| r.stats.clone()).collect();
        }
        running.insert(id.to_owned(), replicas);
        Ok(())
    }

    /// Stop a pool's replicas; it shows as running until they are gone
    /// with all their connections.
    async fn stop_pool(&self, id: &str) {
        let mut running = self.running.lock().await;
        let replicas = running.remove(id);
        if replicas.is_some() {
            if let Ok(mut up) = self.uptime.lock() {
                let e = up.entry(id.to_owned()).or_default();
                if let Some(since) = e.1.take() {
                    e.0 += since.elapsed();
                }
            }
            if let Ok(mut asleep) = self.asleep.lock() {
                let a = asleep.entry(id.to_owned()).or_default();
                let load = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
                a.sleeps += a.running.iter().map(|r| load(&r.sleeps)).max().unwrap_or(0);
                a.wakes += a.running.iter().map(|r| load(&r.wakes)).max().unwrap_or(0);
                a.done += a.running.drain(..).map(|s| s.asleep_for()).sum::<Duration>();
            }
        }
        for r in replicas.into_iter().flatten() {
            r.kill().await;
        }
        drop(running);
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<HttpBody> {
        let path = req.uri().path().to_owned();
        match (req.method().clone(), path.split('/').collect::<Vec<_>>().as_slice()) {
            (Method::GET, ["", "calls"]) => {
                let calls = self.calls.lock().map(|c| c.clone()).unwrap_or_default();
                json_response(StatusCode::OK, &serde_json::to_value(calls).unwrap_or_default())
            }
            (Method::GET, ["", "pools"]) => {
                let running: Vec<String> = self.running.lock().await.keys().cloned().collect();
                json_response(StatusCode::OK, &json!({"running": running}))
            }
            (Method::POST, ["", "pools", id, action @ ("wake" | "sleep")]) => {
                let (id, action) = (id.to_string(), action.to_string());
                let authorized = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("Bearer "));
                let body =
                    Limited::new(req.into_body(), 64 * 1024).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
                if let Ok(mut calls) = self.calls.lock() {
                    calls.push(Call {
                        pool: id.clone(),
                        action: action.clone(),
                        edge: field("edge"),
                        reason: field("reason"),
                        at_ms: self.started.elapsed().as_millis() as u64,
                        authorized,
                    });
                }
                let Some(pool) = self.network.pools.iter().find(|p| p.id == id) else {
                    return json_response(StatusCode::NOT_FOUND, &json!({"error": format!("no pool {id}")}));
                };
                if action == "sleep" {
                    let failed = self.sleeps_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if failed < self.opts.fail_sleeps {
                        return json_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &json!({"error": "sleep failed (simulated)"}),
                        );
                    }
                    self.stop_pool(&id).await;
                    return json_response(StatusCode::OK, &json!({"pool": id, "status": "stopped"}));
                }
                if self.opts.fail_wakes {
                    return json_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &json!({"error": "wake failed (simulated)"}),
                    );
                }
                if self.opts.ignore_wakes {
                    return json_response(StatusCode::ACCEPTED, &json!({"pool": id, "status": "accepted"}));
                }
                let boot =
                    self.opts.boot_time.unwrap_or_else(|| pool.scale.as_ref().map_or(Duration::ZERO, |s| s.wake_time));
                match self.start_pool(&id, boot).await {
                    Ok(()) => json_response(StatusCode::ACCEPTED, &json!({"pool": id, "status": "starting"})),
                    Err(e) => json_response(StatusCode::INTERNAL_SERVER_ERROR, &json!({"error": e.to_string()})),
                }
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
        }
    }
}
