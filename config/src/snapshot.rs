//! The compiled, immutable form of a config file.
//!
//! Ids are interned to indices, every default is filled in, and every
//! cross-reference has been checked, so the request path never meets an
//! `Option` it has to interpret or a name it has to look up twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use stoke_geo::{Coord, RttMatrix};

pub use crate::routes::RouteId;
use crate::routes::{HostPattern, RouteTable};

/// Index of a location in [`Network::locations`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocationId(pub u16);

/// Index of a pool in [`Network::pools`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(pub u32);

/// Index of a service in [`Network::services`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(pub u32);

impl LocationId {
    /// As a slice index.
    #[inline]
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

macro_rules! index_u32 {
    ($($t:ty),*) => {$(
        impl $t {
            /// As a slice index.
            #[inline]
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }
    )*};
}
index_u32!(PoolId, ServiceId);

/// Everything the file says, validated, independent of which edge reads it.
#[derive(Debug)]
pub struct Network {
    /// Where the file was read from and what it hashed to.
    pub source: Source,
    /// Settings of the edge process.
    pub edge: EdgeSettings,
    /// `[cluster]`: the NATS servers the edges share decisions through
    /// (`None`: every edge decides alone).
    pub cluster: Option<ClusterSettings>,
    /// `[tracing]`: where spans go, and which requests are traced.
    pub tracing: Option<TracingSettings>,
    /// Certificates for the TLS and QUIC listeners, in file order.
    pub tls: Vec<TlsCert>,
    /// Every location, edge or not.
    pub locations: Vec<Location>,
    /// Round trips between locations (estimates, with `[[rtt]]` overrides).
    pub rtt: RttMatrix,
    /// Every pool.
    pub pools: Vec<Pool>,
    /// Every service that some pool serves, with the pools that serve it.
    pub services: Vec<Service>,
    /// Every route, in file order.
    pub routes: Vec<Route>,
    /// Host and path matching over [`routes`](Self::routes).
    pub route_table: RouteTable,
    pub(crate) location_index: HashMap<String, LocationId>,
    pub(crate) pool_index: HashMap<String, PoolId>,
    pub(crate) service_index: HashMap<String, ServiceId>,
}

impl Network {
    /// The location with this id.
    pub fn location_id(&self, id: &str) -> Option<LocationId> {
        self.location_index.get(id).copied()
    }

    /// The pool with this id.
    pub fn pool_id(&self, id: &str) -> Option<PoolId> {
        self.pool_index.get(id).copied()
    }

    /// The service with this name (exact, case-sensitive, as model names are).
    #[inline]
    pub fn service_id(&self, name: &str) -> Option<ServiceId> {
        self.service_index.get(name).copied()
    }

    /// A location by index.
    #[inline]
    pub fn location(&self, id: LocationId) -> &Location {
        &self.locations[id.index()]
    }

    /// A pool by index.
    #[inline]
    pub fn pool(&self, id: PoolId) -> &Pool {
        &self.pools[id.index()]
    }

    /// A service by index.
    #[inline]
    pub fn service(&self, id: ServiceId) -> &Service {
        &self.services[id.index()]
    }

    /// A route by index.
    #[inline]
    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id.index()]
    }

    /// Locations that run an edge.
    pub fn edge_locations(&self) -> impl Iterator<Item = LocationId> + '_ {
        self.locations.iter().enumerate().filter(|(_, l)| l.edge).map(|(i, _)| LocationId(i as u16))
    }
}

/// The file a network was read from.
#[derive(Clone, Debug)]
pub struct Source {
    /// Path as given.
    pub path: PathBuf,
    /// FNV-1a 64 hash of the file's bytes, hex: tells two versions apart.
    pub hash: String,
}

/// `[edge]`: settings of the edge process itself.
#[derive(Clone, Debug)]
pub struct EdgeSettings {
    /// `location` in the file, if given (the command line may override it).
    pub location: Option<String>,
    /// Plain listener: HTTP/1.1 and h2c.
    pub http: Option<SocketAddr>,
    /// TLS listener: HTTP/1.1 and HTTP/2 by ALPN.
    pub https: Option<SocketAddr>,
    /// HTTP/3 listener (UDP).
    pub h3: Option<SocketAddr>,
    /// Admin API listener.
    pub admin: SocketAddr,
    /// Environment variable holding the admin bearer token.
    pub admin_token_env: Option<String>,
    /// Whether responses carry `stoke-edge`, `stoke-pool`, `stoke-replica`, `stoke-wait-ms`.
    pub debug_headers: bool,
    /// Proxy worker threads (0: one per core).
    pub threads: usize,
    /// How long in-flight requests may take to finish at shutdown.
    pub drain_timeout: Duration,
    /// Longest wait for each read of a new connection's first request header.
    pub client_header_timeout: Duration,
    /// Longest an idle keep-alive connection waits for its next request.
    pub keepalive_timeout: Duration,
    /// Client connections served at once.
    pub max_connections: usize,
    /// Most bytes of request line and headers.
    pub max_header_bytes: usize,
    /// Most request header fields.
    pub max_headers: usize,
    /// Most bytes of request bodies held in memory at once, edge-wide.
    pub max_buffered_bodies: u64,
    /// HTTP/3 connections with no traffic for this long are closed.
    pub h3_idle_timeout: Duration,
    /// Concurrent requests per HTTP/3 connection.
    pub h3_max_streams: u32,
    /// Whether placement ranks pools by the RTTs health probes measure
    /// (where `[[rtt]]` does not give them) rather than by distance.
    pub measure_rtt: bool,
    /// The Unix socket on which this edge hands its listening sockets to a
    /// new process (`stoke upgrade`), resolved against the config file's
    /// directory; `None`: no upgrades.
    pub upgrade_socket: Option<PathBuf>,
}

/// `[cluster]`: how this edge reaches the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// This edge's NATS server(s): a leaf of the hub cluster.
    pub nats: Vec<String>,
    /// Prefix of every subject and bucket.
    pub name: String,
    /// Longest any cluster call may delay a decision.
    pub timeout: Duration,
    /// The JetStream domain of the hub, when this edge's server is a leaf
    /// without JetStream of its own.
    pub domain: Option<String>,
}

/// `[tracing]`: OpenTelemetry spans of requests, exported with OTLP.
#[derive(Clone, Debug, PartialEq)]
pub struct TracingSettings {
    /// The collector's OTLP/HTTP traces endpoint
    /// (`http://127.0.0.1:4318/v1/traces`); spans go as protobuf.
    pub endpoint: String,
    /// The share of requests without a sampled parent that start a trace
    /// (0 to 1).
    pub sample: f64,
    /// Whether a client's `traceparent` that says "sampled" is recorded
    /// whatever `sample` says.
    pub follow_parent: bool,
    /// Spans held for export at most; more are dropped, and counted.
    pub queue: usize,
    /// Header fields sent with every export, as written.
    pub headers: Vec<(String, String)>,
    /// Header fields sent with every export, each from the environment
    /// variable named (read when the tracer starts).
    pub headers_env: Vec<(String, String)>,
}

/// `[[tls]]`: a certificate chain and key, and the host names it serves.
#[derive(Debug)]
pub struct TlsCert {
    /// Host patterns (exact or `*.suffix`) this certificate is chosen for by SNI.
    pub hosts: Vec<HostPattern>,
    /// Resolved path of the PEM chain.
    pub cert_path: PathBuf,
    /// Resolved path of the PEM key.
    pub key_path: PathBuf,
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

/// `[[location]]`.
#[derive(Clone, Debug)]
pub struct Location {
    /// Short id (`"fra"`).
    pub id: String,
    /// Display name (`"Frankfurt"`).
    pub name: String,
    /// Where it is.
    pub coord: Coord,
    /// Whether an edge runs here (false for GPU-only sites).
    pub edge: bool,
}

/// `[[pool]]`: replicas of one or more services at one location.
#[derive(Clone, Debug)]
pub struct Pool {
    /// Id from the file (`"fra-h100"`); pool state is keyed by it across reloads.
    pub id: String,
    /// Where the pool is.
    pub location: LocationId,
    /// The edge that calls the sleep hook: the pool's own location if it
    /// runs an edge, else the nearest location that does.
    pub home_edge: LocationId,
    /// Services this pool serves.
    pub services: Vec<ServiceId>,
    /// Replica addresses.
    pub replicas: Vec<SocketAddr>,
    /// Requests one replica takes at once.
    pub max_concurrency: u32,
    /// Requests held for this pool at most, per edge.
    pub max_queue: u32,
    /// Time to establish a TCP connection to a replica.
    pub connect_timeout: Duration,
    /// Longest pause between two reads from a replica (first byte included).
    pub read_timeout: Duration,
    /// Active health probe.
    pub health: HealthCheck,
    /// Load reported by the replicas, if configured.
    pub load: Option<LoadReport>,
    /// Scale-to-zero settings; `None`: the pool is always on.
    pub scale: Option<Scale>,
    /// Prompt-cache affinity, if configured: how requests pick replicas.
    pub affinity: Option<Affinity>,
}

/// `[pool.affinity]`: requests that share a key go to the same replica of
/// the pool from every edge (rendezvous hashing), within a load bound.
#[derive(Clone, Debug, PartialEq)]
pub struct Affinity {
    /// What the key is.
    pub key: AffinityKey,
    /// For [`AffinityKey::Prefix`]: bytes of the conversation's opening hashed.
    pub prefix_bytes: usize,
    /// The key's replica is passed over while its load is above
    /// `max_load` × the pool's mean load + 1.
    pub max_load: f64,
}

/// Where a request's affinity key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AffinityKey {
    /// The prompt's opening: the leading messages of a chat (roles and
    /// contents, through the first user turn), or a completion's `prompt`.
    Prefix,
    /// A request header (lower-case name).
    Header(String),
    /// A top-level string field of the JSON body (e.g. OpenAI's `user`).
    BodyField(String),
}

/// `health = { … }` of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path probed with GET; 2xx is ready.
    pub path: String,
    /// Time between probes.
    pub interval: Duration,
    /// Time a probe may take.
    pub timeout: Duration,
    /// With a light depth: the path a healthy replica is asked next, whose
    /// `{"is_sleeping": true}` keeps it out of rotation (vLLM's
    /// `/is_sleeping`). From `[pool.scale.light]`.
    pub sleeping_path: Option<String>,
}

/// Which metrics dialect a replica speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadFormat {
    /// `vllm:num_requests_running`, `vllm:num_requests_waiting`.
    Vllm,
    /// `tgi_batch_current_size`, `tgi_queue_size`.
    Tgi,
    /// `sglang:num_running_reqs`, `sglang:num_queue_reqs`.
    Sglang,
}

impl LoadFormat {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadFormat::Vllm => "vllm",
            LoadFormat::Tgi => "tgi",
            LoadFormat::Sglang => "sglang",
        }
    }
}

/// `load = { … }` of a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// Path of the Prometheus text endpoint.
    pub path: String,
    /// Metric dialect.
    pub format: LoadFormat,
    /// Time between scrapes.
    pub interval: Duration,
}

/// `[pool.scale]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Scale {
    /// Idle time after which the home edge puts the pool to sleep.
    pub idle_timeout: IdleTimeout,
    /// Expected cold start, the seed of the learned wake time.
    pub wake_time: Duration,
    /// Called to wake the pool.
    pub wake: Hook,
    /// Called to put the pool to sleep; without it the pool is never put to sleep by stoke.
    pub sleep: Option<Hook>,
    /// The light depth, if the pool has one: its replicas keep running
    /// with their model out of GPU memory.
    pub light: Option<LightSleep>,
}

/// `[pool.scale] light`: a sleep each replica wakes from in about a second.
#[derive(Clone, Debug, PartialEq)]
pub struct LightSleep {
    /// Called for every replica (its steps name `{replica}`) to put it to
    /// light sleep.
    pub sleep: Hook,
    /// Called for every replica to wake it.
    pub wake: Hook,
    /// Path a replica answers `{"is_sleeping": true|false}` on; while it
    /// says true the replica is not ready, however its health check goes.
    pub probe: Option<String>,
    /// `light_timeout`: idle time before the light sleep.
    pub idle_timeout: IdleTimeout,
    /// `light_wake_time`: expected wake from light sleep.
    pub wake_time: Duration,
    /// `light_cost`: a lightly sleeping replica's cost as a share of an
    /// awake one's.
    pub cost: f64,
}

/// `idle_timeout` of `[pool.scale]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleTimeout {
    /// A fixed window.
    Fixed(Duration),
    /// `"auto"`: the home edge picks the window from the pool's idle gaps
    /// and the cost of a wake, within these bounds.
    Auto {
        /// `min_idle`.
        min: Duration,
        /// `max_idle`.
        max: Duration,
    },
}

/// An actuator: one step, or several called in order (each must succeed
/// before the next is called).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// The steps, at least one.
    pub steps: Vec<HookStep>,
}

impl Hook {
    /// A hook of one step.
    pub fn one(step: HookStep) -> Self {
        Hook { steps: vec![step] }
    }

    /// Whether some step names the replica (`{replica}`): then the hook is
    /// called once per replica.
    pub fn per_replica(&self) -> bool {
        self.steps.iter().any(HookStep::names_replica)
    }
}

/// One step of a hook: an HTTP request or a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookStep {
    /// An HTTP(S) request.
    Http(HttpStep),
    /// Run a program (no shell).
    Command {
        /// Program and arguments, each a template.
        argv: Vec<Template>,
        /// Time one run may take.
        timeout: Duration,
    },
}

impl HookStep {
    /// Time the step may take.
    pub fn timeout(&self) -> Duration {
        match self {
            HookStep::Http(h) => h.timeout,
            HookStep::Command { timeout, .. } => *timeout,
        }
    }

    fn names_replica(&self) -> bool {
        match self {
            HookStep::Http(h) => {
                h.url.names(HookVar::Replica)
                    || h.body.as_ref().is_some_and(|b| b.names(HookVar::Replica))
                    || h.headers.iter().any(|(_, v)| v.names(HookVar::Replica))
            }
            HookStep::Command { argv, .. } => argv.iter().any(|a| a.names(HookVar::Replica)),
        }
    }
}

/// An HTTP step of a hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpStep {
    /// The URL, a template (`http://{replica}/sleep?level=1`); it parses
    /// as a [`HookUrl`] once filled in.
    pub url: Template,
    /// The method (`POST` unless written).
    pub method: String,
    /// Extra headers (names in lower case), values templates.
    pub headers: Vec<(String, Template)>,
    /// The body; without one, a `POST`, `PUT` or `PATCH` sends stoke's JSON
    /// (`{"pool", "edge", "action", "reason", "replicas", "depth"}`).
    pub body: Option<Template>,
    /// Where the token comes from, if any.
    pub token: Option<HookToken>,
    /// The header that carries the token: `Authorization: Bearer …` when
    /// `None`, else the header's name with the bare token.
    pub token_header: Option<String>,
    /// A PEM file of the CAs an `https` URL is trusted from, instead of
    /// the system's roots (read at each call, so a rotated file is used).
    pub ca_file: Option<PathBuf>,
    /// Time the step may take.
    pub timeout: Duration,
}

/// The source of a hook's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookToken {
    /// An environment variable.
    Env(String),
    /// A file, read at each call (Kubernetes rotates its projected
    /// service-account tokens), trimmed.
    File(PathBuf),
}

/// What a hook template may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookVar {
    /// `{pool}`: the pool's id.
    Pool,
    /// `{edge}`: the calling edge's location.
    Edge,
    /// `{action}`: `wake` or `sleep`.
    Action,
    /// `{reason}`: why (`request`, `demand`, `prewarm`, `idle`).
    Reason,
    /// `{replicas}`: how many replicas the pool is to have: its configured
    /// count for a wake, 0 for a deep sleep.
    Replicas,
    /// `{depth}`: `light` or `deep`.
    Depth,
    /// `{replica}`: one replica's `host:port` (the hook is then called for
    /// each replica).
    Replica,
}

impl HookVar {
    /// Every variable, with its name.
    pub const ALL: [(&'static str, HookVar); 7] = [
        ("pool", HookVar::Pool),
        ("edge", HookVar::Edge),
        ("action", HookVar::Action),
        ("reason", HookVar::Reason),
        ("replicas", HookVar::Replicas),
        ("depth", HookVar::Depth),
        ("replica", HookVar::Replica),
    ];
}

/// A string with `{name}` placeholders ([`HookVar`]). A `{` that does not
/// open a known lower-case name followed by `}` is literal, so JSON bodies
/// are written as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// As written.
    pub raw: String,
    pieces: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(HookVar),
}

impl Template {
    /// Parse `raw`; an unknown `{name}` is an error naming it.
    pub fn parse(raw: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = raw;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let name_len = after.bytes().take_while(|b| b.is_ascii_lowercase() || *b == b'_').count();
            if name_len > 0 && after.as_bytes().get(name_len) == Some(&b'}') {
                let name = &after[..name_len];
                let Some((_, var)) = HookVar::ALL.iter().find(|(n, _)| *n == name) else {
                    let known: Vec<String> = HookVar::ALL.iter().map(|(n, _)| format!("{{{n}}}")).collect();
                    return Err(format!("{{{name}}} is not a placeholder; known: {}", known.join(", ")));
                };
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Var(*var));
                rest = &after[name_len + 1..];
            } else {
                text.push('{');
                rest = after;
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template { raw: raw.to_owned(), pieces })
    }

    /// Whether the template names `var`.
    pub fn names(&self, var: HookVar) -> bool {
        self.pieces.contains(&Piece::Var(var))
    }

    /// The template with each placeholder replaced by `value(var)`.
    pub fn render<'v>(&self, value: impl Fn(HookVar) -> &'v str) -> String {
        let mut out = String::with_capacity(self.raw.len() + 16);
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => out.push_str(value(*v)),
            }
        }
        out
    }
}

/// A parsed `http://` or `https://` URL of a hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookUrl {
    /// The URL as written.
    pub raw: String,
    /// Whether the scheme is https.
    pub tls: bool,
    /// Host name or IP (no brackets).
    pub host: String,
    /// Port (default 80 or 443).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HookUrl {
    /// Parse `http://HOST[:PORT]/PATH` or `https://…`, as a hook's URL
    /// once its template is filled in.
    pub fn parse(raw: &str) -> Result<HookUrl, String> {
        crate::compile::parse_hook_url(raw)
    }
}

/// A service (model or app) and the pools that serve it.
#[derive(Clone, Debug)]
pub struct Service {
    /// Name (`"llama-3.1-8b"`).
    pub name: String,
    /// Pools that serve it, in file order.
    pub pools: Vec<PoolId>,
}

/// `[[route]]`.
#[derive(Clone, Debug)]
pub struct Route {
    /// Name used in metrics and logs (`name`, or host + path prefix).
    pub name: String,
    /// Host it matches.
    pub host: HostPattern,
    /// Path prefix it matches.
    pub path_prefix: String,
    /// Where the service comes from.
    pub service: ServiceSource,
    /// Longest a request is held for capacity or a wake.
    pub max_wait: Duration,
    /// A streaming request held for a wake gets the SSE head at once and a
    /// comment with the ETA this often (`None`: held silently).
    pub hold_keepalive: Option<Duration>,
    /// Remove `path_prefix` from the forwarded path.
    pub strip_prefix: bool,
    /// Most bytes read from a body to find the service.
    pub max_body_read: u64,
    /// Largest request body forwarded.
    pub max_body: u64,
    /// API keys required, if any.
    pub auth: Option<Auth>,
    /// Request rate limits, if any.
    pub rate_limit: Option<RateLimit>,
}

/// `auth = { … }` of a route: the API keys it accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    /// The accepted keys (never printed: `Debug` redacts them).
    pub keys: Vec<String>,
    /// Where the key is sent.
    pub header: AuthHeader,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("header", &self.header)
            .finish()
    }
}

/// Where a client sends its API key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthHeader {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// A header of its own, lower-cased (`x-api-key: <key>`).
    Named(String),
}

/// `rate_limit = { … }` of a route: token buckets.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    /// Requests per second per API key (routes with `auth`).
    pub per_key: Option<f64>,
    /// Requests per second per client IP.
    pub per_ip: Option<f64>,
    /// Bucket size: requests allowed in a burst.
    pub burst: u32,
}

/// Where a route's service comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceSource {
    /// Always this service.
    Fixed(ServiceId),
    /// A top-level string field of the JSON body (`body:model`).
    BodyField(String),
    /// A request header, lower-cased (`header:x-model`).
    Header(String),
}

/// The per-edge view of a [`Network`]: what one edge location needs on its
/// request path, precomputed.
#[derive(Debug)]
pub struct Snapshot {
    /// The whole network.
    pub network: Network,
    /// This edge's location.
    pub location: LocationId,
    /// For each service (by index), the pools that serve it ranked by RTT
    /// from this edge, nearest first.
    pub candidates: Vec<Vec<Candidate>>,
}

/// A pool that can serve a service, and its RTT from this edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The pool.
    pub pool: PoolId,
    /// Round trip from this edge to the pool, in microseconds.
    pub rtt_us: u32,
}

impl Snapshot {
    /// Compile the view of `network` for the edge at `location`.
    pub fn new(network: Network, location: LocationId) -> Self {
        let candidates = network
            .services
            .iter()
            .map(|service| {
                network
                    .rtt
                    .rank(location.index(), service.pools.iter().map(|&p| (p, network.pool(p).location.index())))
                    .into_iter()
                    .map(|r| Candidate { pool: r.item, rtt_us: r.rtt_us })
                    .collect()
            })
            .collect();
        Snapshot { network, location, candidates }
    }

    /// The pools that serve `service`, nearest first.
    #[inline]
    pub fn candidates(&self, service: ServiceId) -> &[Candidate] {
        &self.candidates[service.index()]
    }

    /// This edge's location.
    pub fn edge_location(&self) -> &Location {
        self.network.location(self.location)
    }

    /// A one-line summary for `stoke check` and logs.
    pub fn summary(&self) -> String {
        self.network.summary()
    }
}

impl Network {
    /// `"10 locations, 6 pools, 3 services, 1 route"`.
    pub fn summary(&self) -> String {
        let n = |count: usize, one: &str, many: &str| format!("{count} {}", if count == 1 { one } else { many });
        format!(
            "{}, {}, {}, {}",
            n(self.locations.len(), "location", "locations"),
            n(self.pools.len(), "pool", "pools"),
            n(self.services.len(), "service", "services"),
            n(self.routes.len(), "route", "routes")
        )
    }
}
