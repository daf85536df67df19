//! Stage one: the file as written. Every key is read with its span; unknown
//! keys, missing keys and wrong types are recorded, and decoding goes on so
//! that the next stage can find problems in the rest of the file too.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::de::DeTable;

use crate::decode::{tables, At, StringTable, TableReader};
use crate::diag::Diagnostics;

/// Keys accepted at the top level.
const ROOT_KEYS: &[&str] = &["edge", "cluster", "tracing", "tls", "location", "rtt", "pool", "route"];
const CLUSTER_KEYS: &[&str] = &["nats", "name", "timeout", "domain"];
const TRACING_KEYS: &[&str] = &["endpoint", "sample", "parent", "queue", "headers", "headers_env"];
const EDGE_KEYS: &[&str] = &[
    "location",
    "http",
    "https",
    "h3",
    "admin",
    "admin_token_env",
    "debug_headers",
    "threads",
    "drain_timeout",
    "client_header_timeout",
    "keepalive_timeout",
    "max_connections",
    "max_header_bytes",
    "max_buffered_bodies",
    "max_headers",
    "h3_idle_timeout",
    "h3_max_streams",
    "measure_rtt",
    "upgrade_socket",
];
const TLS_KEYS: &[&str] = &["hosts", "cert", "key"];
const LOCATION_KEYS: &[&str] = &["id", "name", "lat", "lon", "edge"];
const RTT_KEYS: &[&str] = &["between", "ms"];
const POOL_KEYS: &[&str] = &[
    "id",
    "location",
    "serves",
    "replicas",
    "max_concurrency",
    "max_queue",
    "connect_timeout",
    "read_timeout",
    "health",
    "load",
    "scale",
    "affinity",
];
const HEALTH_KEYS: &[&str] = &["path", "interval", "timeout"];
const LOAD_KEYS: &[&str] = &["path", "format", "interval"];
const SCALE_KEYS: &[&str] = &[
    "idle_timeout",
    "min_idle",
    "max_idle",
    "wake_time",
    "wake",
    "sleep",
    "light",
    "light_timeout",
    "light_wake_time",
    "light_cost",
];
const LIGHT_KEYS: &[&str] = &["kind", "level", "sleep", "wake", "probe"];
const AFFINITY_KEYS: &[&str] = &["key", "prefix_bytes", "max_load"];
const HOOK_KEYS: &[&str] = &[
    "url",
    "method",
    "headers",
    "body",
    "token_env",
    "token_file",
    "token_header",
    "ca_file",
    "command",
    "timeout",
    "steps",
];
const STEP_KEYS: &[&str] =
    &["url", "method", "headers", "body", "token_env", "token_file", "token_header", "ca_file", "command", "timeout"];
const ROUTE_KEYS: &[&str] = &[
    "name",
    "host",
    "path_prefix",
    "service",
    "service_from",
    "max_wait",
    "hold_keepalive",
    "strip_prefix",
    "max_body_read",
    "max_body",
    "auth",
    "rate_limit",
];
const AUTH_KEYS: &[&str] = &["keys_file", "keys_env", "header"];
const RATE_KEYS: &[&str] = &["per_key", "per_ip", "burst"];

/// The whole file as written.
#[derive(Debug, Default)]
pub(crate) struct FileConfig {
    pub edge: Option<RawEdge>,
    pub cluster: Option<RawCluster>,
    pub tracing: Option<RawTracing>,
    pub tls: Vec<RawTls>,
    pub locations: Vec<RawLocation>,
    pub rtt: Vec<RawRtt>,
    pub pools: Vec<RawPool>,
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Default)]
pub(crate) struct RawEdge {
    pub location: Option<At<String>>,
    pub http: Option<At<SocketAddr>>,
    pub https: Option<At<SocketAddr>>,
    pub h3: Option<At<SocketAddr>>,
    pub admin: Option<At<SocketAddr>>,
    pub admin_token_env: Option<At<String>>,
    pub debug_headers: Option<At<bool>>,
    pub threads: Option<At<u64>>,
    pub drain_timeout: Option<At<Duration>>,
    pub client_header_timeout: Option<At<Duration>>,
    pub keepalive_timeout: Option<At<Duration>>,
    pub max_connections: Option<At<u64>>,
    pub max_header_bytes: Option<At<u64>>,
    pub max_buffered_bodies: Option<At<u64>>,
    pub max_headers: Option<At<u64>>,
    pub h3_idle_timeout: Option<At<Duration>>,
    pub h3_max_streams: Option<At<u64>>,
    pub measure_rtt: Option<At<bool>>,
    pub upgrade_socket: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawCluster {
    pub span: Range<usize>,
    pub nats: Option<At<Vec<At<String>>>>,
    pub name: Option<At<String>>,
    pub timeout: Option<At<Duration>>,
    pub domain: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawTracing {
    pub endpoint: Option<At<String>>,
    pub sample: Option<At<f64>>,
    pub parent: Option<At<String>>,
    pub queue: Option<At<u64>>,
    pub headers: Option<At<StringTable>>,
    pub headers_env: Option<At<StringTable>>,
}

#[derive(Debug)]
pub(crate) struct RawTls {
    pub hosts: Option<At<Vec<At<String>>>>,
    pub cert: Option<At<String>>,
    pub key: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawLocation {
    pub id: Option<At<String>>,
    pub name: Option<At<String>>,
    pub lat: Option<At<f64>>,
    pub lon: Option<At<f64>>,
    pub edge: Option<At<bool>>,
}

#[derive(Debug)]
pub(crate) struct RawRtt {
    pub between: Option<At<Vec<At<String>>>>,
    pub ms: Option<At<f64>>,
}

#[derive(Debug)]
pub(crate) struct RawPool {
    pub span: Range<usize>,
    pub id: Option<At<String>>,
    pub location: Option<At<String>>,
    pub serves: Option<At<Vec<At<String>>>>,
    pub replicas: Option<At<Vec<At<String>>>>,
    pub max_concurrency: Option<At<u64>>,
    pub max_queue: Option<At<u64>>,
    pub connect_timeout: Option<At<Duration>>,
    pub read_timeout: Option<At<Duration>>,
    pub health: RawHealth,
    pub load: Option<RawLoad>,
    pub scale: Option<RawScale>,
    pub affinity: Option<RawAffinity>,
}

#[derive(Debug)]
pub(crate) struct RawAffinity {
    pub span: Range<usize>,
    pub key: Option<At<String>>,
    pub prefix_bytes: Option<At<u64>>,
    pub max_load: Option<At<f64>>,
}

#[derive(Debug, Default)]
pub(crate) struct RawHealth {
    pub path: Option<At<String>>,
    pub interval: Option<At<Duration>>,
    pub timeout: Option<At<Duration>>,
}

#[derive(Debug)]
pub(crate) struct RawLoad {
    pub path: Option<At<String>>,
    pub format: Option<At<String>>,
    pub interval: Option<At<Duration>>,
}

#[derive(Debug)]
pub(crate) struct RawScale {
    /// `None` inside: `"auto"`.
    pub idle_timeout: Option<At<Option<Duration>>>,
    pub min_idle: Option<At<Duration>>,
    pub max_idle: Option<At<Duration>>,
    pub wake_time: Option<At<Duration>>,
    pub wake: Option<RawHook>,
    pub sleep: Option<RawHook>,
    pub light: Option<RawLight>,
    /// `None` inside: `"auto"`.
    pub light_timeout: Option<At<Option<Duration>>>,
    pub light_wake_time: Option<At<Duration>>,
    pub light_cost: Option<At<f64>>,
}

#[derive(Debug)]
pub(crate) struct RawLight {
    pub span: Range<usize>,
    pub kind: Option<At<String>>,
    pub level: Option<At<u64>>,
    pub sleep: Option<RawHook>,
    pub wake: Option<RawHook>,
    pub probe: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawHook {
    pub span: Range<usize>,
    pub url: Option<At<String>>,
    pub method: Option<At<String>>,
    pub headers: Option<At<StringTable>>,
    pub body: Option<At<String>>,
    pub token_env: Option<At<String>>,
    pub token_file: Option<At<String>>,
    pub token_header: Option<At<String>>,
    pub ca_file: Option<At<String>>,
    pub command: Option<At<Vec<At<String>>>>,
    pub timeout: Option<At<Duration>>,
    /// `steps = [ { … }, … ]`: each a hook of one step.
    pub steps: Option<At<Vec<RawHook>>>,
}

#[derive(Debug)]
pub(crate) struct RawRoute {
    pub span: Range<usize>,
    pub name: Option<At<String>>,
    pub host: Option<At<String>>,
    pub path_prefix: Option<At<String>>,
    pub service: Option<At<String>>,
    pub service_from: Option<At<String>>,
    pub max_wait: Option<At<Duration>>,
    pub hold_keepalive: Option<At<Duration>>,
    pub strip_prefix: Option<At<bool>>,
    pub max_body_read: Option<At<u64>>,
    pub max_body: Option<At<u64>>,
    pub auth: Option<RawAuth>,
    pub rate_limit: Option<RawRate>,
}

#[derive(Debug)]
pub(crate) struct RawAuth {
    pub span: Range<usize>,
    pub keys_file: Option<At<String>>,
    pub keys_env: Option<At<String>>,
    pub header: Option<At<String>>,
}

#[derive(Debug)]
pub(crate) struct RawRate {
    pub span: Range<usize>,
    pub per_key: Option<At<f64>>,
    pub per_ip: Option<At<f64>>,
    pub burst: Option<At<u64>>,
}

/// Decode a parsed document.
pub(crate) fn decode(diags: &mut Diagnostics, root: &DeTable<'_>, root_span: Range<usize>) -> FileConfig {
    let top = TableReader::new(diags, root, root_span, "the top level", ROOT_KEYS);
    let edge = top
        .table(diags, "edge")
        .map(|(t, span)| decode_edge(&TableReader::new(diags, t, span, "[edge]", EDGE_KEYS), diags));

    let cluster = top.table(diags, "cluster").map(|(t, span)| {
        let r = TableReader::new(diags, t, span.clone(), "[cluster]", CLUSTER_KEYS);
        RawCluster {
            span,
            nats: r.required_strings(diags, "nats"),
            name: r.string(diags, "name"),
            timeout: r.duration(diags, "timeout"),
            domain: r.string(diags, "domain"),
        }
    });

    let tracing = top.table(diags, "tracing").map(|(t, span)| {
        let r = TableReader::new(diags, t, span, "[tracing]", TRACING_KEYS);
        RawTracing {
            endpoint: r.required_string(diags, "endpoint"),
            sample: r.number(diags, "sample"),
            parent: r.string(diags, "parent"),
            queue: r.unsigned(diags, "queue"),
            headers: r.string_table(diags, "headers"),
            headers_env: r.string_table(diags, "headers_env"),
        }
    });

    FileConfig {
        edge,
        cluster,
        tracing,
        tls: tables(diags, root, "tls")
            .into_iter()
            .map(|(t, span)| {
                let r = TableReader::new(diags, t, span, "[[tls]]", TLS_KEYS);
                RawTls {
                    hosts: r.required_strings(diags, "hosts"),
                    cert: r.required_string(diags, "cert"),
                    key: r.required_string(diags, "key"),
                }
            })
            .collect(),
        locations: tables(diags, root, "location")
            .into_iter()
            .map(|(t, span)| {
                let r = TableReader::new(diags, t, span, "[[location]]", LOCATION_KEYS);
                RawLocation {
                    id: r.required_string(diags, "id"),
                    name: r.string(diags, "name"),
                    lat: r.required_number(diags, "lat"),
                    lon: r.required_number(diags, "lon"),
                    edge: r.boolean(diags, "edge"),
                }
            })
            .collect(),
        rtt: tables(diags, root, "rtt")
            .into_iter()
            .map(|(t, span)| {
                let r = TableReader::new(diags, t, span, "[[rtt]]", RTT_KEYS);
                RawRtt { between: r.required_strings(diags, "between"), ms: r.required_number(diags, "ms") }
            })
            .collect(),
        pools: tables(diags, root, "pool").into_iter().map(|(t, span)| decode_pool(diags, t, span)).collect(),
        routes: tables(diags, root, "route")
            .into_iter()
            .map(|(t, span)| {
                let r = TableReader::new(diags, t, span.clone(), "[[route]]", ROUTE_KEYS);
                RawRoute {
                    span,
                    name: r.string(diags, "name"),
                    host: r.string(diags, "host"),
                    path_prefix: r.string(diags, "path_prefix"),
                    service: r.string(diags, "service"),
                    service_from: r.string(diags, "service_from"),
                    max_wait: r.duration(diags, "max_wait"),
                    hold_keepalive: r.duration(diags, "hold_keepalive"),
                    strip_prefix: r.boolean(diags, "strip_prefix"),
                    max_body_read: r.size(diags, "max_body_read"),
                    max_body: r.size(diags, "max_body"),
                    auth: r.table(diags, "auth").map(|(t, span)| {
                        let a = TableReader::new(diags, t, span.clone(), "auth of [[route]]", AUTH_KEYS);
                        RawAuth {
                            span,
                            keys_file: a.string(diags, "keys_file"),
                            keys_env: a.string(diags, "keys_env"),
                            header: a.string(diags, "header"),
                        }
                    }),
                    rate_limit: r.table(diags, "rate_limit").map(|(t, span)| {
                        let l = TableReader::new(diags, t, span.clone(), "rate_limit of [[route]]", RATE_KEYS);
                        RawRate {
                            span,
                            per_key: l.number(diags, "per_key"),
                            per_ip: l.number(diags, "per_ip"),
                            burst: l.unsigned(diags, "burst"),
                        }
                    }),
                }
            })
            .collect(),
    }
}

fn decode_edge(r: &TableReader<'_, '_>, diags: &mut Diagnostics) -> RawEdge {
    RawEdge {
        location: r.string(diags, "location"),
        http: r.addr(diags, "http"),
        https: r.addr(diags, "https"),
        h3: r.addr(diags, "h3"),
        admin: r.addr(diags, "admin"),
        admin_token_env: r.string(diags, "admin_token_env"),
        debug_headers: r.boolean(diags, "debug_headers"),
        threads: r.unsigned(diags, "threads"),
        drain_timeout: r.duration(diags, "drain_timeout"),
        client_header_timeout: r.duration(diags, "client_header_timeout"),
        keepalive_timeout: r.duration(diags, "keepalive_timeout"),
        max_connections: r.unsigned(diags, "max_connections"),
        max_header_bytes: r.size(diags, "max_header_bytes"),
        max_buffered_bodies: r.size(diags, "max_buffered_bodies"),
        max_headers: r.unsigned(diags, "max_headers"),
        h3_idle_timeout: r.duration(diags, "h3_idle_timeout"),
        h3_max_streams: r.unsigned(diags, "h3_max_streams"),
        measure_rtt: r.boolean(diags, "measure_rtt"),
        upgrade_socket: r.string(diags, "upgrade_socket"),
    }
}

fn decode_pool(diags: &mut Diagnostics, t: &DeTable<'_>, span: Range<usize>) -> RawPool {
    // Name the pool in messages about its sub-tables once its id is known.
    let id_hint = t
        .get("id")
        .and_then(|v| v.get_ref().as_str())
        .map(|s| format!("[[pool]] \"{s}\""))
        .unwrap_or_else(|| "[[pool]]".to_owned());
    let r = TableReader::new(diags, t, span.clone(), id_hint.clone(), POOL_KEYS);
    let health = r
        .table(diags, "health")
        .map(|(t, span)| {
            let h = TableReader::new(diags, t, span, format!("health of {id_hint}"), HEALTH_KEYS);
            RawHealth {
                path: h.string(diags, "path"),
                interval: h.duration(diags, "interval"),
                timeout: h.duration(diags, "timeout"),
            }
        })
        .unwrap_or_default();
    let load = r.table(diags, "load").map(|(t, span)| {
        let l = TableReader::new(diags, t, span, format!("load of {id_hint}"), LOAD_KEYS);
        RawLoad {
            path: l.string(diags, "path"),
            format: l.string(diags, "format"),
            interval: l.duration(diags, "interval"),
        }
    });
    let scale = r.table(diags, "scale").map(|(t, span)| {
        let s = TableReader::new(diags, t, span, format!("[pool.scale] of {id_hint}"), SCALE_KEYS);
        let hook = |diags: &mut Diagnostics, key: &str| {
            s.table(diags, key).map(|(t, span)| read_hook(diags, t, span, &format!("{key} hook of {id_hint}")))
        };
        let wake = hook(diags, "wake");
        let sleep = hook(diags, "sleep");
        let light = s.table(diags, "light").map(|(t, span)| {
            let what = format!("[pool.scale.light] of {id_hint}");
            let l = TableReader::new(diags, t, span.clone(), what, LIGHT_KEYS);
            let hook = |diags: &mut Diagnostics, key: &str| {
                l.table(diags, key)
                    .map(|(t, span)| read_hook(diags, t, span, &format!("light {key} hook of {id_hint}")))
            };
            RawLight {
                span,
                kind: l.string(diags, "kind"),
                level: l.unsigned(diags, "level"),
                sleep: hook(diags, "sleep"),
                wake: hook(diags, "wake"),
                probe: l.string(diags, "probe"),
            }
        });
        if !s.has("wake") {
            s.missing(diags, "wake", "a hook such as { url = \"http://orchestrator:7000/wake\" }");
        }
        RawScale {
            idle_timeout: s.duration_or_auto(diags, "idle_timeout"),
            min_idle: s.duration(diags, "min_idle"),
            max_idle: s.duration(diags, "max_idle"),
            wake_time: s.duration(diags, "wake_time"),
            wake,
            sleep,
            light,
            light_timeout: s.duration_or_auto(diags, "light_timeout"),
            light_wake_time: s.duration(diags, "light_wake_time"),
            light_cost: s.number(diags, "light_cost"),
        }
    });
    let affinity = r.table(diags, "affinity").map(|(t, span)| {
        let a = TableReader::new(diags, t, span.clone(), format!("[pool.affinity] of {id_hint}"), AFFINITY_KEYS);
        RawAffinity {
            span,
            key: a.string(diags, "key"),
            prefix_bytes: a.size(diags, "prefix_bytes"),
            max_load: a.number(diags, "max_load"),
        }
    });
    RawPool {
        span,
        id: r.required_string(diags, "id"),
        location: r.required_string(diags, "location"),
        serves: r.required_strings(diags, "serves"),
        replicas: r.required_strings(diags, "replicas"),
        max_concurrency: r.unsigned(diags, "max_concurrency"),
        max_queue: r.unsigned(diags, "max_queue"),
        connect_timeout: r.duration(diags, "connect_timeout"),
        read_timeout: r.duration(diags, "read_timeout"),
        health,
        load,
        scale,
        affinity,
    }
}

/// A hook table: one step, or `steps = [ … ]`, each read with the keys of
/// one step.
fn read_hook(diags: &mut Diagnostics, t: &DeTable<'_>, span: Range<usize>, what: &str) -> RawHook {
    let h = TableReader::new(diags, t, span.clone(), what, HOOK_KEYS);
    let steps = h.tables(diags, "steps").map(|at| {
        let steps = at
            .value
            .into_iter()
            .enumerate()
            .map(|(i, (t, span))| {
                let what = format!("step {} of the {what}", i + 1);
                let s = TableReader::new(diags, t, span.clone(), what, STEP_KEYS);
                read_step(diags, &s, span)
            })
            .collect();
        At::new(steps, at.span)
    });
    RawHook { steps, ..read_step(diags, &h, span) }
}

fn read_step(diags: &mut Diagnostics, h: &TableReader<'_, '_>, span: Range<usize>) -> RawHook {
    RawHook {
        span,
        url: h.string(diags, "url"),
        method: h.string(diags, "method"),
        headers: h.string_table(diags, "headers"),
        body: h.string(diags, "body"),
        token_env: h.string(diags, "token_env"),
        token_file: h.string(diags, "token_file"),
        token_header: h.string(diags, "token_header"),
        ca_file: h.string(diags, "ca_file"),
        command: h.strings(diags, "command"),
        timeout: h.duration(diags, "timeout"),
        steps: None,
    }
}
