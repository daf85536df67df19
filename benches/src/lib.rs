//! Shared helpers for the benches: a generator of large, valid config files
//! ([`generate_network`]) and a router over one with every replica ready
//! ([`ready_router`]), so that the benches measure stoke's code at the scale
//! of a real network without sockets.

pub mod engine;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use stoke_config::{ConfigError, Network};
use stoke_router::state::Live;
use stoke_router::state::Router;

/// The path generated files are compiled as (only used in messages).
pub const GENERATED_PATH: &str = "generated.toml";

/// Replicas in every generated pool.
pub const REPLICAS_PER_POOL: usize = 8;

/// Services (model names) in the catalogue; each pool serves 2 or 3.
pub const SERVICES: usize = FAMILIES.len() * SIZES.len();

/// Routes per generated host (after the catch-all route 0).
pub const ROUTES_PER_HOST: usize = 10;

/// The ten edge cities of the design: the first ten locations.
const CITIES: [(&str, &str, f64, f64); 10] = [
    ("fra", "Frankfurt", 50.11, 8.68),
    ("par", "Paris", 48.86, 2.35),
    ("lon", "London", 51.51, -0.13),
    ("iad", "Washington DC", 38.91, -77.04),
    ("nyc", "New York", 40.71, -74.01),
    ("sfo", "San Francisco", 37.77, -122.42),
    ("gru", "São Paulo", -23.55, -46.63),
    ("sin", "Singapore", 1.35, 103.82),
    ("nrt", "Tokyo", 35.68, 139.69),
    ("syd", "Sydney", -33.87, 151.21),
];

const FAMILIES: [&str; 10] = [
    "llama-3.1",
    "llama-3.3",
    "qwen2.5",
    "qwen2.5-coder",
    "mistral",
    "mixtral",
    "gemma-2",
    "phi-3.5",
    "deepseek-r1-distill",
    "command-r",
];
const SIZES: [&str; 5] = ["7b", "8b", "14b", "32b", "70b"];

const LOAD_FORMATS: [&str; 3] = ["vllm", "tgi", "sglang"];

/// Path prefixes of the first routes of every host; later ones get `/appK/`.
const PREFIXES: [&str; 4] = ["/v1/", "/v1/chat/", "/v1/completions", "/v1/embeddings"];

/// `writeln!` into a `String`, which cannot fail.
macro_rules! emit {
    ($out:expr) => {{
        $out.push('\n');
    }};
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Name of service `i` (`0..SERVICES`), such as `"llama-3.1-8b"`.
pub fn service_name(i: usize) -> String {
    format!("{}-{}", FAMILIES[(i / SIZES.len()) % FAMILIES.len()], SIZES[i % SIZES.len()])
}

/// Id of location `i`: the design's city ids for the first ten, then `l10`, `l11`, ….
pub fn location_id(i: usize) -> String {
    match CITIES.get(i) {
        Some((id, ..)) => (*id).to_owned(),
        None => format!("l{i}"),
    }
}

/// Latitude and longitude of location `i`: the real cities for the first
/// ten, then the points of an R2 low-discrepancy sequence, which spreads
/// any number of points evenly over the sphere, deterministically.
pub fn location_coord(i: usize) -> (f64, f64) {
    if let Some(&(_, _, lat, lon)) = CITIES.get(i) {
        return (lat, lon);
    }
    // R2 sequence (Roberts): the plastic number's powers as increments.
    let k = (i - CITIES.len()) as f64 + 0.5;
    let (a1, a2) = (0.754_877_666_246_692_7, 0.569_840_290_998_053_3);
    let (u, v) = ((k * a1).fract(), (k * a2).fract());
    // Equal-area mapping: latitude from the arcsine of a uniform variable.
    let lat = (2.0 * u - 1.0).asin().to_degrees();
    let lon = v * 360.0 - 180.0;
    ((lat * 100.0).round() / 100.0, (lon * 100.0).round() / 100.0)
}

/// Id of pool `p` in a network of `locations` locations: `p00042-fra`.
pub fn pool_id(p: usize, locations: usize) -> String {
    format!("p{p:05}-{}", location_id(p % locations.max(1)))
}

/// Indices of the services pool `p` serves: 2 or 3, distinct.
pub fn pool_services(p: usize) -> Vec<usize> {
    // 17 · k mod 50 is distinct for k < 3, and 7 · p mod 50 visits every
    // service once per 50 pools.
    (0..2 + p % 2).map(|k| (p * 7 + k * 17) % SERVICES).collect()
}

/// The address of replica `r` of pool `p`: `10.a.b.c:8000`, distinct over
/// the first 2²⁴ replicas of a network.
pub fn replica_addr(p: usize, r: usize) -> String {
    let g = p * REPLICAS_PER_POOL + r;
    format!("10.{}.{}.{}:8000", (g >> 16) & 0xff, (g >> 8) & 0xff, g & 0xff)
}

/// Number of hosts (route groups) that `routes` routes are spread over.
pub fn host_groups(routes: usize) -> usize {
    routes.saturating_sub(1).div_ceil(ROUTES_PER_HOST)
}

/// Whether host group `g` is a wildcard (`*.tenantG.example.net`); the
/// others are exact (`tenantG.api.example.com`).
pub fn is_wildcard_group(g: usize) -> bool {
    g % 3 == 2
}

/// The host pattern of group `g`, as written in the file.
pub fn group_host(g: usize) -> String {
    if is_wildcard_group(g) {
        format!("*.tenant{g}.example.net")
    } else {
        format!("tenant{g}.api.example.com")
    }
}

/// A request host that group `g` matches.
pub fn request_host(g: usize) -> String {
    if is_wildcard_group(g) {
        format!("eu-west.tenant{g}.example.net")
    } else {
        format!("tenant{g}.api.example.com")
    }
}

/// The path prefix of the `k`-th route of a host.
fn route_prefix(k: usize) -> String {
    match PREFIXES.get(k) {
        Some(p) => (*p).to_owned(),
        None => format!("/app{k}/v1/"),
    }
}

/// Config text for a large network, valid for [`stoke_config::load_str`]:
///
/// - `locations` locations: the design's ten cities first, then points
///   spread evenly over the globe (see [`location_coord`]); every one runs
///   an edge, and `[edge].location` is the first;
/// - `pools` pools, pool `p` at location `p mod locations`, each with
///   [`REPLICAS_PER_POOL`] distinct replicas ([`replica_addr`]), serving 2 or
///   3 of [`SERVICES`] model names ([`pool_services`]); every third pool
///   scales to zero (wake and sleep webhooks on
///   `http://127.0.0.1:7000/pools/ID/…`), every other pool reports load;
/// - `routes` routes: route 0 is a catch-all (`host = "*"`, `/v1/`, model
///   from the body); the rest come [`ROUTES_PER_HOST`] per host, over
///   exact hosts and (every third host) wildcard hosts, with distinct path
///   prefixes (`/v1/`, `/v1/chat/`, `/v1/completions`, `/v1/embeddings`,
///   `/app4/v1/`, …), taking the service in turn from a fixed
///   `service = "…"`, `service_from = "body:model"` and
///   `service_from = "header:x-model"`.
///
/// The same arguments always give the same text. `locations` and `pools`
/// of 0 give a file that fails to load (no location, or no service for the
/// fixed routes).
pub fn generate_network(locations: usize, pools: usize, routes: usize) -> String {
    let mut out = String::with_capacity(pools * 700 + routes * 150 + 4096);
    emit!(out, "# Generated by stoke-benches: {locations} locations, {pools} pools, {routes} routes.");
    emit!(out);
    emit!(out, "[edge]");
    emit!(out, "location = \"{}\"", location_id(0));
    emit!(out, "http = \"127.0.0.1:8080\"");
    emit!(out, "admin = \"127.0.0.1:9901\"");
    emit!(out, "debug_headers = true");
    emit!(out, "threads = 2");
    emit!(out);

    for i in 0..locations {
        let (lat, lon) = location_coord(i);
        let name = CITIES.get(i).map_or_else(|| format!("Location {i}"), |c| c.1.to_owned());
        emit!(out, "[[location]]");
        emit!(out, "id = \"{}\"", location_id(i));
        emit!(out, "name = \"{name}\"");
        emit!(out, "lat = {lat:.2}");
        emit!(out, "lon = {lon:.2}");
        emit!(out);
    }

    // A few measured round trips, as a real file would have.
    for (a, b, ms) in [(0, 1, 9.0), (3, 4, 5.0), (7, 9, 92.0)] {
        if b < locations {
            emit!(out, "[[rtt]]");
            emit!(out, "between = [\"{}\", \"{}\"]", location_id(a), location_id(b));
            emit!(out, "ms = {ms:.1}");
            emit!(out);
        }
    }

    for p in 0..pools {
        let id = pool_id(p, locations);
        let serves: Vec<String> = pool_services(p).into_iter().map(|s| format!("\"{}\"", service_name(s))).collect();
        let replicas: Vec<String> = (0..REPLICAS_PER_POOL).map(|r| format!("\"{}\"", replica_addr(p, r))).collect();
        emit!(out, "[[pool]]");
        emit!(out, "id = \"{id}\"");
        emit!(out, "location = \"{}\"", location_id(p % locations.max(1)));
        emit!(out, "serves = [{}]", serves.join(", "));
        emit!(out, "replicas = [{}]", replicas.join(", "));
        emit!(out, "max_concurrency = {}", [16, 32, 8][p % 3]);
        emit!(out, "max_queue = 256");
        emit!(out, "health = {{ path = \"/health\", interval = \"1s\", timeout = \"500ms\" }}");
        if p % 2 == 0 {
            emit!(out, "load = {{ path = \"/metrics\", format = \"{}\", interval = \"1s\" }}", LOAD_FORMATS[p / 2 % 3]);
        }
        if p % 3 == 1 {
            emit!(out, "[pool.scale]");
            emit!(out, "idle_timeout = \"5m\"");
            emit!(out, "wake_time = \"{}s\"", 15 + p % 30);
            emit!(out, "wake = {{ url = \"http://127.0.0.1:7000/pools/{id}/wake\", timeout = \"5s\" }}");
            emit!(out, "sleep = {{ url = \"http://127.0.0.1:7000/pools/{id}/sleep\" }}");
        }
        emit!(out);
    }

    for r in 0..routes {
        emit!(out, "[[route]]");
        if r == 0 {
            emit!(out, "name = \"openai-any-host\"");
            emit!(out, "host = \"*\"");
            emit!(out, "path_prefix = \"/v1/\"");
            emit!(out, "service_from = \"body:model\"");
            emit!(out);
            continue;
        }
        let (g, k) = ((r - 1) / ROUTES_PER_HOST, (r - 1) % ROUTES_PER_HOST);
        emit!(out, "host = \"{}\"", group_host(g));
        emit!(out, "path_prefix = \"{}\"", route_prefix(k));
        match r % 3 {
            0 => {
                // A service some pool serves: one of pool (r mod pools)'s.
                let s = pool_services(r % pools.max(1))[0];
                emit!(out, "service = \"{}\"", service_name(s));
            }
            1 => emit!(out, "service_from = \"body:model\""),
            _ => emit!(out, "service_from = \"header:x-model\""),
        }
        if r % 4 == 0 {
            emit!(out, "max_wait = \"{}s\"", 10 + r % 50);
        }
        if k >= PREFIXES.len() && r % 2 == 0 {
            emit!(out, "strip_prefix = true");
        }
        if r % 7 == 0 {
            emit!(out, "name = \"route-{r}\"");
        }
        if r % 3 == 1 && r % 5 == 0 {
            emit!(out, "max_body_read = \"256KiB\"");
        }
        emit!(out);
    }
    out
}

/// Compile generated text as [`GENERATED_PATH`].
pub fn load(text: &str) -> Result<Network, ConfigError> {
    stoke_config::load_str(text, Path::new(GENERATED_PATH))
}

/// Mark every replica of every pool ready, as health probes would.
pub fn mark_ready(live: &Live) {
    for view in live.pools.iter() {
        for r in view.replicas.iter() {
            r.set_ready(true);
        }
    }
}

/// A router over [`generate_network`]`(locations, pools, routes)` for the
/// edge at the first location, with every replica ready.
pub fn ready_router(locations: usize, pools: usize, routes: usize) -> Result<Arc<Router>, ConfigError> {
    let snapshot = load(&generate_network(locations, pools, routes))?.for_edge(None)?;
    let router = Router::new(snapshot);
    mark_ready(&router.live());
    Ok(router)
}

/// A request host and path, for the route-match benches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `Host` header, as a client sends it (mixed case, with a port).
    pub host: String,
    /// Request path.
    pub path: String,
}

/// Requests that exercise each kind of route match in a generated network
/// of `routes` routes, taken from the middle of the host list.
#[derive(Clone, Debug)]
pub struct SampleRequests {
    /// Matches an exact host's `/v1/chat/` route.
    pub exact: Request,
    /// Matches a wildcard host's `/v1/chat/` route (`None` with fewer than
    /// three hosts).
    pub wildcard: Option<Request>,
    /// A host no route names: falls through every wildcard to the `*` route.
    pub fallback: Request,
}

/// [`SampleRequests`] for a network generated with `routes` routes.
pub fn sample_requests(routes: usize) -> SampleRequests {
    let groups = host_groups(routes).max(1);
    let middle = groups / 2;
    let exact = (0..=middle).rev().find(|&g| !is_wildcard_group(g)).unwrap_or(0);
    let wildcard = (0..groups.min(middle.max(2) + 1)).rev().find(|&g| is_wildcard_group(g));
    let path = "/v1/chat/completions".to_owned();
    SampleRequests {
        exact: Request { host: format!("{}:443", request_host(exact).to_ascii_uppercase()), path: path.clone() },
        wildcard: wildcard.map(|g| Request { host: format!("{}:443", request_host(g)), path: path.clone() }),
        fallback: Request { host: "unknown.example.org:443".to_owned(), path },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoke_config::{RouteId, ServiceSource};

    fn loads(locations: usize, pools: usize, routes: usize) -> Network {
        let text = generate_network(locations, pools, routes);
        match load(&text) {
            Ok(n) => n,
            Err(e) => panic!("generate_network({locations}, {pools}, {routes}) does not load:\n{e}"),
        }
    }

    #[test]
    fn large_network_loads() {
        let n = loads(10, 1000, 10_000);
        assert_eq!((n.locations.len(), n.pools.len(), n.routes.len()), (10, 1000, 10_000));
        assert_eq!(n.services.len(), SERVICES);
        assert!(n.pools.iter().all(|p| p.replicas.len() == REPLICAS_PER_POOL));
        assert!(n.pools.iter().any(|p| p.scale.is_some()));
        let kinds: [fn(&ServiceSource) -> bool; 3] = [
            |s| matches!(s, ServiceSource::Fixed(_)),
            |s| matches!(s, ServiceSource::BodyField(f) if f == "model"),
            |s| matches!(s, ServiceSource::Header(h) if h == "x-model"),
        ];
        for kind in kinds {
            assert!(n.routes.iter().filter(|r| kind(&r.service)).count() > 3000);
        }
    }

    #[test]
    fn small_network_loads_and_its_sample_requests_match() {
        let n = loads(10, 100, 50);
        assert_eq!((n.locations.len(), n.pools.len(), n.routes.len()), (10, 100, 50));
        let s = sample_requests(50);
        let wildcard = s.wildcard.expect("50 routes have a wildcard host");
        let chat = |id: Option<RouteId>| id.map(|id| n.route(id).path_prefix.as_str());
        assert_eq!(chat(n.route_table.find(&s.exact.host, &s.exact.path)), Some("/v1/chat/"));
        let w = n.route_table.find(&wildcard.host, &wildcard.path).expect("wildcard matches");
        assert!(n.route(w).host.to_string().starts_with("*."));
        assert_eq!(n.route_table.find(&s.fallback.host, &s.fallback.path), Some(RouteId(0)));
    }

    #[test]
    fn many_locations_are_valid_and_distinct() {
        let n = loads(200, 400, 20);
        let mut coords: Vec<(i64, i64)> =
            n.locations.iter().map(|l| ((l.coord.lat * 100.0) as i64, (l.coord.lon * 100.0) as i64)).collect();
        coords.sort_unstable();
        coords.dedup();
        assert_eq!(coords.len(), 200);
    }

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(generate_network(12, 30, 40), generate_network(12, 30, 40));
    }

    #[test]
    fn ready_router_has_every_replica_ready() {
        let router = ready_router(10, 20, 30).expect("loads");
        let live = router.live();
        assert!(live.pools.iter().all(|p| p.ready_count() == REPLICAS_PER_POOL));
    }
}
