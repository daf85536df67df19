//! Stage two: check every cross-reference and limit of the decoded file and
//! build the [`Network`]. Problems are collected, never returned early.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use stoke_geo::{Coord, RttMatrix, RttModel};

use crate::decode::{At, StringTable};
use crate::defaults;
use crate::diag::Diagnostics;
use crate::file::{
    FileConfig, RawAuth, RawCluster, RawEdge, RawHook, RawPool, RawRate, RawRoute, RawScale, RawTls, RawTracing,
};
use crate::routes::{HostPattern, RouteTable};
use crate::snapshot::{
    Affinity, AffinityKey, Auth, AuthHeader, ClusterSettings, EdgeSettings, HealthCheck, Hook, HookStep, HookToken,
    HookUrl, HookVar, HttpStep, IdleTimeout, LightSleep, LoadFormat, LoadReport, Location, LocationId, Network, Pool,
    PoolId, RateLimit, Route, Scale, Service, ServiceId, ServiceSource, Source, Template, TlsCert, TracingSettings,
};

/// Build the network from a decoded file. `base` is the directory that
/// relative paths (TLS files) are resolved against.
pub(crate) fn compile(diags: &mut Diagnostics, file: FileConfig, source: Source, base: &Path) -> Option<Network> {
    let (locations, location_index) = compile_locations(diags, &file);
    let rtt = compile_rtt(diags, &file, &locations, &location_index);
    let edge = compile_edge(diags, &file, &location_index, base);
    let cluster = file.cluster.as_ref().and_then(|c| compile_cluster(diags, c));
    let tracing = file.tracing.as_ref().and_then(|t| compile_tracing(diags, t));
    let tls = compile_tls(diags, &file.tls, base);
    if file.tls.is_empty() {
        if let Some(edge) = &file.edge {
            for (name, addr) in [("https", &edge.https), ("h3", &edge.h3)] {
                if let Some(addr) = addr {
                    diags.error(
                        addr.span.clone(),
                        format!("[edge].{name} needs a certificate: add a [[tls]] entry with hosts, cert and key"),
                    );
                }
            }
        }
    }

    let mut services: Vec<Service> = Vec::new();
    let mut service_index: HashMap<String, ServiceId> = HashMap::new();
    let mut pools = Vec::new();
    let mut pool_index = HashMap::new();
    for raw in &file.pools {
        if let Some(pool) =
            compile_pool(diags, raw, base, &location_index, &rtt, &locations, &mut services, &mut service_index)
        {
            let id = PoolId(pools.len() as u32);
            if pool_index.insert(pool.id.clone(), id).is_some() {
                if let Some(at) = &raw.id {
                    diags.error(
                        at.span.clone(),
                        format!("pool id \"{}\" is used twice; pool ids must be unique", pool.id),
                    );
                }
                continue;
            }
            for &s in &pool.services {
                services[s.index()].pools.push(id);
            }
            pools.push(pool);
        }
    }

    let mut routes = Vec::new();
    let mut seen_routes: HashMap<(HostPattern, String), ()> = HashMap::new();
    for raw in &file.routes {
        if let Some(route) = compile_route(diags, raw, &service_index, base) {
            if seen_routes.insert((route.host.clone(), route.path_prefix.clone()), ()).is_some() {
                diags.error(
                    raw.span.clone(),
                    format!(
                        "a route for host \"{}\" and path_prefix \"{}\" is defined twice; the pair must be unique",
                        route.host, route.path_prefix
                    ),
                );
                continue;
            }
            routes.push(route);
        }
    }

    if locations.is_empty() && file.locations.is_empty() {
        diags.error(0..0, "the file defines no [[location]]; at least one is needed");
    }
    if !diags.is_empty() {
        return None;
    }
    let edge = edge?;
    let route_table = RouteTable::new(routes.iter().map(|r| (&r.host, r.path_prefix.as_str())));
    Some(Network {
        source,
        edge,
        cluster,
        tracing,
        tls,
        locations,
        rtt,
        pools,
        services,
        routes,
        route_table,
        location_index,
        pool_index,
        service_index,
    })
}

fn compile_tracing(diags: &mut Diagnostics, raw: &RawTracing) -> Option<TracingSettings> {
    let mut ok = true;
    let endpoint = raw.endpoint.as_ref().and_then(|e| {
        let valid = parse_hook_url(&e.value).is_ok_and(|u| !u.tls);
        if !valid {
            diags.error(
                e.span.clone(),
                format!(
                    "[tracing].endpoint \"{}\" is not an OTLP/HTTP address; expected http://HOST:PORT/v1/traces (a collector beside the edge; https is not supported)",
                    e.value
                ),
            );
        }
        valid.then(|| e.value.clone())
    });
    ok &= endpoint.is_some();
    let sample = match &raw.sample {
        Some(s) if !(0.0..=1.0).contains(&s.value) => {
            diags.error(
                s.span.clone(),
                format!(
                    "[tracing].sample = {} is out of range; expected 0 to 1 (the share of requests that start a trace)",
                    s.value
                ),
            );
            ok = false;
            0.0
        }
        Some(s) => s.value,
        None => defaults::TRACING_SAMPLE,
    };
    let follow_parent = match raw.parent.as_ref().map(|p| (p.value.as_str(), p)) {
        None | Some(("follow", _)) => true,
        Some(("ignore", _)) => false,
        Some((other, p)) => {
            diags.error(
                p.span.clone(),
                format!("[tracing].parent = \"{other}\" is not known; expected \"follow\" (a client's sampled traceparent is recorded) or \"ignore\""),
            );
            ok = false;
            true
        }
    };
    let queue = match &raw.queue {
        Some(q) if q.value == 0 || q.value > 1 << 20 => {
            diags.error(
                q.span.clone(),
                format!("[tracing].queue = {} is out of range; expected 1 to 1048576 spans", q.value),
            );
            ok = false;
            0
        }
        Some(q) => q.value as usize,
        None => defaults::TRACING_QUEUE,
    };
    let mut fields = |table: &Option<At<StringTable>>, what: &str| {
        let mut out = Vec::new();
        for (name, value) in table.iter().flat_map(|t| &t.value) {
            let valid_name = !name.value.is_empty()
                && name.value.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid_name {
                diags.error(name.span.clone(), format!("[tracing].{what}: \"{}\" is not a header name", name.value));
                ok = false;
            } else if value.value.bytes().any(|b| b.is_ascii_control()) {
                diags.error(
                    value.span.clone(),
                    format!("[tracing].{what}.{}: the value has control characters", name.value),
                );
                ok = false;
            } else {
                out.push((name.value.to_ascii_lowercase(), value.value.clone()));
            }
        }
        out
    };
    let headers = fields(&raw.headers, "headers");
    let headers_env = fields(&raw.headers_env, "headers_env");
    let endpoint = endpoint?;
    ok.then_some(TracingSettings { endpoint, sample, follow_parent, queue, headers, headers_env })
}

fn compile_cluster(diags: &mut Diagnostics, raw: &RawCluster) -> Option<ClusterSettings> {
    let mut ok = true;
    let mut nats = Vec::new();
    if let Some(urls) = &raw.nats {
        if urls.value.is_empty() {
            diags.error(
                urls.span.clone(),
                "[cluster].nats is empty; give this edge's NATS server, such as [\"nats://127.0.0.1:4222\"]",
            );
            ok = false;
        }
        for url in &urls.value {
            let rest =
                url.value.strip_prefix("nats://").or_else(|| url.value.strip_prefix("tls://")).unwrap_or(&url.value);
            let host_port = rest.rsplit('@').next().unwrap_or(rest);
            let port_ok = host_port.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok || host_port.contains('/') {
                diags.error(
                    url.span.clone(),
                    format!(
                        "[cluster].nats: \"{}\" is not a NATS server address; expected nats://HOST:PORT",
                        url.value
                    ),
                );
                ok = false;
            } else {
                nats.push(url.value.clone());
            }
        }
    } else {
        ok = false;
    }
    let name = match &raw.name {
        Some(n) if n.value.len() > 64 || !subject_token(&n.value) => {
            diags.error(
                n.span.clone(),
                format!("[cluster].name \"{}\" must be 1 to 64 letters, digits, '-' or '_': it prefixes NATS subjects and bucket names", n.value),
            );
            ok = false;
            String::new()
        }
        Some(n) => n.value.clone(),
        None => defaults::CLUSTER_NAME.to_owned(),
    };
    let timeout = match &raw.timeout {
        Some(t) if t.value.is_zero() || t.value > std::time::Duration::from_secs(10) => {
            diags.error(
                t.span.clone(),
                format!(
                    "[cluster].timeout = {:?} is out of range; expected 1ms to 10s (it bounds how long a cluster call may delay a decision)",
                    t.value
                ),
            );
            ok = false;
            defaults::CLUSTER_TIMEOUT
        }
        Some(t) => t.value,
        None => defaults::CLUSTER_TIMEOUT,
    };
    let domain = match &raw.domain {
        Some(d) if !subject_token(&d.value) => {
            diags.error(
                d.span.clone(),
                format!("[cluster].domain \"{}\" must be letters, digits, '-' or '_': the JetStream domain of the hub cluster", d.value),
            );
            ok = false;
            None
        }
        Some(d) => Some(d.value.clone()),
        None => None,
    };
    let _ = &raw.span;
    ok.then_some(ClusterSettings { nats, name, timeout, domain })
}

/// Letters, digits, `-` and `_`, at least one: safe in a NATS subject, a
/// bucket name and a JetStream domain.
fn subject_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn check_id(diags: &mut Diagnostics, what: &str, at: &At<String>) -> bool {
    if valid_id(&at.value) {
        return true;
    }
    diags.error(
        at.span.clone(),
        format!("{what} id \"{}\" is not valid; use 1 to 128 letters, digits, '-', '_' or '.'", at.value),
    );
    false
}

fn compile_locations(diags: &mut Diagnostics, file: &FileConfig) -> (Vec<Location>, HashMap<String, LocationId>) {
    let mut locations = Vec::new();
    let mut index = HashMap::new();
    for raw in &file.locations {
        let (Some(id), Some(lat), Some(lon)) = (&raw.id, &raw.lat, &raw.lon) else {
            continue;
        };
        check_id(diags, "location", id);
        if !(-90.0..=90.0).contains(&lat.value) {
            diags.error(lat.span.clone(), format!("lat {} is out of range; expected -90 to 90 degrees", lat.value));
        }
        if !(-180.0..=180.0).contains(&lon.value) {
            diags.error(lon.span.clone(), format!("lon {} is out of range; expected -180 to 180 degrees", lon.value));
        }
        if index.contains_key(&id.value) {
            diags.error(
                id.span.clone(),
                format!("location id \"{}\" is used twice; location ids must be unique", id.value),
            );
            continue;
        }
        if locations.len() >= usize::from(u16::MAX) {
            diags.error(id.span.clone(), "too many locations; at most 65535 are supported");
            continue;
        }
        // A location with a bad id or coordinate is still registered, so
        // that pools naming it are not reported as well; the file is
        // rejected anyway.
        index.insert(id.value.clone(), LocationId(locations.len() as u16));
        locations.push(Location {
            id: id.value.clone(),
            name: raw.name.as_ref().map_or_else(|| id.value.clone(), |n| n.value.clone()),
            coord: Coord::new(lat.value.clamp(-90.0, 90.0), lon.value.clamp(-180.0, 180.0)),
            edge: raw.edge.as_ref().map_or(defaults::LOCATION_EDGE, |e| e.value),
        });
    }
    (locations, index)
}

fn lookup_location(
    diags: &mut Diagnostics,
    index: &HashMap<String, LocationId>,
    at: &At<String>,
    what: &str,
) -> Option<LocationId> {
    let found = index.get(&at.value).copied();
    if found.is_none() {
        let mut known: Vec<&str> = index.keys().map(String::as_str).collect();
        known.sort_unstable();
        diags.error(
            at.span.clone(),
            format!(
                "{what} \"{}\" is not a location; known locations: {}",
                at.value,
                if known.is_empty() { "(none)".to_owned() } else { known.join(", ") }
            ),
        );
    }
    found
}

fn compile_rtt(
    diags: &mut Diagnostics,
    file: &FileConfig,
    locations: &[Location],
    index: &HashMap<String, LocationId>,
) -> RttMatrix {
    let coords: Vec<Coord> = locations.iter().map(|l| l.coord).collect();
    let mut matrix = RttMatrix::estimate(&coords, &RttModel::default());
    for raw in &file.rtt {
        let (Some(between), Some(ms)) = (&raw.between, &raw.ms) else {
            continue;
        };
        if between.value.len() != 2 {
            diags.error(
                between.span.clone(),
                format!(
                    "between must name exactly two locations, such as [\"fra\", \"par\"]; found {}",
                    between.value.len()
                ),
            );
            continue;
        }
        let a = lookup_location(diags, index, &between.value[0], "[[rtt]] names");
        let b = lookup_location(diags, index, &between.value[1], "[[rtt]] names");
        if !(ms.value > 0.0 && ms.value <= 10_000.0) {
            diags.error(
                ms.span.clone(),
                format!("ms = {} is out of range; expected more than 0 and at most 10000", ms.value),
            );
            continue;
        }
        if let (Some(a), Some(b)) = (a, b) {
            if a == b {
                diags.error(between.span.clone(), "between must name two different locations");
                continue;
            }
            matrix.set(a.index(), b.index(), std::time::Duration::from_secs_f64(ms.value / 1000.0));
        }
    }
    matrix
}

fn compile_edge(
    diags: &mut Diagnostics,
    file: &FileConfig,
    locations: &HashMap<String, LocationId>,
    base: &Path,
) -> Option<EdgeSettings> {
    let admin_default: SocketAddr = defaults::ADMIN.parse().ok()?;
    let no_edge = RawEdge::default();
    let raw = file.edge.as_ref().unwrap_or(&no_edge);
    if let Some(loc) = &raw.location {
        lookup_location(diags, locations, loc, "[edge].location");
    }
    // TCP listeners must not share an address; h3 is UDP and may share the https port.
    let mut tcp: Vec<(&str, &At<SocketAddr>)> = Vec::new();
    for (name, addr) in [("http", &raw.http), ("https", &raw.https), ("admin", &raw.admin)] {
        if let Some(addr) = addr {
            // Port 0 asks the OS for a free port: never a clash.
            if let Some((other, _)) = tcp.iter().find(|(_, a)| a.value == addr.value && addr.value.port() != 0) {
                diags.error(
                    addr.span.clone(),
                    format!("[edge].{name} uses {} which [edge].{other} already uses; each TCP listener needs its own address", addr.value),
                );
            }
            tcp.push((name, addr));
        }
    }
    if let Some(env) = &raw.admin_token_env {
        if !valid_env_name(&env.value) {
            diags.error(
                env.span.clone(),
                format!(
                    "admin_token_env \"{}\" is not an environment variable name; use letters, digits and '_'",
                    env.value
                ),
            );
        }
    }
    let threads = match &raw.threads {
        Some(t) if t.value > 1024 => {
            diags
                .error(t.span.clone(), format!("threads = {} is too many; expected 0 (one per core) to 1024", t.value));
            defaults::THREADS
        }
        Some(t) => t.value as usize,
        None => defaults::THREADS,
    };
    Some(EdgeSettings {
        location: raw.location.as_ref().map(|l| l.value.clone()),
        http: raw.http.as_ref().map(|a| a.value),
        https: raw.https.as_ref().map(|a| a.value),
        h3: raw.h3.as_ref().map(|a| a.value),
        admin: raw.admin.as_ref().map_or(admin_default, |a| a.value),
        admin_token_env: raw.admin_token_env.as_ref().map(|e| e.value.clone()),
        debug_headers: raw.debug_headers.as_ref().map_or(defaults::DEBUG_HEADERS, |d| d.value),
        threads,
        drain_timeout: raw.drain_timeout.as_ref().map_or(defaults::DRAIN_TIMEOUT, |d| d.value),
        client_header_timeout: whole_seconds(
            diags,
            &raw.client_header_timeout,
            "client_header_timeout",
            defaults::CLIENT_HEADER_TIMEOUT,
        ),
        keepalive_timeout: whole_seconds(
            diags,
            &raw.keepalive_timeout,
            "keepalive_timeout",
            defaults::KEEPALIVE_TIMEOUT,
        ),
        max_connections: bounded(diags, &raw.max_connections, "max_connections", defaults::MAX_CONNECTIONS, 1, 1 << 24)
            as usize,
        max_header_bytes: bounded(
            diags,
            &raw.max_header_bytes,
            "max_header_bytes",
            defaults::MAX_HEADER_BYTES,
            1024,
            1 << 20,
        ) as usize,
        max_headers: bounded(diags, &raw.max_headers, "max_headers", defaults::MAX_HEADERS, 8, 256) as usize,
        max_buffered_bodies: bounded(
            diags,
            &raw.max_buffered_bodies,
            "max_buffered_bodies",
            defaults::MAX_BUFFERED_BODIES,
            1 << 20,
            1 << 40,
        ),
        h3_idle_timeout: nonzero_duration(diags, &raw.h3_idle_timeout, "h3_idle_timeout", defaults::H3_IDLE_TIMEOUT),
        h3_max_streams: bounded(diags, &raw.h3_max_streams, "h3_max_streams", defaults::H3_MAX_STREAMS, 1, 10_000)
            as u32,
        measure_rtt: raw.measure_rtt.as_ref().map_or(defaults::MEASURE_RTT, |m| m.value),
        upgrade_socket: raw.upgrade_socket.as_ref().and_then(|at| upgrade_socket(diags, at, base)),
    })
}

/// `[edge].upgrade_socket`, resolved against the config file's directory.
/// A Unix socket's path has room for 107 bytes (`sun_path`).
fn upgrade_socket(diags: &mut Diagnostics, at: &At<String>, base: &Path) -> Option<PathBuf> {
    if at.value.is_empty() {
        diags.error(at.span.clone(), "upgrade_socket must be a path, such as \"/run/stoke/upgrade.sock\"");
        return None;
    }
    let path = base.join(&at.value);
    let len = path.as_os_str().len();
    if len > MAX_UNIX_PATH {
        diags.error(
            at.span.clone(),
            format!(
                "upgrade_socket resolves to {} ({len} bytes); a Unix socket path has at most {MAX_UNIX_PATH}: use a shorter or absolute path",
                path.display()
            ),
        );
        return None;
    }
    Some(path)
}

/// The longest path a Unix socket can be bound to (`sun_path` less its NUL).
const MAX_UNIX_PATH: usize = 107;

/// A number within `min..=max`; out of range is a problem naming the range.
fn bounded(diags: &mut Diagnostics, at: &Option<At<u64>>, key: &str, default: u64, min: u64, max: u64) -> u64 {
    match at {
        None => default,
        Some(at) if (min..=max).contains(&at.value) => at.value,
        Some(at) => {
            diags.error(at.span.clone(), format!("{key} = {} is out of range; expected {min} to {max}", at.value));
            default
        }
    }
}

/// A duration of at least one second, in whole seconds (the HTTP/1.1
/// server counts keep-alive in seconds).
fn whole_seconds(
    diags: &mut Diagnostics,
    at: &Option<At<std::time::Duration>>,
    key: &str,
    default: std::time::Duration,
) -> std::time::Duration {
    match at {
        None => default,
        Some(at) if at.value.as_secs() >= 1 && at.value.subsec_nanos() == 0 => at.value,
        Some(at) => {
            diags.error(
                at.span.clone(),
                format!("{key} must be a whole number of seconds, 1s or more, such as \"10s\""),
            );
            default
        }
    }
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn compile_tls(diags: &mut Diagnostics, raws: &[RawTls], base: &Path) -> Vec<TlsCert> {
    let mut out = Vec::new();
    for raw in raws {
        let mut hosts = Vec::new();
        if let Some(list) = &raw.hosts {
            if list.value.is_empty() {
                diags.error(list.span.clone(), "hosts must name at least one host, such as [\"api.example.com\"]");
            }
            for h in &list.value {
                match HostPattern::parse(&h.value) {
                    Ok(p) => hosts.push(p),
                    Err(msg) => diags.error(h.span.clone(), msg),
                }
            }
        }
        let chain = raw.cert.as_ref().and_then(|c| read_certs(diags, base, c));
        let key = raw.key.as_ref().and_then(|k| read_key(diags, base, k));
        if let (Some((cert_path, chain)), Some((key_path, key))) = (chain, key) {
            out.push(TlsCert { hosts, cert_path, key_path, chain, key });
        }
    }
    out
}

fn read_certs(
    diags: &mut Diagnostics,
    base: &Path,
    at: &At<String>,
) -> Option<(std::path::PathBuf, Vec<CertificateDer<'static>>)> {
    let path = base.join(&at.value);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            diags.error(at.span.clone(), format!("cert \"{}\" cannot be read: {e}; expected a PEM certificate chain (paths are relative to the config file)", path.display()));
            return None;
        }
    };
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Some((path, certs)),
        Ok(_) => {
            diags.error(
                at.span.clone(),
                format!(
                    "cert \"{}\" holds no certificate; expected a PEM file with \"-----BEGIN CERTIFICATE-----\" blocks",
                    path.display()
                ),
            );
            None
        }
        Err(e) => {
            diags.error(
                at.span.clone(),
                format!("cert \"{}\" is not a valid PEM certificate chain: {e}", path.display()),
            );
            None
        }
    }
}

fn read_key(
    diags: &mut Diagnostics,
    base: &Path,
    at: &At<String>,
) -> Option<(std::path::PathBuf, PrivateKeyDer<'static>)> {
    let path = base.join(&at.value);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            diags.error(at.span.clone(), format!("key \"{}\" cannot be read: {e}; expected a PEM private key (paths are relative to the config file)", path.display()));
            return None;
        }
    };
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Some((path, key)),
        Err(e) => {
            diags.error(
                at.span.clone(),
                format!("key \"{}\" is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}", path.display()),
            );
            None
        }
    }
}

fn positive(diags: &mut Diagnostics, at: &Option<At<u64>>, key: &str, default: u32) -> u32 {
    match at {
        None => default,
        Some(at) if at.value == 0 => {
            diags.error(at.span.clone(), format!("{key} = 0 would never admit a request; expected 1 or more"));
            default
        }
        Some(at) if at.value > u64::from(u32::MAX) => {
            diags.error(at.span.clone(), format!("{key} = {} is too large; expected at most {}", at.value, u32::MAX));
            default
        }
        Some(at) => at.value as u32,
    }
}

fn nonzero_duration(
    diags: &mut Diagnostics,
    at: &Option<At<std::time::Duration>>,
    what: &str,
    default: std::time::Duration,
) -> std::time::Duration {
    match at {
        Some(at) if at.value.is_zero() => {
            diags.error(at.span.clone(), format!("{what} must be longer than zero"));
            default
        }
        Some(at) => at.value,
        None => default,
    }
}

fn path_value(diags: &mut Diagnostics, at: &Option<At<String>>, what: &str, default: &str) -> String {
    match at {
        Some(at) if !at.value.starts_with('/') || at.value.bytes().any(|b| b.is_ascii_control() || b == b' ') => {
            diags.error(
                at.span.clone(),
                format!("{what} \"{}\" must be a path starting with '/', such as \"{default}\"", at.value),
            );
            default.to_owned()
        }
        Some(at) => at.value.clone(),
        None => default.to_owned(),
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_pool(
    diags: &mut Diagnostics,
    raw: &RawPool,
    base: &Path,
    locations: &HashMap<String, LocationId>,
    rtt: &RttMatrix,
    location_list: &[Location],
    services: &mut Vec<Service>,
    service_index: &mut HashMap<String, ServiceId>,
) -> Option<Pool> {
    let id = raw.id.as_ref()?;
    let id_ok = check_id(diags, "pool", id);
    let location = raw.location.as_ref().and_then(|l| lookup_location(diags, locations, l, "pool location"));

    let mut pool_services = Vec::new();
    if let Some(serves) = &raw.serves {
        if serves.value.is_empty() {
            diags.error(
                serves.span.clone(),
                "serves must name at least one service (model), such as [\"llama-3.1-8b\"]",
            );
        }
        for s in &serves.value {
            if s.value.is_empty() || s.value.len() > 256 || s.value.bytes().any(|b| b.is_ascii_control()) {
                diags.error(s.span.clone(), "a service name must be 1 to 256 printable characters");
                continue;
            }
            let next = ServiceId(services.len() as u32);
            let sid = *service_index.entry(s.value.clone()).or_insert_with(|| {
                services.push(Service { name: s.value.clone(), pools: Vec::new() });
                next
            });
            if pool_services.contains(&sid) {
                diags.error(s.span.clone(), format!("service \"{}\" is listed twice in serves", s.value));
            } else {
                pool_services.push(sid);
            }
        }
    }

    let mut replicas = Vec::new();
    if let Some(list) = &raw.replicas {
        if list.value.is_empty() {
            diags.error(list.span.clone(), "replicas must list at least one address, such as [\"10.1.0.5:8000\"]");
        }
        for r in &list.value {
            match crate::decode::parse_addr(&r.value) {
                Some(addr) if replicas.contains(&addr) => {
                    diags.error(r.span.clone(), format!("replica {addr} is listed twice"));
                }
                Some(addr) => replicas.push(addr),
                None => diags.error(
                    r.span.clone(),
                    format!("replica \"{}\" is not an address; expected IP:PORT such as \"10.1.0.5:8000\"", r.value),
                ),
            }
        }
    }

    let max_concurrency = positive(diags, &raw.max_concurrency, "max_concurrency", defaults::MAX_CONCURRENCY);
    let max_queue = positive(diags, &raw.max_queue, "max_queue", defaults::MAX_QUEUE);
    let connect_timeout = nonzero_duration(diags, &raw.connect_timeout, "connect_timeout", defaults::CONNECT_TIMEOUT);
    let read_timeout = nonzero_duration(diags, &raw.read_timeout, "read_timeout", defaults::READ_TIMEOUT);

    let mut health = HealthCheck {
        path: path_value(diags, &raw.health.path, "health path", defaults::HEALTH_PATH),
        interval: nonzero_duration(diags, &raw.health.interval, "health interval", defaults::HEALTH_INTERVAL),
        timeout: nonzero_duration(diags, &raw.health.timeout, "health timeout", defaults::HEALTH_TIMEOUT),
        sleeping_path: None,
    };
    if let Some(t) = &raw.health.timeout {
        if health.timeout > health.interval {
            diags.error(
                t.span.clone(),
                format!(
                    "health timeout ({}) is longer than the interval ({}): a probe would outlast its turn; make the timeout shorter",
                    crate::duration::format_duration(health.timeout),
                    crate::duration::format_duration(health.interval)
                ),
            );
        }
    }

    let load = raw.load.as_ref().map(|l| LoadReport {
        path: path_value(diags, &l.path, "load path", defaults::LOAD_PATH),
        format: match l.format.as_ref().map(|f| f.value.as_str()).unwrap_or(defaults::LOAD_FORMAT) {
            "vllm" => LoadFormat::Vllm,
            "tgi" => LoadFormat::Tgi,
            "sglang" => LoadFormat::Sglang,
            other => {
                if let Some(f) = &l.format {
                    diags.error(
                        f.span.clone(),
                        format!("load format \"{other}\" is not known; expected \"vllm\", \"tgi\" or \"sglang\""),
                    );
                }
                LoadFormat::Vllm
            }
        },
        interval: nonzero_duration(diags, &l.interval, "load interval", defaults::LOAD_INTERVAL),
    });

    let scale = raw.scale.as_ref().and_then(|s| {
        let wake = s.wake.as_ref().and_then(|h| compile_hook(diags, h, "wake", base));
        let sleep = s.sleep.as_ref().and_then(|h| compile_hook(diags, h, "sleep", base));
        let idle_timeout = compile_idle(diags, s);
        let wake_time = nonzero_duration(diags, &s.wake_time, "wake_time", defaults::WAKE_TIME);
        let light = compile_light(diags, s, idle_timeout, base, &id.value);
        health.sleeping_path = light.as_ref().and_then(|l| l.probe.clone());
        Some(Scale { idle_timeout, wake_time, wake: wake?, sleep, light })
    });

    if let (Some(IdleTimeout::Auto { .. }), None) = (scale.as_ref().map(|s| s.idle_timeout), &load) {
        if let Some(at) = raw.scale.as_ref().and_then(|s| s.idle_timeout.as_ref()) {
            diags.error(
                at.span.clone(),
                "idle_timeout = \"auto\" needs load = { … } on the pool: the home edge learns the pool's idle gaps from every edge's requests, and sees the others' only in the load its replicas report".to_owned(),
            );
        }
    }

    let affinity = raw.affinity.as_ref().and_then(|a| compile_affinity(diags, a));

    let location = location?;
    if !id_ok || raw.serves.is_none() || raw.replicas.is_none() {
        return None;
    }
    let home_edge = if location_list[location.index()].edge {
        location
    } else {
        let edges = location_list.iter().enumerate().filter(|(_, l)| l.edge).map(|(i, _)| i);
        match rtt.nearest(location.index(), edges) {
            Some(i) => LocationId(i as u16),
            None => {
                diags.error(
                    raw.span.clone(),
                    "no location runs an edge, so this pool has no home edge; set edge = true on a [[location]]",
                );
                return None;
            }
        }
    };
    Some(Pool {
        id: id.value.clone(),
        location,
        home_edge,
        services: pool_services,
        replicas,
        max_concurrency,
        max_queue,
        connect_timeout,
        read_timeout,
        health,
        load,
        scale,
        affinity,
    })
}

fn compile_affinity(diags: &mut Diagnostics, raw: &crate::file::RawAffinity) -> Option<Affinity> {
    let key = match &raw.key {
        None => {
            diags.error(raw.span.clone(), "[pool.affinity] needs key = \"prefix\", \"header:NAME\" or \"body:FIELD\"");
            return None;
        }
        Some(at) => match at.value.split_once(':') {
            None if at.value == "prefix" => AffinityKey::Prefix,
            Some(("header", name)) if !name.is_empty() && http_token(name) => {
                AffinityKey::Header(name.to_ascii_lowercase())
            }
            Some(("body", field)) if !field.is_empty() => AffinityKey::BodyField(field.to_owned()),
            _ => {
                diags.error(
                    at.span.clone(),
                    format!(
                        "affinity key \"{}\" is not understood; expected \"prefix\", \"header:NAME\" or \"body:FIELD\"",
                        at.value
                    ),
                );
                return None;
            }
        },
    };
    let prefix_bytes = match &raw.prefix_bytes {
        Some(at) if !(64..=1 << 20).contains(&at.value) => {
            diags.error(
                at.span.clone(),
                format!("prefix_bytes = {} is out of range; expected 64 bytes to 1MiB", at.value),
            );
            defaults::AFFINITY_PREFIX_BYTES
        }
        Some(at) => at.value,
        None => defaults::AFFINITY_PREFIX_BYTES,
    } as usize;
    let max_load = match &raw.max_load {
        Some(at) if !(at.value >= 1.0 && at.value <= 100.0) => {
            diags.error(
                at.span.clone(),
                format!("max_load = {} is out of range; expected 1 (no imbalance) to 100", at.value),
            );
            defaults::AFFINITY_MAX_LOAD
        }
        Some(at) => at.value,
        None => defaults::AFFINITY_MAX_LOAD,
    };
    Some(Affinity { key, prefix_bytes, max_load })
}

/// Whether `s` is a valid header field name (RFC 9110 token).
fn http_token(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn compile_hook(diags: &mut Diagnostics, raw: &RawHook, which: &str, base: &Path) -> Option<Hook> {
    let Some(steps) = &raw.steps else {
        return compile_step(diags, raw, which, base).map(Hook::one);
    };
    let stray = [
        raw.url.as_ref().map(|a| a.span.clone()),
        raw.command.as_ref().map(|a| a.span.clone()),
        raw.method.as_ref().map(|a| a.span.clone()),
        raw.headers.as_ref().map(|a| a.span.clone()),
        raw.body.as_ref().map(|a| a.span.clone()),
        raw.token_env.as_ref().map(|a| a.span.clone()),
        raw.token_file.as_ref().map(|a| a.span.clone()),
        raw.token_header.as_ref().map(|a| a.span.clone()),
        raw.ca_file.as_ref().map(|a| a.span.clone()),
        raw.timeout.as_ref().map(|a| a.span.clone()),
    ];
    for span in stray.into_iter().flatten() {
        diags.error(
            span,
            format!("the {which} hook has steps; this key belongs in a step (steps = [ {{ url = … }}, … ])"),
        );
    }
    if steps.value.is_empty() {
        diags.error(steps.span.clone(), format!("the {which} hook's steps are empty; give at least one"));
        return None;
    }
    let compiled: Vec<Option<HookStep>> = steps
        .value
        .iter()
        .enumerate()
        .map(|(i, s)| compile_step(diags, s, &format!("{which} hook's step {}", i + 1), base))
        .collect();
    compiled.into_iter().collect::<Option<Vec<_>>>().map(|steps| Hook { steps })
}

/// `[pool.scale.light]` and the `light_*` keys beside it.
fn compile_light(
    diags: &mut Diagnostics,
    s: &RawScale,
    deep: IdleTimeout,
    base: &Path,
    pool: &str,
) -> Option<LightSleep> {
    let Some(raw) = &s.light else {
        let strays = [
            ("light_timeout", s.light_timeout.as_ref().map(|a| a.span.clone())),
            ("light_wake_time", s.light_wake_time.as_ref().map(|a| a.span.clone())),
            ("light_cost", s.light_cost.as_ref().map(|a| a.span.clone())),
        ];
        for (key, span) in strays {
            if let Some(span) = span {
                diags.error(
                    span,
                    format!(
                        "{key} needs a light depth: light = {{ kind = \"vllm\" }} or light = {{ sleep = …, wake = … }}"
                    ),
                );
            }
        }
        return None;
    };
    let (sleep, wake, probe) = match (&raw.kind, &raw.sleep, &raw.wake) {
        (Some(kind), None, None) => {
            if kind.value != "vllm" {
                diags.error(kind.span.clone(), format!("light kind \"{}\" is not known; expected \"vllm\" (vLLM's sleep mode), or give sleep and wake hooks", kind.value));
                return None;
            }
            if let Some(p) = &raw.probe {
                diags.error(p.span.clone(), "kind = \"vllm\" probes /is_sleeping itself; probe is for light hooks");
            }
            let level = match &raw.level {
                None => 1,
                Some(at) if at.value == 1 || at.value == 2 => at.value,
                Some(at) => {
                    diags.error(at.span.clone(), format!("level = {} is not a vLLM sleep level; expected 1 (weights kept in CPU memory) or 2 (weights dropped)", at.value));
                    return None;
                }
            };
            let (sleep, wake) = vllm_light_hooks(level);
            (sleep, wake, Some("/is_sleeping".to_owned()))
        }
        (None, Some(sleep), Some(wake)) => {
            if let Some(l) = &raw.level {
                diags.error(l.span.clone(), "level goes with kind = \"vllm\"; light hooks say their own level");
            }
            let sleep = compile_hook(diags, sleep, "light sleep", base);
            let wake = compile_hook(diags, wake, "light wake", base);
            let probe = raw.probe.as_ref().map(|p| path_value(diags, &Some(p.clone()), "light probe", "/is_sleeping"));
            let (sleep, wake) = (sleep?, wake?);
            for (which, hook) in [("sleep", &sleep), ("wake", &wake)] {
                if !hook.per_replica() {
                    diags.error(raw.span.clone(), format!("the light {which} hook of pool \"{pool}\" must name {{replica}}: a light sleep is each replica's own (e.g. url = \"http://{{replica}}/sleep?level=1\")"));
                }
            }
            (sleep, wake, probe)
        }
        (Some(kind), _, _) => {
            diags.error(kind.span.clone(), "give light kind = \"vllm\" or light sleep and wake hooks, not both");
            return None;
        }
        (None, _, _) => {
            diags.error(raw.span.clone(), "light needs kind = \"vllm\", or both sleep = { … } and wake = { … } hooks");
            return None;
        }
    };
    let idle_timeout = match (&s.light_timeout, deep) {
        (Some(At { value: Some(d), span }), _) => {
            let d = nonzero_duration(diags, &Some(At::new(*d, span.clone())), "light_timeout", defaults::LIGHT_TIMEOUT);
            if let IdleTimeout::Fixed(deep) = deep {
                if d >= deep && s.sleep.is_some() {
                    diags.error(
                        span.clone(),
                        format!(
                            "light_timeout ({}) must be shorter than idle_timeout ({}): the light sleep comes first",
                            crate::duration::format_duration(d),
                            crate::duration::format_duration(deep)
                        ),
                    );
                }
            }
            IdleTimeout::Fixed(d)
        }
        (Some(At { value: None, span }), IdleTimeout::Fixed(_)) => {
            diags.error(
                span.clone(),
                "light_timeout = \"auto\" needs idle_timeout = \"auto\": both windows are chosen together",
            );
            IdleTimeout::Fixed(defaults::LIGHT_TIMEOUT)
        }
        (None, IdleTimeout::Fixed(deep)) => IdleTimeout::Fixed(defaults::LIGHT_TIMEOUT.min(deep / 2)),
        (_, auto) => light_bounds(auto),
    };
    let wake_time = nonzero_duration(diags, &s.light_wake_time, "light_wake_time", defaults::LIGHT_WAKE_TIME);
    let cost = match &s.light_cost {
        None => defaults::LIGHT_COST,
        Some(at) if at.value > 0.0 && at.value < 1.0 => at.value,
        Some(at) => {
            diags.error(
                at.span.clone(),
                format!(
                    "light_cost = {} is out of range; expected a share of an awake replica's cost, above 0 and below 1",
                    at.value
                ),
            );
            defaults::LIGHT_COST
        }
    };
    Some(LightSleep { sleep, wake, probe, idle_timeout, wake_time, cost })
}

/// The bounds of `light_timeout = "auto"` under the deep window's rule:
/// `max_idle` above, and below `min_idle` or [`defaults::LIGHT_MIN_IDLE`],
/// whichever is shorter (a light wake is cheap, so a short pause may
/// already be worth sleeping through lightly).
pub fn light_bounds(deep: IdleTimeout) -> IdleTimeout {
    match deep {
        IdleTimeout::Auto { min, max } => IdleTimeout::Auto { min: min.min(defaults::LIGHT_MIN_IDLE), max },
        fixed => fixed,
    }
}

/// vLLM's sleep mode as light sleep and wake hooks, per replica: level 1
/// keeps the weights in CPU memory; level 2 drops them, so its wake
/// reloads them before the KV cache comes back.
pub fn vllm_light_hooks(level: u64) -> (Hook, Hook) {
    let step = |path: &str, body: &str| {
        HookStep::Http(HttpStep {
            url: Template::parse(&format!("http://{{replica}}{path}")).unwrap_or_else(|_| unreachable!()),
            method: "POST".to_owned(),
            headers: Vec::new(),
            body: Some(Template::parse(body).unwrap_or_else(|_| unreachable!())),
            token: None,
            token_header: None,
            ca_file: None,
            timeout: defaults::VLLM_SLEEP_TIMEOUT,
        })
    };
    let sleep = Hook::one(step(&format!("/sleep?level={level}"), ""));
    let wake = if level == 1 {
        Hook::one(step("/wake_up", ""))
    } else {
        Hook {
            steps: vec![
                step("/wake_up?tags=weights", ""),
                step("/collective_rpc", r#"{"method":"reload_weights"}"#),
                step("/wake_up?tags=kv_cache", ""),
            ],
        }
    };
    (sleep, wake)
}

/// Values a template is tried with when the config is loaded, so that a
/// URL that cannot be right is found then and not at the first wake.
fn sample_value(var: HookVar) -> &'static str {
    match var {
        HookVar::Pool => "pool",
        HookVar::Edge => "edge",
        HookVar::Action => "wake",
        HookVar::Reason => "request",
        HookVar::Replicas => "1",
        HookVar::Depth => "deep",
        HookVar::Replica => "127.0.0.1:8000",
    }
}

fn template(diags: &mut Diagnostics, at: &At<String>, what: &str) -> Option<Template> {
    Template::parse(&at.value).map_err(|e| diags.error(at.span.clone(), format!("{what} \"{}\": {e}", at.value))).ok()
}

const HOOK_METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

fn compile_step(diags: &mut Diagnostics, raw: &RawHook, which: &str, base: &Path) -> Option<HookStep> {
    let timeout = nonzero_duration(diags, &raw.timeout, &format!("{which} timeout"), defaults::HOOK_TIMEOUT);
    match (&raw.url, &raw.command) {
        (Some(url), None) => compile_http_step(diags, raw, url, which, base, timeout),
        (None, Some(cmd)) => {
            if cmd.value.is_empty() || cmd.value[0].value.is_empty() {
                diags.error(
                    cmd.span.clone(),
                    "command must name a program, such as [\"/usr/local/bin/wake-pool\", \"fra-h100\"]",
                );
                return None;
            }
            let url_only = [
                ("token_env", raw.token_env.as_ref().map(|a| a.span.clone())),
                ("token_file", raw.token_file.as_ref().map(|a| a.span.clone())),
                ("token_header", raw.token_header.as_ref().map(|a| a.span.clone())),
                ("ca_file", raw.ca_file.as_ref().map(|a| a.span.clone())),
                ("method", raw.method.as_ref().map(|a| a.span.clone())),
                ("headers", raw.headers.as_ref().map(|a| a.span.clone())),
                ("body", raw.body.as_ref().map(|a| a.span.clone())),
            ];
            for (key, span) in url_only {
                if let Some(span) = span {
                    diags.error(
                        span,
                        format!("{key} applies to url hooks only; a command gets its environment from stoke's"),
                    );
                }
            }
            let argv: Vec<Option<Template>> =
                cmd.value.iter().map(|a| template(diags, a, &format!("{which} command argument"))).collect();
            Some(HookStep::Command { argv: argv.into_iter().collect::<Option<_>>()?, timeout })
        }
        (Some(url), Some(_)) => {
            diags.error(url.span.clone(), format!("the {which} has both url and command; give one"));
            None
        }
        (None, None) => {
            diags.error(
                raw.span.clone(),
                format!(
                    "the {which} needs url = \"http://…\" (a webhook) or command = [\"program\", \"arg\"], or steps = [ … ]"
                ),
            );
            None
        }
    }
}

fn compile_http_step(
    diags: &mut Diagnostics,
    raw: &RawHook,
    url: &At<String>,
    which: &str,
    base: &Path,
    timeout: std::time::Duration,
) -> Option<HookStep> {
    let url_t = template(diags, url, &format!("{which} url"))?;
    let parsed = match parse_hook_url(&url_t.render(sample_value)) {
        Ok(p) => p,
        Err(msg) => {
            diags.error(url.span.clone(), msg);
            return None;
        }
    };
    let method = match &raw.method {
        None => "POST".to_owned(),
        Some(m) => {
            let upper = m.value.to_ascii_uppercase();
            if !HOOK_METHODS.contains(&upper.as_str()) {
                diags.error(
                    m.span.clone(),
                    format!(
                        "method \"{}\" is not one stoke sends; expected one of {}",
                        m.value,
                        HOOK_METHODS.join(", ")
                    ),
                );
                return None;
            }
            upper
        }
    };
    let mut headers = Vec::new();
    for (name, value) in raw.headers.iter().flat_map(|h| h.value.iter()) {
        let lower = name.value.to_ascii_lowercase();
        if !http_token(&lower) || lower.is_empty() {
            diags.error(name.span.clone(), format!("\"{}\" is not a header name", name.value));
            continue;
        }
        if ["host", "content-length", "transfer-encoding", "connection"].contains(&lower.as_str()) {
            diags.error(name.span.clone(), format!("{} is set by stoke and cannot be given", name.value));
            continue;
        }
        if value.value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            diags.error(value.span.clone(), format!("the value of header {} holds a line break", name.value));
            continue;
        }
        if let Some(t) = template(diags, value, &format!("header {}", name.value)) {
            headers.push((lower, t));
        }
    }
    let body = raw.body.as_ref().and_then(|b| template(diags, b, &format!("{which} body")));
    if let (Some(b), "GET") = (&raw.body, method.as_str()) {
        diags.error(b.span.clone(), "a GET step sends no body; use POST, PUT or PATCH");
    }
    let token = match (&raw.token_env, &raw.token_file) {
        (Some(env), None) => {
            if !valid_env_name(&env.value) {
                diags.error(
                    env.span.clone(),
                    format!(
                        "token_env \"{}\" is not an environment variable name; use letters, digits and '_'",
                        env.value
                    ),
                );
            }
            Some(HookToken::Env(env.value.clone()))
        }
        (None, Some(file)) => {
            let path = base.join(&file.value);
            if let Err(e) = std::fs::metadata(&path) {
                diags.error(
                    file.span.clone(),
                    format!(
                        "token_file \"{}\" cannot be read: {e} (paths are relative to the config file)",
                        path.display()
                    ),
                );
            }
            Some(HookToken::File(path))
        }
        (Some(env), Some(_)) => {
            diags.error(env.span.clone(), "give token_env or token_file, not both");
            None
        }
        (None, None) => None,
    };
    let token_header = raw.token_header.as_ref().and_then(|h| {
        let lower = h.value.to_ascii_lowercase();
        if lower.is_empty() || !http_token(&lower) {
            diags.error(h.span.clone(), format!("token_header \"{}\" is not a header name", h.value));
            return None;
        }
        if token.is_none() {
            diags.error(h.span.clone(), "token_header needs token_env or token_file");
        }
        Some(lower)
    });
    let ca_file = raw.ca_file.as_ref().and_then(|at| {
        if !parsed.tls {
            diags.error(at.span.clone(), format!("ca_file applies to https:// urls only, and {} is http", url.value));
            return None;
        }
        read_certs(diags, base, at).map(|(path, _)| path)
    });
    let step = HttpStep { url: url_t, method, headers, body, token, token_header, ca_file, timeout };
    Some(HookStep::Http(step))
}

/// Parse `http://host[:port]/path` or `https://…`.
pub(crate) fn parse_hook_url(raw: &str) -> Result<HookUrl, String> {
    let bad = |why: &str| Err(format!("url \"{raw}\" {why}; expected http://HOST[:PORT]/PATH or https://…"));
    let (tls, rest) = if let Some(r) = raw.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = raw.strip_prefix("https://") {
        (true, r)
    } else {
        return bad("has no http:// or https:// scheme");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return bad("has user info, which is not supported (use token_env)");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return bad("has an unclosed '['");
        };
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return bad("has junk after the IPv6 address"),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return bad("has no valid host");
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return bad("has an invalid port"),
        },
        None if tls => 443,
        None => 80,
    };
    if path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return bad("has spaces or control characters in its path");
    }
    Ok(HookUrl { raw: raw.to_owned(), tls, host: host.to_owned(), port, path: path.to_owned() })
}

fn compile_route(
    diags: &mut Diagnostics,
    raw: &RawRoute,
    services: &HashMap<String, ServiceId>,
    base: &Path,
) -> Option<Route> {
    let host = match &raw.host {
        Some(h) => match HostPattern::parse(&h.value) {
            Ok(p) => Some(p),
            Err(msg) => {
                diags.error(h.span.clone(), msg);
                None
            }
        },
        None => Some(HostPattern::Any),
    };
    let path_prefix = match &raw.path_prefix {
        Some(p) if !p.value.starts_with('/') || p.value.bytes().any(|b| b.is_ascii_control() || b == b' ') => {
            diags.error(p.span.clone(), format!("path_prefix \"{}\" must start with '/', such as \"/v1/\"", p.value));
            None
        }
        Some(p) => Some(p.value.clone()),
        None => Some(defaults::PATH_PREFIX.to_owned()),
    };
    let service = match (&raw.service, &raw.service_from) {
        (Some(s), Some(from)) => {
            diags.error(
                from.span.clone(),
                format!("a route takes service or service_from, not both (service = \"{}\" is also set)", s.value),
            );
            None
        }
        (None, None) => {
            diags.error(
                raw.span.clone(),
                "a route needs service = \"MODEL\" or service_from = \"body:model\" / \"header:NAME\"",
            );
            None
        }
        (Some(s), None) => match services.get(&s.value) {
            Some(&id) => Some(ServiceSource::Fixed(id)),
            None => {
                let mut known: Vec<&str> = services.keys().map(String::as_str).collect();
                known.sort_unstable();
                diags.error(
                    s.span.clone(),
                    format!(
                        "no pool serves \"{}\"; services that pools serve: {}",
                        s.value,
                        if known.is_empty() { "(none)".to_owned() } else { known.join(", ") }
                    ),
                );
                None
            }
        },
        (None, Some(from)) => match parse_service_from(&from.value) {
            Ok(src) => Some(src),
            Err(msg) => {
                diags.error(from.span.clone(), msg);
                None
            }
        },
    };
    let max_body_read = match &raw.max_body_read {
        Some(at) if at.value == 0 || at.value > defaults::MAX_BODY_READ_LIMIT => {
            diags.error(
                at.span.clone(),
                format!("max_body_read = {} is out of range; expected 1 byte to 64MiB", at.value),
            );
            defaults::MAX_BODY_READ
        }
        Some(at) => at.value,
        None => defaults::MAX_BODY_READ,
    };
    let max_wait = raw.max_wait.as_ref().map_or(defaults::MAX_WAIT, |w| w.value);
    let hold_keepalive = match &raw.hold_keepalive {
        Some(at) if at.value < std::time::Duration::from_millis(100) => {
            diags.error(
                at.span.clone(),
                "hold_keepalive must be at least 100ms (a comment that often is only noise); leave it out to turn it off",
            );
            None
        }
        Some(at) => Some(at.value),
        None => None,
    };
    let max_body = match &raw.max_body {
        Some(at) if at.value == 0 => {
            diags
                .error(at.span.clone(), "max_body = 0 would refuse every request with a body; expected 1 byte or more");
            defaults::MAX_BODY
        }
        Some(at) => at.value,
        None => defaults::MAX_BODY,
    };
    let auth = raw.auth.as_ref().and_then(|a| compile_auth(diags, a, base));
    let rate_limit = raw.rate_limit.as_ref().and_then(|l| compile_rate(diags, l, raw.auth.is_some()));
    let (host, path_prefix, service) = (host?, path_prefix?, service?);
    let name = match &raw.name {
        Some(n) if n.value.is_empty() || n.value.bytes().any(|b| b.is_ascii_control()) => {
            diags.error(n.span.clone(), "a route name must be printable and not empty");
            return None;
        }
        Some(n) => n.value.clone(),
        None => format!("{host}{path_prefix}"),
    };
    Some(Route {
        name,
        host,
        path_prefix,
        service,
        max_wait,
        hold_keepalive,
        strip_prefix: raw.strip_prefix.as_ref().map_or(defaults::STRIP_PREFIX, |s| s.value),
        max_body_read,
        max_body,
        auth,
        rate_limit,
    })
}

fn compile_auth(diags: &mut Diagnostics, raw: &RawAuth, base: &Path) -> Option<Auth> {
    let header = match &raw.header {
        None => AuthHeader::Bearer,
        Some(h) if h.value.eq_ignore_ascii_case("authorization") => AuthHeader::Bearer,
        Some(h) if !h.value.is_empty() && h.value.bytes().all(is_token_byte) => {
            AuthHeader::Named(h.value.to_ascii_lowercase())
        }
        Some(h) => {
            diags.error(
                h.span.clone(),
                format!(
                    "header \"{}\" is not a header name; expected e.g. \"x-api-key\" or \"authorization\" (Bearer)",
                    h.value
                ),
            );
            return None;
        }
    };
    let mut keys: Vec<String> = Vec::new();
    match (&raw.keys_file, &raw.keys_env) {
        (None, None) => {
            diags.error(
                raw.span.clone(),
                "auth needs keys_file = \"FILE\" (one key per line) or keys_env = \"VAR\" (comma-separated keys)",
            );
            return None;
        }
        (file, env) => {
            if let Some(f) = file {
                let path = base.join(&f.value);
                match std::fs::read_to_string(&path) {
                    Ok(text) => keys.extend(
                        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned),
                    ),
                    Err(e) => {
                        diags.error(f.span.clone(), format!("keys_file \"{}\" cannot be read: {e}; expected one API key per line (paths are relative to the config file)", path.display()));
                        return None;
                    }
                }
            }
            if let Some(v) = env {
                match std::env::var(&v.value) {
                    Ok(list) => {
                        keys.extend(list.split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned))
                    }
                    Err(_) => {
                        diags.error(
                            v.span.clone(),
                            format!("keys_env names {}, which is not set in the environment", v.value),
                        );
                        return None;
                    }
                }
            }
        }
    }
    if keys.is_empty() {
        diags.error(raw.span.clone(), "auth lists no keys: every request would be refused");
        return None;
    }
    if let Some(bad) = keys.iter().position(|k| k.len() < 16 || k.bytes().any(|b| !b.is_ascii_graphic())) {
        // Say which, never what: keys are secrets.
        diags.error(
            raw.span.clone(),
            format!("API key #{} is shorter than 16 characters or has spaces or control characters", bad + 1),
        );
        return None;
    }
    Some(Auth { keys, header })
}

/// The lowest rate a limit may have (requests per second): a lower one
/// would make waits too long to say.
pub const MIN_RATE: f64 = 0.001;

fn compile_rate(diags: &mut Diagnostics, raw: &RawRate, has_auth: bool) -> Option<RateLimit> {
    let mut ok = true;
    for (key, at) in [("per_key", &raw.per_key), ("per_ip", &raw.per_ip)] {
        if let Some(at) = at {
            if !(at.value >= MIN_RATE && at.value <= 1e6) {
                diags.error(
                    at.span.clone(),
                    format!(
                        "{key} = {} is out of range; expected requests per second, from {MIN_RATE} (one request per 1000 s) to 1000000",
                        at.value
                    ),
                );
                ok = false;
            }
        }
    }
    if let (Some(at), false) = (&raw.per_key, has_auth) {
        diags.error(
            at.span.clone(),
            "per_key needs auth on the same route: without API keys there is no key to count by",
        );
        ok = false;
    }
    if raw.per_key.is_none() && raw.per_ip.is_none() {
        diags.error(raw.span.clone(), "rate_limit needs per_key and/or per_ip (requests per second)");
        ok = false;
    }
    let burst = match &raw.burst {
        Some(at) if at.value == 0 || at.value > 1_000_000 => {
            diags.error(at.span.clone(), format!("burst = {} is out of range; expected 1 to 1000000", at.value));
            ok = false;
            0
        }
        Some(at) => at.value as u32,
        None => defaults::RATE_BURST as u32,
    };
    ok.then(|| RateLimit {
        per_key: raw.per_key.as_ref().map(|a| a.value),
        per_ip: raw.per_ip.as_ref().map(|a| a.value),
        burst,
    })
}

/// Parse `body:FIELD` or `header:NAME`.
pub(crate) fn parse_service_from(text: &str) -> Result<ServiceSource, String> {
    let help = "expected \"body:model\" (a top-level field of the JSON body) or \"header:NAME\" (a request header such as header:x-model)";
    match text.split_once(':') {
        Some(("body", field)) if !field.is_empty() && field.bytes().all(|b| !b.is_ascii_control() && b != b'"') => {
            Ok(ServiceSource::BodyField(field.to_owned()))
        }
        Some(("header", name)) if !name.is_empty() && name.bytes().all(is_token_byte) => {
            Ok(ServiceSource::Header(name.to_ascii_lowercase()))
        }
        _ => Err(format!("service_from \"{text}\" is not understood; {help}")),
    }
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `idle_timeout` (a duration or `"auto"`) with its `min_idle` / `max_idle`.
fn compile_idle(diags: &mut Diagnostics, s: &RawScale) -> IdleTimeout {
    let auto = matches!(&s.idle_timeout, Some(At { value: None, .. }));
    if !auto {
        for bound in [&s.min_idle, &s.max_idle].into_iter().flatten() {
            diags.error(
                bound.span.clone(),
                "min_idle and max_idle bound idle_timeout = \"auto\" only; this pool's idle_timeout is fixed"
                    .to_owned(),
            );
        }
        let fixed = s.idle_timeout.as_ref().and_then(|t| t.value.map(|d| At::new(d, t.span.clone())));
        return IdleTimeout::Fixed(nonzero_duration(diags, &fixed, "idle_timeout", defaults::IDLE_TIMEOUT));
    }
    let min = s.min_idle.as_ref().map_or(defaults::MIN_IDLE, |d| d.value);
    let max = nonzero_duration(diags, &s.max_idle, "max_idle", defaults::MAX_IDLE);
    if min > max {
        let span = s.min_idle.as_ref().or(s.max_idle.as_ref()).map(|d| d.span.clone()).unwrap_or_default();
        diags.error(
            span,
            format!(
                "min_idle ({}) is longer than max_idle ({})",
                crate::duration::format_duration(min),
                crate::duration::format_duration(max)
            ),
        );
    }
    IdleTimeout::Auto { min, max: max.max(min) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_urls() {
        let u = parse_hook_url("http://orchestrator:7000/pools/fra/wake").expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.path.as_str(), u.tls), ("orchestrator", 7000, "/pools/fra/wake", false));
        let u = parse_hook_url("https://[::1]/x?y=1").expect("valid");
        assert_eq!((u.host.as_str(), u.port, u.path.as_str(), u.tls), ("::1", 443, "/x?y=1", true));
        assert_eq!(parse_hook_url("http://h").map(|u| u.path), Ok("/".to_owned()));
        for bad in ["ftp://x/", "http://", "http://a:0/", "http://a:b/", "http://u@h/", "http://h/a b"] {
            assert!(parse_hook_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hook_steps_templates_and_their_mistakes() {
        let load = |scale: &str| {
            let text = format!(
                "[edge]\nlocation = \"fra\"\n[[location]]\nid = \"fra\"\nlat = 1.0\nlon = 2.0\n[[pool]]\nid = \"p\"\n\
                 location = \"fra\"\nserves = [\"m\"]\nreplicas = [\"127.0.0.1:1\"]\n[pool.scale]\n{scale}\n"
            );
            crate::load_str(&text, Path::new("t.toml"))
        };
        let n = load("wake = { url = \"http://o/{pool}\", method = \"put\", headers = { X-A = \"{edge}\" } }")
            .expect("valid");
        let wake = &n.pools[0].scale.as_ref().expect("scale").wake;
        let HookStep::Http(step) = &wake.steps[0] else { panic!("an http step") };
        assert_eq!((step.method.as_str(), step.url.raw.as_str()), ("PUT", "http://o/{pool}"));
        assert_eq!(step.headers[0].0, "x-a");
        assert!(!wake.per_replica());
        let n =
            load("wake = { steps = [{ url = \"http://{replica}/wake_up\" }, { command = [\"true\", \"{pool}\"] }] }")
                .expect("valid");
        let wake = &n.pools[0].scale.as_ref().expect("scale").wake;
        assert_eq!(wake.steps.len(), 2);
        assert!(wake.per_replica());
        // A JSON body's braces are text; only known names are placeholders.
        let t = Template::parse(r#"{"spec":{"replicas":{replicas}},"x":{}}"#).expect("template");
        assert_eq!(t.render(|_| "3"), r#"{"spec":{"replicas":3},"x":{}}"#);
        for (scale, says) in [
            ("wake = { url = \"http://o/{pol}\" }", "{pol} is not a placeholder"),
            ("wake = { url = \"http://o/\", body = \"{replica_count}\" }", "{replica_count} is not a placeholder"),
            ("wake = { url = \"http://o/\", method = \"TRACE\" }", "method \"TRACE\" is not one stoke sends"),
            ("wake = { url = \"http://o/\", method = \"GET\", body = \"x\" }", "a GET step sends no body"),
            ("wake = { url = \"http://o/\", headers = { Host = \"x\" } }", "Host is set by stoke"),
            ("wake = { url = \"http://o/\", headers = { \"a b\" = \"x\" } }", "\"a b\" is not a header name"),
            ("wake = { url = \"http://o/\", token_header = \"X-T\" }", "token_header needs token_env or token_file"),
            ("wake = { url = \"http://o/\", token_env = \"T\", token_file = \"f\" }", "not both"),
            ("wake = { url = \"http://o/\", token_file = \"no-such-token\" }", "token_file"),
            ("wake = { url = \"http://o/\", ca_file = \"ca.pem\" }", "ca_file applies to https:// urls only"),
            ("wake = { url = \"https://o/\", ca_file = \"no-such-ca.pem\" }", "cannot be read"),
            ("wake = { command = [\"x\"], method = \"PUT\" }", "method applies to url hooks only"),
            ("wake = { steps = [] }", "steps are empty"),
            ("wake = { steps = [{ url = \"http://o/\" }], url = \"http://o/\" }", "this key belongs in a step"),
            ("wake = { steps = [{ url = \"http://o/\", steps = [] }] }", "unknown key \"steps\" in step 1"),
            ("wake = { steps = [{ method = \"PUT\" }] }", "wake hook's step 1 needs url"),
            ("wake = { steps = \"x\" }", "an array of tables"),
            ("wake = { url = \"http://{replica}:99999/\" }", "url \"http://127.0.0.1:8000:99999/\""),
        ] {
            let e = load(scale).expect_err(scale).to_string();
            assert!(e.contains(says) && e.contains("t.toml:"), "{scale}: {e}");
        }
    }

    #[test]
    fn light_depths() {
        let load = |scale: &str| {
            let text = format!(
                "[edge]\nlocation = \"fra\"\n[[location]]\nid = \"fra\"\nlat = 1.0\nlon = 2.0\n[[pool]]\nid = \"p\"\n\
                 location = \"fra\"\nserves = [\"m\"]\nreplicas = [\"127.0.0.1:1\"]\nload = {{}}\n[pool.scale]\n\
                 wake = {{ url = \"http://o/\" }}\nsleep = {{ url = \"http://o/\" }}\n{scale}\n"
            );
            crate::load_str(&text, Path::new("t.toml"))
        };
        let n = load("light = { kind = \"vllm\", level = 2 }").expect("valid");
        let pool = &n.pools[0];
        let light = pool.scale.as_ref().and_then(|s| s.light.as_ref()).expect("light");
        assert_eq!(light.idle_timeout, IdleTimeout::Fixed(defaults::LIGHT_TIMEOUT));
        assert_eq!((light.wake_time, light.cost), (defaults::LIGHT_WAKE_TIME, defaults::LIGHT_COST));
        assert_eq!(pool.health.sleeping_path.as_deref(), Some("/is_sleeping"));
        let urls = |h: &Hook| {
            h.steps
                .iter()
                .map(|s| if let HookStep::Http(h) = s { h.url.raw.clone() } else { String::new() })
                .collect::<Vec<_>>()
        };
        assert_eq!(urls(&light.sleep), ["http://{replica}/sleep?level=2"]);
        assert_eq!(
            urls(&light.wake),
            [
                "http://{replica}/wake_up?tags=weights",
                "http://{replica}/collective_rpc",
                "http://{replica}/wake_up?tags=kv_cache"
            ]
        );
        let n =
            load("idle_timeout = \"auto\"\nlight = { kind = \"vllm\" }\nlight_cost = 0.1\nlight_wake_time = \"800ms\"")
                .expect("valid");
        let light = n.pools[0].scale.as_ref().and_then(|s| s.light.clone()).expect("light");
        let deep_bounds = n.pools[0].scale.as_ref().map(|s| s.idle_timeout);
        assert_eq!(deep_bounds, Some(IdleTimeout::Auto { min: defaults::MIN_IDLE, max: defaults::MAX_IDLE }));
        let light_bounds = IdleTimeout::Auto { min: defaults::LIGHT_MIN_IDLE, max: defaults::MAX_IDLE };
        assert_eq!(light.idle_timeout, light_bounds, "auto with the deep window, from a shorter floor");
        assert_eq!((light.cost, light.wake_time.as_millis()), (0.1, 800));
        let n = load("light = { sleep = { url = \"http://{replica}/pause\" }, wake = { url = \"http://{replica}/resume\" }, probe = \"/paused\" }\nlight_timeout = \"10s\"")
            .expect("valid");
        assert_eq!(n.pools[0].health.sleeping_path.as_deref(), Some("/paused"));
        assert_eq!(
            n.pools[0].scale.as_ref().and_then(|s| s.light.as_ref()).map(|l| l.idle_timeout),
            Some(IdleTimeout::Fixed(std::time::Duration::from_secs(10)))
        );
        assert_eq!(load("").expect("valid").pools[0].health.sleeping_path, None);
        for (scale, says) in [
            ("light = { kind = \"tgi\" }", "light kind \"tgi\" is not known"),
            ("light = { kind = \"vllm\", level = 3 }", "level = 3 is not a vLLM sleep level"),
            ("light = {}", "light needs kind = \"vllm\""),
            ("light = { kind = \"vllm\", sleep = { url = \"http://{replica}/\" } }", "not both"),
            (
                "light = { sleep = { url = \"http://o/s\" }, wake = { url = \"http://{replica}/w\" } }",
                "must name {replica}",
            ),
            ("light_timeout = \"1m\"", "light_timeout needs a light depth"),
            ("light = { kind = \"vllm\" }\nlight_timeout = \"10m\"", "must be shorter than idle_timeout"),
            ("light = { kind = \"vllm\" }\nlight_timeout = \"auto\"", "needs idle_timeout = \"auto\""),
            ("light = { kind = \"vllm\" }\nlight_cost = 1.5", "light_cost = 1.5 is out of range"),
            ("light = { kind = \"vllm\", probe = \"/x\" }", "probes /is_sleeping itself"),
            ("light = { kind = \"vllm\", levle = 1 }", "did you mean \"level\""),
        ] {
            let e = load(scale).expect_err(scale).to_string();
            assert!(e.contains(says) && e.contains("t.toml:"), "{scale}: {e}");
        }
    }

    #[test]
    fn tracing_settings() {
        let load = |table: &str| {
            let text = format!(
                "[edge]\nlocation = \"fra\"\n[[location]]\nid = \"fra\"\nlat = 1.0\nlon = 2.0\n[tracing]\n{table}"
            );
            crate::load_str(&text, Path::new("t.toml"))
        };
        let t = load("endpoint = \"http://127.0.0.1:4318/v1/traces\"").expect("valid").tracing.expect("[tracing]");
        let expected = TracingSettings {
            endpoint: "http://127.0.0.1:4318/v1/traces".into(),
            sample: 0.0,
            follow_parent: true,
            queue: 4096,
            headers: vec![],
            headers_env: vec![],
        };
        assert_eq!(t, expected);
        let t = load("endpoint = \"http://c/\"\nheaders = { X-Team = \"edge\" }\nheaders_env = { authorization = \"OTLP_AUTH\" }")
            .expect("valid")
            .tracing
            .expect("[tracing]");
        assert_eq!(t.headers, [("x-team".to_owned(), "edge".to_owned())]);
        assert_eq!(t.headers_env, [("authorization".to_owned(), "OTLP_AUTH".to_owned())]);
        let t = load("endpoint = \"http://c:4318/v1/traces\"\nsample = 0.01\nparent = \"ignore\"\nqueue = 10")
            .expect("valid");
        let t = t.tracing.expect("[tracing]");
        assert_eq!((t.sample, t.follow_parent, t.queue), (0.01, false, 10));
        for (table, says) in [
            ("sample = 0.5", "needs the key \"endpoint\""),
            ("endpoint = \"https://c/v1/traces\"", "https is not supported"),
            ("endpoint = \"c:4318\"", "not an OTLP/HTTP address"),
            ("endpoint = \"http://c/\"\nsample = 2.0", "[tracing].sample = 2 is out of range"),
            ("endpoint = \"http://c/\"\nparent = \"always\"", "[tracing].parent = \"always\""),
            ("endpoint = \"http://c/\"\nqueue = 0", "[tracing].queue = 0"),
            ("endpoint = \"http://c/\"\nheaders = { \"a b\" = \"x\" }", "\"a b\" is not a header name"),
            ("endpoint = \"http://c/\"\nheaders = { a = 1 }", "a table of strings"),
            ("endpoint = \"http://c/\"\nsampel = 0.1", "sampel"),
        ] {
            let e = load(table).expect_err(table).to_string();
            assert!(e.contains(says) && e.contains("t.toml:"), "{table}: {e}");
        }
    }

    #[test]
    fn service_from_forms() {
        assert_eq!(parse_service_from("body:model"), Ok(ServiceSource::BodyField("model".into())));
        assert_eq!(parse_service_from("header:X-Model"), Ok(ServiceSource::Header("x-model".into())));
        for bad in ["model", "body:", "header:", "header:x model", "query:model", ""] {
            assert!(parse_service_from(bad).is_err(), "{bad}");
        }
    }
}
