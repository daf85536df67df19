//! The admin API, on its own listener (loopback by default):
//!
//! | call | does |
//! | --- | --- |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 once serving, 503 while draining |
//! | `GET /state` | JSON: snapshot version, config, last reload, locations, pools, replicas |
//! | `GET /metrics` | Prometheus text |
//! | `POST /reload` | reload the config file; 200, or 422 with every problem |
//! | `POST /pools/{id}/ready` | an orchestrator says the pool is up: probe it now |
//! | `GET /rollout` | the cluster's config rollout and every edge's version (as `stoke push --status`) |
//! | `POST /rollout?canary=A,B&bake=60s&note=…` | roll the body (a whole config file) out to the cluster, as `stoke push` |
//!
//! Mutating calls need `Authorization: Bearer <token>` when a token is
//! configured; the token is compared in constant time.

pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock;
use crate::metrics as m;
use crate::net::server::{json as json_response, serve_http, text, HttpBody};
use crate::proxy::idle::IdlePool;
use crate::reload::Reloader;
use crate::state::{Live, Router};

/// Why the admin listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Reachable from other hosts with no token: refused.
    #[error(
        "the admin listener {0} is not on loopback and no token is configured: set [edge].admin_token_env to a variable holding a token, or listen on 127.0.0.1"
    )]
    Unprotected(SocketAddr),
    /// `admin_token_env` names a variable that is unset or empty.
    #[error("[edge].admin_token_env names {0}, which is not set (or empty) in the environment")]
    MissingToken(String),
    /// The address cannot be bound.
    #[error("cannot listen on {addr} (admin): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What the admin API serves from.
pub struct Admin {
    router: Arc<Router>,
    reloader: Option<Arc<Reloader>>,
    token: Option<String>,
    metrics: PrometheusHandle,
    ready: Arc<AtomicBool>,
    started: Instant,
    page: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// The engine's idle replica connections, counted in `/state`.
    idle: Option<Arc<IdlePool>>,
    /// This process's generation and the previous one's drain, in `/state`.
    process: Option<Arc<crate::upgrade::Process>>,
}

impl Admin {
    /// The admin API of an edge. `ready` turns true once the edge serves
    /// and false when it drains.
    pub fn new(
        router: Arc<Router>,
        reloader: Option<Arc<Reloader>>,
        token_env: Option<&str>,
        addr: SocketAddr,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, AdminError> {
        let token = match token_env {
            Some(var) => match std::env::var(var) {
                Ok(t) if !t.is_empty() => Some(t),
                _ => return Err(AdminError::MissingToken(var.to_owned())),
            },
            None => None,
        };
        if token.is_none() && !addr.ip().is_loopback() {
            return Err(AdminError::Unprotected(addr));
        }
        Ok(Admin {
            router,
            reloader,
            token,
            metrics: m::install(),
            ready,
            started: Instant::now(),
            page: None,
            idle: None,
            process: None,
        })
    }

    /// Serve `GET /` with this page (the status page).
    pub fn with_page(mut self, page: Arc<dyn Fn() -> String + Send + Sync>) -> Self {
        self.page = Some(page);
        self
    }

    /// Count these idle replica connections in `/state`.
    pub fn with_idle(mut self, idle: Arc<IdlePool>) -> Self {
        self.idle = Some(idle);
        self
    }

    /// Show this process's generation and its predecessor's drain in `/state`.
    pub fn with_process(mut self, process: Arc<crate::upgrade::Process>) -> Self {
        self.process = Some(process);
        self
    }

    /// Bind and serve until `shutdown`; returns the bound address.
    pub async fn spawn(
        self,
        addr: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
        let listener = TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })?;
        self.spawn_on(listener, shutdown)
    }

    /// Serve on `listener` (bound by the caller, or handed over by the
    /// process this one upgrades) until `shutdown`; returns its address.
    pub fn spawn_on(
        self,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), AdminError> {
        let bound = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
        let admin = Arc::new(self);
        let task = tokio::spawn(serve_http(listener, shutdown, move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(req).await) }
        }));
        tracing::info!(listener = "admin", addr = %bound, "listening");
        Ok((bound, task))
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<HttpBody> {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.split('/').collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["", "healthz"]) => text(StatusCode::OK, "ok\n"),
            (&Method::GET, ["", "readyz"]) => {
                if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET, ["", "state"]) => json_response(StatusCode::OK, &self.state()),
            (&Method::GET, ["", "metrics"]) => {
                update_gauges(&self.router.live());
                let mut r = text(StatusCode::OK, &self.metrics.render());
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
                r
            }
            (&Method::GET, ["", ""]) => match &self.page {
                Some(page) => {
                    let mut r = text(StatusCode::OK, &page());
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
                    r
                }
                None => text(StatusCode::NOT_FOUND, "no status page\n"),
            },
            (&Method::POST, ["", "reload"]) => {
                if let Some(denied) = self.authorize(&req) {
                    return denied;
                }
                match &self.reloader {
                    Some(r) => {
                        let outcome = r.reload("admin").await;
                        let status =
                            if outcome.result == "ok" { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
                        json_response(status, &serde_json::to_value(outcome).unwrap_or_default())
                    }
                    None => error(StatusCode::CONFLICT, "this edge was not started from a config file"),
                }
            }
            (&Method::POST, ["", "pools", id, "ready"]) => {
                if let Some(denied) = self.authorize(&req) {
                    return denied;
                }
                let live = self.router.live();
                let Some(pid) = live.snapshot.network.pool_id(id) else {
                    return error(StatusCode::NOT_FOUND, &format!("no pool \"{id}\""));
                };
                let view = live.pool(pid).clone();
                let check = live.snapshot.network.pool(pid).health.clone();
                let id = id.to_string();
                // Probe now rather than trust the push blindly: a replica
                // that does not answer yet is not sent traffic.
                tokio::spawn(async move { crate::control::wake::probe_pool(&view, &check, &id).await });
                json_response(StatusCode::ACCEPTED, &json!({"pool": segments[2], "probing": true}))
            }
            (&Method::GET, ["", "rollout"]) => match crate::control::cluster::of(&self.router) {
                Some(c) => {
                    match async { crate::control::cluster::rollout::status(&c.config_store().await?).await }.await {
                        Ok(v) => json_response(StatusCode::OK, &v),
                        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e),
                    }
                }
                None => error(StatusCode::CONFLICT, "this edge has no [cluster]: there is no rollout"),
            },
            (&Method::POST, ["", "rollout"]) => {
                if let Some(denied) = self.authorize(&req) {
                    return denied;
                }
                self.push(req).await
            }
            (_, ["", "healthz" | "readyz" | "state" | "metrics" | "reload" | "rollout"])
            | (_, ["", "pools", _, "ready"]) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// `POST /rollout`: check the body as a config file (relative paths
    /// beside this edge's file) and publish it to the cluster.
    async fn push(&self, req: Request<Incoming>) -> Response<HttpBody> {
        use http_body_util::BodyExt;
        let Some(cluster) = crate::control::cluster::of(&self.router) else {
            return error(StatusCode::CONFLICT, "this edge has no [cluster]: there is nothing to roll out to");
        };
        let Some(reloader) = &self.reloader else {
            return error(StatusCode::CONFLICT, "this edge was not started from a config file");
        };
        let query = query_pairs(req.uri().query().unwrap_or(""));
        let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let canary: Vec<String> = get("canary")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let bake = match get("bake").map(stoke_config::duration::parse_duration) {
            None => std::time::Duration::from_secs(60),
            Some(Some(d)) => d,
            Some(None) => return error(StatusCode::BAD_REQUEST, "bake is not a duration (e.g. 60s)"),
        };
        let body = match http_body_util::Limited::new(req.into_body(), MAX_PUSHED_FILE).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, &format!("cannot read the file: {e}")),
        };
        let Ok(text) = String::from_utf8(body.to_vec()) else {
            return error(StatusCode::BAD_REQUEST, "the file is not UTF-8");
        };
        let network = match stoke_config::load_str(&text, reloader.path()) {
            Ok(n) => n,
            Err(e) => return json_response(StatusCode::UNPROCESSABLE_ENTITY, &json!({"errors": e.lines()})),
        };
        if let Some(c) = canary.iter().find(|c| network.location_id(c).is_none()) {
            return error(StatusCode::UNPROCESSABLE_ENTITY, &format!("canary \"{c}\" is not a location of the file"));
        }
        let push = crate::control::cluster::rollout::Push {
            text,
            hash: network.source.hash.clone(),
            canary,
            bake,
            note: get("note").unwrap_or("").to_owned(),
            author: format!("admin API of {}", self.router.live().snapshot.edge_location().id),
        };
        let published = async { crate::control::cluster::rollout::publish(&cluster.config_store().await?, push).await };
        match published.await {
            Ok(r) => json_response(StatusCode::ACCEPTED, &json!({ "rollout": r })),
            Err(e) => error(StatusCode::CONFLICT, &e),
        }
    }

    /// `None` if allowed; else the 401 to send.
    fn authorize(&self, req: &Request<Incoming>) -> Option<Response<HttpBody>> {
        let Some(token) = &self.token else { return None };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            None
        } else {
            let mut r = error(StatusCode::UNAUTHORIZED, "this call needs Authorization: Bearer <admin token>");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            Some(r)
        }
    }

    fn state(&self) -> Value {
        let live = self.router.live();
        let mut v = state_json(&live, self.router.bodies.held(), self.idle.as_deref());
        v["uptime_s"] = json!(self.started.elapsed().as_secs());
        v["cluster"] = crate::control::cluster::of(&self.router).map_or(Value::Null, |c| c.state_json());
        v["process"] = self.process.as_ref().map_or(Value::Null, |p| p.state_json());
        v["rollout"] = crate::control::cluster::of(&self.router).map_or(Value::Null, |c| c.follower().state_json());
        if let Some(r) = &self.reloader {
            v["last_reload"] = serde_json::to_value(r.last()).unwrap_or_default();
            let (source, version) = match r.origin() {
                crate::reload::Origin::File => ("file", Value::Null),
                crate::reload::Origin::Cluster { version, .. } => ("cluster", json!(version)),
            };
            v["config"]["source"] = json!(source);
            v["config"]["cluster_version"] = version;
        }
        v
    }
}

/// A scaling pool's idle window: the rule, the window in force and, for
/// `"auto"`, why it was chosen.
pub fn idle_json(st: &crate::state::PoolState, rule: stoke_config::IdleTimeout) -> Value {
    match rule {
        stoke_config::IdleTimeout::Fixed(d) => json!({"rule": "fixed", "window_ms": d.as_millis() as u64}),
        stoke_config::IdleTimeout::Auto { min, max } => {
            let w = st.auto_window();
            json!({
                "rule": "auto",
                "window_ms": w.map(|w| w.idle.as_millis() as u64),
                "reason": w.map(|w| w.reason.as_str()),
                "wake_cost_ms": w.map(|w| w.wake_cost.as_millis() as u64),
                "gaps": w.map(|w| (w.gaps * 10.0).round() / 10.0),
                "min_ms": min.as_millis() as u64,
                "max_ms": max.as_millis() as u64,
                "next_busy_in_ms": st.next_busy().map(|t| t.saturating_duration_since(clock::now()).as_millis() as u64),
            })
        }
    }
}

/// A pool's light depth for `/state`: its window and why, its learned
/// wake time and its cost.
pub fn light_json(st: &crate::state::PoolState, light: &stoke_config::LightSleep) -> Value {
    let mut v = match light.idle_timeout {
        stoke_config::IdleTimeout::Fixed(d) => json!({"rule": "fixed", "window_ms": d.as_millis() as u64}),
        stoke_config::IdleTimeout::Auto { .. } => {
            let w = st.auto_light_window();
            json!({
                "rule": "auto",
                "window_ms": w.map(|w| w.idle.as_millis() as u64),
                "reason": w.map(|w| w.reason.as_str()),
                "wake_cost_ms": w.map(|w| w.wake_cost.as_millis() as u64),
            })
        }
    };
    v["expected_wake_ms"] = json!(st.expected_light_wake().as_millis() as u64);
    v["cost"] = json!(light.cost);
    v
}

/// Where a pool's RTT comes from and what was measured: `given` by
/// `[[rtt]]`, `measured` by health probes, else `estimated` from distance.
fn rtt_json(live: &Live, pool: stoke_config::PoolId) -> Value {
    let net = &live.snapshot.network;
    let (from, to) = (live.snapshot.location.index(), net.pool(pool).location.index());
    let measured = live.pool(pool).state.measured_rtt();
    let source = if net.rtt.is_given(from, to) {
        "given"
    } else if measured.is_some() && net.edge.measure_rtt {
        "measured"
    } else {
        "estimated"
    };
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    json!({
        "source": source,
        "estimate_ms": net.rtt.get(from, to).as_secs_f64() * 1000.0,
        "measured_ms": measured.map(|m| ms(m.smoothed)),
        "last_connect_ms": measured.map(|m| ms(m.last_connect)),
        "last_first_byte_ms": measured.map(|m| ms(m.last_first_byte)),
        "samples": measured.map_or(0, |m| m.samples),
    })
}

/// The `/state` document of one edge.
pub fn state_json(live: &Live, buffered_body_bytes: u64, idle: Option<&IdlePool>) -> Value {
    let net = &live.snapshot.network;
    let now = clock::now();
    let pools: Vec<Value> = net
        .pools
        .iter()
        .zip(live.pools.iter())
        .enumerate()
        .map(|(i, (pool, view))| {
            let st = &view.state;
            let condition = st.condition(view.is_warm(), pool.scale.is_some());
            json!({
                "id": pool.id,
                "location": net.location(pool.location).id,
                "home_edge": net.location(pool.home_edge).id,
                "services": pool.services.iter().map(|s| net.service(*s).name.as_str()).collect::<Vec<_>>(),
                "state": condition,
                "scales": pool.scale.is_some(),
                "warm_capacity": view.free_slots(),
                "in_flight": st.in_flight(),
                "queue": view.queue.len(),
                "elsewhere": {
                    "in_flight": st.elsewhere().in_flight,
                    "held": st.elsewhere().held,
                    "routed_away": st.elsewhere().routed_away,
                },
                "max_queue": pool.max_queue,
                "max_concurrency": pool.max_concurrency,
                "routed_total": st.routed(),
                "expected_wake_ms": st.expected_wake().as_millis() as u64,
                "wake_error": st.wake_error(),
                "waking_for_ms": st.waking_since().map(|t| now.saturating_duration_since(t).as_millis() as u64),
                "idle_for_ms": now.saturating_duration_since(st.last_active()).as_millis() as u64,
                "idle": pool.scale.as_ref().map(|scale| idle_json(st, scale.idle_timeout)),
                "depth": pool.scale.as_ref().map(|_| st.depth(view.is_warm())),
                "light": pool.scale.as_ref().and_then(|s| s.light.as_ref()).map(|l| light_json(st, l)),
                "rtt_ms": live.rtt_us(stoke_config::PoolId(i as u32)) as f64 / 1000.0,
                "rtt": rtt_json(live, stoke_config::PoolId(i as u32)),
                "replicas": view.replicas.iter().map(|r| json!({
                    "addr": &*r.addr_text,
                    "ready": r.is_ready(),
                    "asleep": r.is_asleep(),
                    "in_flight": r.in_flight(),
                    "foreign_load": r.foreign_load(),
                    "in_flight_elsewhere": r.elsewhere(),
                    "idle_connections": idle.map(|i| i.len_for(r.addr)),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let edge = &live.snapshot.edge_location().id;
    let flows: Vec<Value> = live
        .pools
        .iter()
        .map(|v| json!({"edge": edge, "pool": &*v.state.id, "routed_total": v.state.routed()}))
        .collect();
    json!({
        "mode": "edge",
        "edge": edge,
        "edges": [edge],
        "flows": flows,
        "version": live.version,
        "buffered_body_bytes": buffered_body_bytes,
        "config": {"path": net.source.path.display().to_string(), "hash": net.source.hash},
        "locations": net.locations.iter().map(|l| json!({
            "id": l.id, "name": l.name, "lat": l.coord.lat, "lon": l.coord.lon, "edge": l.edge,
        })).collect::<Vec<_>>(),
        "pools": pools,
        "routes": net.routes.iter().map(|r| json!({
            "name": r.name,
            "host": r.host.to_string(),
            "path_prefix": r.path_prefix,
            "service": match &r.service {
                stoke_config::ServiceSource::Fixed(s) => net.service(*s).name.clone(),
                stoke_config::ServiceSource::BodyField(f) => format!("body:{f}"),
                stoke_config::ServiceSource::Header(h) => format!("header:{h}"),
            },
        })).collect::<Vec<_>>(),
    })
}

/// Set the pool gauges from the live state (called when metrics are read).
pub fn update_gauges(live: &Live) {
    for view in live.pools.iter() {
        let id = &view.label;
        metrics::gauge!(m::POOL_WARM_CAPACITY, "pool" => id.clone()).set(f64::from(view.free_slots()));
        metrics::gauge!(m::POOL_IN_FLIGHT, "pool" => id.clone()).set(f64::from(view.state.in_flight()));
        metrics::gauge!(m::POOL_QUEUE_DEPTH, "pool" => id.clone()).set(f64::from(view.queue.len()));
    }
}

/// Compare without an early exit, so that timing does not tell how much of
/// a guessed token was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The largest config file `POST /rollout` takes.
const MAX_PUSHED_FILE: usize = 4 << 20;

/// `a=1&b=x%20y` as pairs, `+` and `%XX` decoded.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn error(status: StatusCode, message: &str) -> Response<HttpBody> {
    json_response(status, &json!({"error": message}))
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_pairs_are_decoded() {
        let q = super::query_pairs("canary=fra,par&bake=2s&note=every+pool%20moved&x&bad=%zz%4");
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("canary"), Some("fra,par"));
        assert_eq!(get("note"), Some("every pool moved"));
        assert_eq!(get("x"), Some(""));
        assert_eq!(get("bad"), Some("%zz%4"));
    }

    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn state_shows_the_idle_window_and_why() {
        let text = crate::testing::two_pools_text(
            1,
            "idle_timeout = \"auto\"\nmin_idle = \"5s\"\nmax_idle = \"10m\"\nwake_time = \"20s\"",
        )
        .replace("max_concurrency = 1\n", "max_concurrency = 1\nload = {}\n");
        let router = crate::state::Router::new(crate::testing::snapshot(&text));
        let live = router.live();
        let pool = |v: &Value| v["pools"].as_array().and_then(|p| p.first()).cloned().expect("a pool");
        let before = pool(&state_json(&live, 0, None));
        assert_eq!(before["idle"]["rule"], "auto");
        assert!(before["idle"]["window_ms"].is_null(), "not chosen before the sleeper looks: {before}");
        // The home edge's sleeper looks: with no gaps seen, the break-even
        // window, a wake's cost (its 20 s boot, and as much for the wait).
        let _ = crate::control::sleep::due(&live, clock::now());
        let after = pool(&state_json(&live, 0, None));
        assert_eq!(after["idle"]["window_ms"], 40_000, "{after}");
        assert_eq!(after["idle"]["reason"], "break_even");
        assert_eq!((after["idle"]["min_ms"].as_u64(), after["idle"]["max_ms"].as_u64()), (Some(5_000), Some(600_000)));
    }
}
