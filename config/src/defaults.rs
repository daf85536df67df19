//! Defaults for every optional key, in one place so that the code, the
//! docs (`config/README.md`) and `stoke check` agree.

use std::time::Duration;

/// `[edge].admin`: loopback only, so that nothing is exposed by default.
pub const ADMIN: &str = "127.0.0.1:9901";
/// `[edge].debug_headers`.
pub const DEBUG_HEADERS: bool = false;
/// `[edge].threads`: 0 means one worker per core.
pub const THREADS: usize = 0;
/// `[edge].drain_timeout`: how long in-flight requests and open streams
/// get at shutdown or after an upgrade (token streams run for minutes).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// `[edge].client_header_timeout`: longest wait for each read of a new
/// connection's first request header (slow clients are cut off).
pub const CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `[edge].keepalive_timeout`: longest an idle keep-alive connection waits
/// for its next request (and for each read of that request's header).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// `[edge].max_connections`: client connections served at once; more are
/// closed at accept.
pub const MAX_CONNECTIONS: u64 = 10_000;
/// `[edge].max_header_bytes`: request line and headers, in bytes (431 beyond).
pub const MAX_HEADER_BYTES: u64 = 64 << 10;
/// `[edge].max_buffered_bodies`: bytes of request bodies held in memory at
/// once, across every connection and protocol (503 beyond).
pub const MAX_BUFFERED_BODIES: u64 = 256 << 20;
/// `[pool.affinity].prefix_bytes`: bytes of a conversation's opening hashed.
pub const AFFINITY_PREFIX_BYTES: u64 = 4096;
/// `[pool.affinity].max_load`: the key's replica is passed over above this
/// × the pool's mean load + 1.
pub const AFFINITY_MAX_LOAD: f64 = 1.1;
/// `[edge].max_headers`: request header fields (431 beyond).
pub const MAX_HEADERS: u64 = 100;
/// `[edge].h3_idle_timeout`: an HTTP/3 connection with no traffic is closed after this.
pub const H3_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// `[edge].h3_max_streams`: concurrent requests per HTTP/3 connection.
pub const H3_MAX_STREAMS: u64 = 100;

/// `[cluster].name`: the prefix of every NATS subject and bucket.
pub const CLUSTER_NAME: &str = "stoke";
/// `[cluster].timeout`: the longest any cluster call may delay a decision.
pub const CLUSTER_TIMEOUT: Duration = Duration::from_millis(250);

/// `[tracing].sample`: requests without a sampled parent start no trace.
pub const TRACING_SAMPLE: f64 = 0.0;

/// `[tracing].queue`: spans waiting for export at most.
pub const TRACING_QUEUE: usize = 4096;

/// `[edge].measure_rtt`: rank pools by the RTTs health probes measure.
pub const MEASURE_RTT: bool = true;

/// `[[location]].edge`: a location runs an edge unless it says otherwise.
pub const LOCATION_EDGE: bool = true;

/// `[[pool]].max_concurrency`: requests per replica at once.
pub const MAX_CONCURRENCY: u32 = 16;
/// `[[pool]].max_queue`: requests held per pool per edge.
pub const MAX_QUEUE: u32 = 256;
/// `[[pool]].connect_timeout`: a replica is in the same metro as its
/// pool's location; a TCP connect slower than this is a replica in trouble,
/// and the request is better retried elsewhere.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `[[pool]].read_timeout`: the longest pause between two reads from a
/// replica, the wait for the first byte included. Generation streams pause
/// while a batch is scheduled; five minutes covers a long prefill on a busy
/// replica.
pub const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// `health.path`.
pub const HEALTH_PATH: &str = "/health";
/// `health.interval`.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// `health.timeout`.
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(500);
/// `load.path`.
pub const LOAD_PATH: &str = "/metrics";
/// `load.interval`.
pub const LOAD_INTERVAL: Duration = Duration::from_secs(1);
/// `load.format`.
pub const LOAD_FORMAT: &str = "vllm";
/// `[pool.scale].idle_timeout`.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// `[pool.scale].min_idle`: the shortest window `idle_timeout = "auto"` picks.
pub const MIN_IDLE: Duration = Duration::from_secs(10);
/// `[pool.scale].max_idle`: the longest window `idle_timeout = "auto"` picks.
pub const MAX_IDLE: Duration = Duration::from_secs(30 * 60);
/// `[pool.scale].wake_time`: a typical cold start of an inference server
/// loading an 8B model from local disk.
pub const WAKE_TIME: Duration = Duration::from_secs(30);
/// `timeout` of a wake or sleep hook.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// `[[route]].host`: any host.
pub const ROUTE_HOST: &str = "*";
/// `[[route]].path_prefix`.
pub const PATH_PREFIX: &str = "/";
/// `[[route]].max_wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// `[[route]].strip_prefix`.
pub const STRIP_PREFIX: bool = false;
/// `[[route]].max_body_read`: the most of a body read to find the model.
pub const MAX_BODY_READ: u64 = 1 << 20;
/// `[[route]].max_body`: the largest request body forwarded (413 beyond).
pub const MAX_BODY: u64 = 32 << 20;
/// `rate_limit.burst`: requests a client may send at once above its rate.
pub const RATE_BURST: u64 = 10;
/// Upper bound accepted for `max_body_read`: the body is held in memory.
pub const MAX_BODY_READ_LIMIT: u64 = 64 << 20;

/// `[pool.scale].light_timeout` with a fixed `idle_timeout`: idle time
/// before the replicas are put to light sleep.
pub const LIGHT_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest light window `light_timeout = "auto"` picks (or
/// `min_idle`, if shorter).
pub const LIGHT_MIN_IDLE: Duration = Duration::from_secs(1);
/// `[pool.scale].light_wake_time`: expected wake from light sleep (vLLM's
/// level 1 wakes in 0.1–6 s), the seed of the learned one.
pub const LIGHT_WAKE_TIME: Duration = Duration::from_secs(2);
/// `[pool.scale].light_cost`: a lightly sleeping replica's cost, as a share
/// of an awake one's (the GPU stays reserved; its memory is free for other
/// work).
pub const LIGHT_COST: f64 = 0.3;
/// Timeout of a `kind = "vllm"` light sleep or wake call (a level 2 wake
/// reloads the weights).
pub const VLLM_SLEEP_TIMEOUT: Duration = Duration::from_secs(120);
