//! A simulated GPU replica: a real HTTP server with an OpenAI-compatible
//! API, a boot time, a concurrency limit with a waiting queue, a token rate
//! and vLLM-style metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};

use crate::net::server::{json as json_response, serve_http_counted, text, HttpBody};

/// Settings of a simulated replica.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Name, sent in the `x-sim-replica` response header.
    pub name: String,
    /// Time from start until `/health` answers 200.
    pub boot_time: Duration,
    /// Requests generated at once; more wait in a queue.
    pub max_concurrency: usize,
    /// Tokens generated per second per request.
    pub tokens_per_sec: f64,
    /// Models listed by `/v1/models` (any model name is served).
    pub models: Vec<String>,
    /// Prompt tokens prefilled per second (only those not in the prefix
    /// cache); 0: prefill takes no time.
    pub prefill_tokens_per_sec: f64,
    /// Capacity of the prefix cache, in tokens.
    pub cache_tokens: usize,
    /// Time `POST /wake_up` takes to bring the weights back from a level 1
    /// sleep (vLLM's sleep mode: 0.1–6 s by model size).
    pub light_wake_time: Duration,
    /// Time `POST /collective_rpc` with `reload_weights` takes after a
    /// level 2 sleep (the weights come from disk).
    pub reload_time: Duration,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            name: "sim".to_owned(),
            boot_time: Duration::ZERO,
            max_concurrency: 16,
            tokens_per_sec: 200.0,
            models: vec!["llama-3.1-8b".to_owned()],
            prefill_tokens_per_sec: 0.0,
            cache_tokens: super::cache::DEFAULT_CACHE_TOKENS,
            light_wake_time: Duration::from_millis(500),
            reload_time: Duration::from_secs(2),
        }
    }
}

/// Header naming the replica on every response.
pub const REPLICA_HEADER: &str = "x-sim-replica";

/// Default `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: u64 = 16;
/// Largest `max_tokens` honoured.
pub const MAX_TOKENS_CAP: u64 = 4096;
/// Largest request body accepted.
pub const MAX_BODY: usize = 16 << 20;

/// Counters of a running replica.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Completion requests received (counted when they arrive).
    pub requests: AtomicU64,
    /// Requests generating now.
    pub running: AtomicU32,
    /// Requests waiting for a slot.
    pub waiting: AtomicU32,
    /// Most requests running and waiting at once, ever: above the
    /// concurrency limit, some edge sent more than the replica takes.
    pub peak_busy: AtomicU32,
    /// Streams whose client went away before the end.
    pub aborted: AtomicU64,
    /// When `/health` first answered 200 after the replica was last made
    /// sick (or started): the moment a prober can first see it ready.
    pub healthy_since: std::sync::Mutex<Option<Instant>>,
    /// When the last completion request arrived.
    pub last_request_at: std::sync::Mutex<Option<Instant>>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicU64>,
    /// Prompt tokens looked up in the prefix cache.
    pub cache_queries: AtomicU64,
    /// Of those, tokens found cached.
    pub cache_hits: AtomicU64,
    /// `POST /sleep` calls that put the replica to sleep.
    pub sleeps: AtomicU64,
    /// `POST /wake_up` calls that woke it.
    pub wakes: AtomicU64,
    /// Milliseconds spent asleep, up to the last wake (see
    /// [`ReplicaStats::asleep_for`]).
    pub asleep_ms: AtomicU64,
    /// When the current sleep began, if the replica sleeps.
    pub asleep_since: std::sync::Mutex<Option<Instant>>,
}

impl ReplicaStats {
    /// Time spent asleep so far, the current sleep included.
    pub fn asleep_for(&self) -> Duration {
        let past = Duration::from_millis(self.asleep_ms.load(Ordering::Relaxed));
        let now = self.asleep_since.lock().ok().and_then(|s| *s).map_or(Duration::ZERO, |t| t.elapsed());
        past + now
    }
}

struct Sim {
    opts: ReplicaOptions,
    started: Instant,
    slots: Arc<Semaphore>,
    stats: Arc<ReplicaStats>,
    /// Test hook: while set, `/health` fails even after boot.
    sick: AtomicBool,
    /// Last request body seen (for tests that check bodies arrive intact).
    last_body: std::sync::Mutex<Bytes>,
    /// Blocks of recent prompts (vLLM's automatic prefix caching).
    cache: super::cache::PrefixCache,
    /// vLLM's sleep mode.
    sleep: std::sync::Mutex<SleepMode>,
}

/// Where a replica is in vLLM's sleep mode.
#[derive(Debug, Default)]
struct SleepMode {
    /// The level it was put to sleep at; 0 awake.
    level: u8,
    /// Whether the weights are in GPU memory (a level 2 sleep also needs
    /// them reloaded).
    weights: bool,
    /// Whether the KV cache is.
    kv_cache: bool,
    /// Whether a level 2 sleep's weights were reloaded.
    reloaded: bool,
}

impl SleepMode {
    fn awake() -> Self {
        SleepMode { level: 0, weights: true, kv_cache: true, reloaded: true }
    }

    fn is_sleeping(&self) -> bool {
        !(self.weights && self.kv_cache && self.reloaded)
    }
}

/// A running simulated replica.
pub struct Replica {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub stats: Arc<ReplicaStats>,
    sim: Arc<Sim>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Bind and serve on the current runtime.
    pub async fn start(opts: ReplicaOptions) -> std::io::Result<Replica> {
        let listener = tokio::net::TcpListener::bind(opts.listen).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ReplicaStats::default());
        let sim = Arc::new(Sim {
            cache: super::cache::PrefixCache::new(opts.cache_tokens),
            slots: Arc::new(Semaphore::new(opts.max_concurrency.max(1))),
            opts,
            started: Instant::now(),
            stats: stats.clone(),
            sick: AtomicBool::new(false),
            last_body: std::sync::Mutex::new(Bytes::new()),
            sleep: std::sync::Mutex::new(SleepMode::awake()),
        });
        let (shutdown, rx) = watch::channel(false);
        let handler = sim.clone();
        let counter = stats.connections.clone();
        let task = tokio::spawn(serve_http_counted(
            listener,
            rx,
            move |req| {
                let sim = handler.clone();
                async move { Ok::<_, Infallible>(sim.handle(req).await) }
            },
            Some(counter),
        ));
        Ok(Replica { addr, stats, sim, shutdown, task })
    }

    /// Make `/health` fail (true) or follow the boot time again (false).
    pub fn set_sick(&self, sick: bool) {
        if sick {
            if let Ok(mut h) = self.stats.healthy_since.lock() {
                *h = None;
            }
        }
        self.sim.sick.store(sick, Ordering::Relaxed);
    }

    /// Whether the replica sleeps (vLLM's `/is_sleeping`).
    pub fn is_sleeping(&self) -> bool {
        self.sim.sleep.lock().map(|s| s.is_sleeping()).unwrap_or(false)
    }

    /// The body of the last completion request.
    pub fn last_body(&self) -> Bytes {
        self.sim.last_body.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Stop listening and drop every connection at once (as a crashed
    /// process would); returns once all are closed.
    pub async fn kill(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

impl Sim {
    fn booted(&self) -> bool {
        self.started.elapsed() >= self.opts.boot_time
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<HttpBody> {
        let mut resp = match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") => {
                if self.booted() && !self.sick.load(Ordering::Relaxed) {
                    if let Ok(mut h) = self.stats.healthy_since.lock() {
                        h.get_or_insert_with(Instant::now);
                    }
                    text(StatusCode::OK, "ok")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "booting")
                }
            }
            (&Method::GET, "/metrics") => self.metrics(),
            (&Method::GET, "/v1/models") => self.models(),
            (&Method::POST, "/sleep") => self.sleep(req.uri().query()),
            (&Method::POST, "/wake_up") => self.wake_up(req.uri().query()).await,
            (&Method::GET, "/is_sleeping") => {
                let sleeping = self.sleep.lock().map(|s| s.is_sleeping()).unwrap_or(false);
                json_response(StatusCode::OK, &json!({"is_sleeping": sleeping}))
            }
            (&Method::POST, "/collective_rpc") => self.collective_rpc(req).await,
            (_, "/sleep" | "/wake_up" | "/collective_rpc") | (_, "/is_sleeping") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            (&Method::POST, "/v1/chat/completions") => self.completion(req, true).await,
            (&Method::POST, "/v1/completions") => self.completion(req, false).await,
            (_, "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health" | "/metrics") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => error(StatusCode::NOT_FOUND, "not found"),
        };
        if let Ok(v) = header::HeaderValue::from_str(&self.opts.name) {
            resp.headers_mut().insert(REPLICA_HEADER, v);
        }
        resp
    }

    fn metrics(&self) -> Response<HttpBody> {
        let s = &self.stats;
        let model = self.opts.models.first().map_or("sim", String::as_str);
        let body = format!(
            "# HELP vllm:num_requests_running Number of requests currently running on GPU.\n\
             # TYPE vllm:num_requests_running gauge\n\
             vllm:num_requests_running{{model_name=\"{model}\"}} {}\n\
             # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{model_name=\"{model}\"}} {}\n\
             # HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.\n\
             # TYPE vllm:prefix_cache_queries_total counter\n\
             vllm:prefix_cache_queries_total{{model_name=\"{model}\"}} {}\n\
             # HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.\n\
             # TYPE vllm:prefix_cache_hits_total counter\n\
             vllm:prefix_cache_hits_total{{model_name=\"{model}\"}} {}\n\
             # HELP sim_requests_total Completion requests received.\n\
             # TYPE sim_requests_total counter\n\
             sim_requests_total {}\n",
            s.running.load(Ordering::Relaxed),
            s.waiting.load(Ordering::Relaxed),
            s.cache_queries.load(Ordering::Relaxed),
            s.cache_hits.load(Ordering::Relaxed),
            s.requests.load(Ordering::Relaxed),
        );
        let mut r = text(StatusCode::OK, &body);
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
        r
    }

    fn models(&self) -> Response<HttpBody> {
        let data: Vec<Value> = self
            .opts
            .models
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": now_secs(), "owned_by": "stoke-sim"}))
            .collect();
        json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
    }

    /// `POST /sleep?level=1|2`: the weights leave GPU memory (level 1
    /// keeps them in CPU memory, level 2 drops them) and the KV cache, with
    /// the prefix cache in it, is discarded.
    fn sleep(&self, query: Option<&str>) -> Response<HttpBody> {
        let level = match query_value(query, "level") {
            None | Some("1") => 1,
            Some("2") => 2,
            Some(other) => return error(StatusCode::BAD_REQUEST, &format!("level {other} is not a sleep level")),
        };
        let Ok(mut s) = self.sleep.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, "poisoned") };
        if !s.is_sleeping() {
            self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut since) = self.stats.asleep_since.lock() {
                *since = Some(Instant::now());
            }
        }
        *s = SleepMode { level, weights: false, kv_cache: false, reloaded: level == 1 };
        drop(s);
        self.cache.clear();
        Response::new(Either::Left(http_body_util::Full::new(Bytes::new())))
    }

    /// `POST /wake_up[?tags=weights|kv_cache]`: answers once what it wakes
    /// is back; the weights take `light_wake_time`.
    async fn wake_up(&self, query: Option<&str>) -> Response<HttpBody> {
        let tags = query_value(query, "tags");
        let (weights, kv) = match tags {
            None => (true, true),
            Some("weights") => (true, false),
            Some("kv_cache") => (false, true),
            Some(other) => return error(StatusCode::BAD_REQUEST, &format!("unknown tag {other}")),
        };
        let needs_weights = weights && self.sleep.lock().map(|s| !s.weights).unwrap_or(false);
        if needs_weights {
            tokio::time::sleep(self.opts.light_wake_time).await;
        }
        if let Ok(mut s) = self.sleep.lock() {
            let was = s.is_sleeping();
            s.weights |= weights;
            s.kv_cache |= kv;
            if was && !s.is_sleeping() {
                self.stats.wakes.fetch_add(1, Ordering::Relaxed);
                if let Some(since) = self.stats.asleep_since.lock().ok().and_then(|mut s| s.take()) {
                    self.stats.asleep_ms.fetch_add(since.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
                s.level = 0;
            }
        }
        Response::new(Either::Left(http_body_util::Full::new(Bytes::new())))
    }

    /// `POST /collective_rpc` with `{"method": "reload_weights"}`: after a
    /// level 2 sleep, the weights are loaded again (`reload_time`).
    async fn collective_rpc(&self, req: Request<Incoming>) -> Response<HttpBody> {
        let body = Limited::new(req.into_body(), MAX_BODY).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let method = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("method").and_then(Value::as_str).map(str::to_owned));
        if method.as_deref() != Some("reload_weights") {
            return error(StatusCode::BAD_REQUEST, "only reload_weights is simulated");
        }
        if self.sleep.lock().map(|s| !s.weights).unwrap_or(false) {
            return error(StatusCode::BAD_REQUEST, "wake the weights first (POST /wake_up?tags=weights)");
        }
        tokio::time::sleep(self.opts.reload_time).await;
        if let Ok(mut s) = self.sleep.lock() {
            s.reloaded = true;
        }
        json_response(StatusCode::OK, &json!({"results": [null]}))
    }

    async fn completion(&self, req: Request<Incoming>, chat: bool) -> Response<HttpBody> {
        if !self.booted() {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the replica is still booting");
        }
        if self.sleep.lock().map(|s| s.is_sleeping()).unwrap_or(false) {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the model is sleeping; POST /wake_up first");
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut at) = self.stats.last_request_at.lock() {
            *at = Some(Instant::now());
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body failed: {e}")),
        };
        if let Ok(mut last) = self.last_body.lock() {
            *last = body.clone();
        }
        let parsed: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body is not JSON: {e}")),
        };
        let model = parsed.get("model").and_then(Value::as_str).unwrap_or("sim").to_owned();
        let stream = parsed.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let max_tokens = parsed
            .get("max_tokens")
            .or_else(|| parsed.get("max_completion_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_MAX_TOKENS)
            .clamp(1, MAX_TOKENS_CAP);
        let prompt_tokens = (body.len() / 4).max(1) as u64;

        let waiting = Gauge::new(self.stats.clone(), |s| &s.waiting);
        let busy = self.stats.running.load(Ordering::Relaxed) + self.stats.waiting.load(Ordering::Relaxed);
        self.stats.peak_busy.fetch_max(busy, Ordering::Relaxed);
        let permit = self.slots.clone().acquire_owned().await;
        drop(waiting);
        let Ok(permit) = permit else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        };
        let gen = Generation {
            id: format!("{}-{:08x}", if chat { "chatcmpl" } else { "cmpl" }, fastrand::u32(..)),
            model,
            chat,
            max_tokens,
            prompt_tokens,
            interval: Duration::from_secs_f64(1.0 / self.opts.tokens_per_sec.max(0.001)),
        };
        let running = Gauge::new(self.stats.clone(), |s| &s.running);
        // Prefill: only the prompt tokens the prefix cache does not hold.
        let found = self.cache.lookup(&super::cache::prompt_text(&parsed));
        self.stats.cache_queries.fetch_add(found.tokens, Ordering::Relaxed);
        self.stats.cache_hits.fetch_add(found.cached, Ordering::Relaxed);
        if self.opts.prefill_tokens_per_sec > 0.0 {
            let uncached = (found.tokens - found.cached) as f64;
            tokio::time::sleep(Duration::from_secs_f64(uncached / self.opts.prefill_tokens_per_sec)).await;
        }
        if !stream {
            tokio::time::sleep(gen.interval * max_tokens as u32).await;
            drop((permit, running));
            return json_response(StatusCode::OK, &gen.full());
        }
        // Streamed: tokens leave as they are made; a client that goes away
        // stops the generation and frees the slot.
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(4);
        let stats = self.stats.clone();
        tokio::spawn(async move {
            let _held = (permit, running);
            let mut next = tokio::time::Instant::now();
            for i in 0..gen.max_tokens {
                next += gen.interval;
                tokio::time::sleep_until(next).await;
                let event = format!("data: {}\n\n", gen.chunk(i));
                if tx.send_data(Bytes::from(event)).await.is_err() {
                    stats.aborted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let end = format!("data: {}\n\ndata: [DONE]\n\n", gen.last_chunk());
            let _ = tx.send_data(Bytes::from(end)).await;
        });
        let mut resp = Response::new(Either::Right(body));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
        resp
    }
}

/// Counts a request in one gauge of the stats while alive (also when the
/// request's future is dropped because its client went away).
struct Gauge {
    stats: Arc<ReplicaStats>,
    which: fn(&ReplicaStats) -> &AtomicU32,
}

impl Gauge {
    fn new(stats: Arc<ReplicaStats>, which: fn(&ReplicaStats) -> &AtomicU32) -> Self {
        which(&stats).fetch_add(1, Ordering::Relaxed);
        Gauge { stats, which }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.which)(&self.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

struct Generation {
    id: String,
    model: String,
    chat: bool,
    max_tokens: u64,
    prompt_tokens: u64,
    interval: Duration,
}

const WORDS: &[&str] =
    &["the ", "edge ", "routes ", "every ", "token ", "to ", "a ", "warm ", "GPU ", "near ", "you ", "fast "];

impl Generation {
    fn word(i: u64) -> &'static str {
        WORDS[(i as usize) % WORDS.len()]
    }

    fn full(&self) -> Value {
        let text: String = (0..self.max_tokens).map(Self::word).collect();
        let usage = json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.max_tokens,
            "total_tokens": self.prompt_tokens + self.max_tokens,
        });
        if self.chat {
            json!({
                "id": self.id, "object": "chat.completion", "created": now_secs(), "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
                "usage": usage,
            })
        } else {
            json!({
                "id": self.id, "object": "text_completion", "created": now_secs(), "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": "length"}],
                "usage": usage,
            })
        }
    }

    fn chunk(&self, i: u64) -> Value {
        if self.chat {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": Self::word(i)})
            } else {
                json!({"content": Self::word(i)})
            };
            json!({
                "id": self.id, "object": "chat.completion.chunk", "created": now_secs(), "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": null}],
            })
        } else {
            json!({
                "id": self.id, "object": "text_completion", "created": now_secs(), "model": self.model,
                "choices": [{"index": 0, "text": Self::word(i), "logprobs": null, "finish_reason": null}],
            })
        }
    }

    fn last_chunk(&self) -> Value {
        if self.chat {
            json!({
                "id": self.id, "object": "chat.completion.chunk", "created": now_secs(), "model": self.model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
            })
        } else {
            json!({
                "id": self.id, "object": "text_completion", "created": now_secs(), "model": self.model,
                "choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": "length"}],
            })
        }
    }
}

/// The value of `key` in a query string, if given.
fn query_value<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| kv.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn error(status: StatusCode, message: &str) -> Response<HttpBody> {
    json_response(status, &json!({"error": {"message": message, "type": "sim_error", "code": status.as_u16()}}))
}
