//! Route matching on any `Host` and path: never a panic, and the route
//! found is the one the documented precedence picks, computed here the
//! slow way: among routes whose host pattern matches the normalized host
//! and whose prefix starts the path, exact host beats the longest wildcard
//! suffix beats `*`, then the longest prefix wins.
//!
//! Input: the host, a newline, the path (no newline: the host only).

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stoke_config::{load_str, HostPattern, Network, RouteId};

const CONFIG: &str = r#"
[edge]
location = "fra"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[[location]]
id = "fra"
lat = 50.11
lon = 8.68

[[pool]]
id = "fra-a"
location = "fra"
serves = ["m"]
replicas = ["127.0.0.1:9"]

[[route]]
host = "api.example.com"
path_prefix = "/"
service = "m"

[[route]]
host = "api.example.com"
path_prefix = "/v1/"
service = "m"

[[route]]
host = "API.example.com"
path_prefix = "/v1/chat/"
service = "m"

[[route]]
host = "*.example.com"
path_prefix = "/v1/"
service = "m"

[[route]]
host = "*.example.com"
path_prefix = "/v1/models"
service = "m"

[[route]]
host = "*.eu.example.com"
path_prefix = "/v1/"
service = "m"

[[route]]
host = "*.eu.example.com"
path_prefix = "/v2/"
service = "m"

[[route]]
host = "*.Example.ORG."
path_prefix = "/"
service = "m"

[[route]]
host = "::1"
path_prefix = "/"
service = "m"

[[route]]
host = "localhost"
path_prefix = "/é/"
service = "m"

[[route]]
host = "*"
path_prefix = "/health"
service = "m"

[[route]]
host = "*"
path_prefix = "/v1/"
service = "m"

[[route]]
path_prefix = "/v1/chat/completions"
service = "m"
"#;

fn network() -> &'static Network {
    static NET: OnceLock<Network> = OnceLock::new();
    NET.get_or_init(|| match load_str(CONFIG, Path::new("/tmp/fuzz-routes.toml")) {
        Ok(n) => n,
        Err(e) => panic!("the fuzz target's own config is invalid:\n{e}"),
    })
}

/// `normalize_host` of config/src/routes.rs, restated: trim, take the
/// name out of `[v6]:port` or strip a `:port`, drop one trailing dot,
/// lower-case ASCII. `None` when longer than a host name can be (255).
fn normalize(host: &str) -> Option<String> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.contains(':') => name,
            _ => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    (name.len() <= 255).then(|| name.to_ascii_lowercase())
}

/// The route the documented precedence picks, by scanning every route.
fn reference(net: &Network, host: &str, path: &str) -> Option<RouteId> {
    let host = normalize(host);
    net.routes
        .iter()
        .enumerate()
        .filter(|(_, r)| path.starts_with(r.path_prefix.as_str()))
        .filter_map(|(i, r)| {
            // Specificity: exact, then longer wildcard suffixes, then any.
            let rank = match (&r.host, &host) {
                (HostPattern::Any, _) => (0, 0),
                (HostPattern::Suffix(s), Some(h)) if r.host.matches(h) => (1, s.len()),
                (HostPattern::Exact(e), Some(h)) if e == h => (2, 0),
                _ => return None,
            };
            Some(((rank, r.path_prefix.len()), i))
        })
        // Routes of equal host and prefix are refused by validation, so the
        // maximum is unique; on a tie the first route would win.
        .max_by(|(a, i), (b, j)| a.cmp(b).then(j.cmp(i)))
        .map(|(_, i)| RouteId(i as u32))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (host, path) = text.split_once('\n').unwrap_or((text, "/"));
    let net = network();
    let table = &net.route_table;

    let found = table.find(host, path);
    if let Some(id) = found {
        let route = net.route(id);
        assert!(path.starts_with(route.path_prefix.as_str()), "{:?} does not start {path:?}", route.path_prefix);
        if route.host != HostPattern::Any {
            let h = normalize(host).expect("only `*` routes match overlong hosts");
            assert!(route.host.matches(&h), "{} does not match {h:?}", route.host);
        }
    }
    assert_eq!(found, reference(net, host, path), "host {host:?} path {path:?}");

    // Case, a port and a trailing dot never change the route.
    assert_eq!(table.find(&host.to_ascii_uppercase(), path), found, "upper-cased {host:?}");
    let plain = host == host.trim() && !host.contains(':') && !host.starts_with('[') && !host.ends_with('.');
    if plain {
        assert_eq!(table.find(&format!("{host}:8443"), path), found, "{host:?} with a port");
        assert_eq!(table.find(&format!("{host}."), path), found, "{host:?} with a trailing dot");
    }
});
