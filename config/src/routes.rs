//! Route matching: by host (exact, `*.suffix`, or any) and the longest path
//! prefix, with no heap allocation per lookup.
//!
//! Host groups are tried from the most specific to the least: the exact
//! host, then wildcard suffixes from the longest, then routes for any host.
//! Within a group the longest matching `path_prefix` wins; if no prefix of a
//! group matches, the next group is tried, so a catch-all `host = "*"` route
//! still serves paths that a host's own routes leave out.

use std::collections::HashMap;
use std::fmt;

/// Index of a route in the network's routes, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub u32);

impl RouteId {
    /// As a slice index.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Longest host name that can match an exact or wildcard route (RFC 1035
/// limits names to 253 characters); longer hosts only match `*` routes.
const MAX_HOST_LEN: usize = 255;

/// The host part of a route or of a `[[tls]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `*` (or no `host` key): any host.
    Any,
    /// An exact host name, lower-cased.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (any depth), stored
    /// lower-cased with its leading dot.
    Suffix(String),
}

impl HostPattern {
    /// Parse a pattern as written in the file; the error says what would be accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        if lower == "*" {
            return Ok(HostPattern::Any);
        }
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (lower.as_str(), false),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let valid_label = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let is_ipv6 = !wildcard && name.contains(':') && name.parse::<std::net::Ipv6Addr>().is_ok();
        if name.is_empty() || name.len() > 253 || !(is_ipv6 || name.split('.').all(valid_label)) {
            return Err(format!(
                "\"{text}\" is not a host pattern; expected a host name such as \"api.example.com\", a wildcard such as \"*.example.com\", or \"*\" for any host"
            ));
        }
        Ok(if wildcard { HostPattern::Suffix(format!(".{name}")) } else { HostPattern::Exact(name.to_owned()) })
    }

    /// Whether a lower-cased host name (no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

/// Routes of one host group, found by longest prefix.
#[derive(Debug, Default)]
struct Prefixes {
    /// Distinct prefix lengths present, longest first.
    lengths: Vec<usize>,
    by_prefix: HashMap<Box<str>, RouteId>,
}

impl Prefixes {
    fn insert(&mut self, prefix: &str, id: RouteId) {
        // The first route with a given host and prefix wins; validation
        // reports the duplicate.
        self.by_prefix.entry(prefix.into()).or_insert(id);
        if let Err(pos) = self.lengths.binary_search_by(|l| prefix.len().cmp(l)) {
            self.lengths.insert(pos, prefix.len());
        }
    }

    #[inline]
    fn find(&self, path: &str) -> Option<RouteId> {
        for &len in &self.lengths {
            if len <= path.len() && path.is_char_boundary(len) {
                if let Some(&id) = self.by_prefix.get(&path[..len]) {
                    return Some(id);
                }
            }
        }
        None
    }
}

/// All routes, ready for matching.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<Box<str>, Prefixes>,
    /// Wildcard routes by suffix (`".example.com"`).
    suffixes: HashMap<Box<str>, Prefixes>,
    any: Prefixes,
}

impl RouteTable {
    /// Build the table over the routes' host patterns and path prefixes,
    /// in route order (positions become [`RouteId`]s).
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a HostPattern, &'a str)>) -> Self {
        let mut table = RouteTable::default();
        for (i, (host, prefix)) in routes.into_iter().enumerate() {
            let id = RouteId(i as u32);
            match host {
                HostPattern::Any => table.any.insert(prefix, id),
                HostPattern::Exact(h) => table.exact.entry(h.as_str().into()).or_default().insert(prefix, id),
                HostPattern::Suffix(s) => table.suffixes.entry(s.as_str().into()).or_default().insert(prefix, id),
            }
        }
        table
    }

    /// The route for a request: `host` as sent (`Host` header or
    /// `:authority`, any case, with or without port), `path` the request
    /// path (query allowed; it never matches a prefix that ends before it).
    pub fn find(&self, host: &str, path: &str) -> Option<RouteId> {
        let mut buf = [0u8; MAX_HOST_LEN];
        if let Some(host) = normalize_host(host, &mut buf) {
            if let Some(p) = self.exact.get(host) {
                if let Some(id) = p.find(path) {
                    return Some(id);
                }
            }
            // Every suffix of the host that starts at a dot, longest first:
            // one lookup per label, however many wildcard hosts there are.
            if !self.suffixes.is_empty() {
                for (i, _) in host.match_indices('.').filter(|(i, _)| *i > 0) {
                    if let Some(p) = self.suffixes.get(&host[i..]) {
                        if let Some(id) = p.find(path) {
                            return Some(id);
                        }
                    }
                }
            }
        }
        self.any.find(path)
    }
}

/// Strip the port and a trailing dot and lower-case the host into `buf`.
/// `None` if it does not fit or is not valid UTF-8 after lower-casing.
fn normalize_host<'b>(host: &str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b str> {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.contains(':') => name,
            _ => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let bytes = name.as_bytes();
    if bytes.len() > buf.len() {
        return None;
    }
    let out = &mut buf[..bytes.len()];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &str)]) -> RouteTable {
        let hosts: Vec<HostPattern> =
            routes.iter().map(|(h, _)| HostPattern::parse(h).expect("valid pattern")).collect();
        RouteTable::new(hosts.iter().zip(routes.iter().map(|(_, p)| *p)))
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[("api.example.com", "/"), ("api.example.com", "/v1/"), ("api.example.com", "/v1/chat/")]);
        assert_eq!(t.find("api.example.com", "/v1/chat/completions"), Some(RouteId(2)));
        assert_eq!(t.find("api.example.com", "/v1/models"), Some(RouteId(1)));
        assert_eq!(t.find("api.example.com", "/health"), Some(RouteId(0)));
    }

    #[test]
    fn host_is_case_insensitive_and_port_is_ignored() {
        let t = table(&[("api.example.com", "/v1/")]);
        assert_eq!(t.find("API.Example.COM:8443", "/v1/x"), Some(RouteId(0)));
        assert_eq!(t.find("api.example.com.", "/v1/x"), Some(RouteId(0)));
        assert_eq!(t.find("other.example.com", "/v1/x"), None);
    }

    #[test]
    fn exact_then_wildcard_then_any() {
        let t = table(&[
            ("*", "/"),
            ("*.example.com", "/v1/"),
            ("*.eu.example.com", "/v1/"),
            ("api.example.com", "/v1/chat/"),
        ]);
        assert_eq!(t.find("api.example.com", "/v1/chat/x"), Some(RouteId(3)));
        // api.example.com has no route for /v1/models: falls to the wildcard.
        assert_eq!(t.find("api.example.com", "/v1/models"), Some(RouteId(1)));
        assert_eq!(t.find("a.eu.example.com", "/v1/models"), Some(RouteId(2)));
        assert_eq!(t.find("example.com", "/v1/models"), Some(RouteId(0)));
        assert_eq!(t.find("elsewhere.org", "/anything"), Some(RouteId(0)));
    }

    #[test]
    fn ipv6_hosts() {
        let t = table(&[("::1", "/")]);
        assert_eq!(t.find("[::1]:8080", "/x"), Some(RouteId(0)));
    }

    #[test]
    fn overlong_host_only_matches_any() {
        let long = "a".repeat(400);
        let t = table(&[("*.example.com", "/"), ("*", "/v1/")]);
        assert_eq!(t.find(&long, "/v1/x"), Some(RouteId(1)));
        assert_eq!(t.find(&long, "/other"), None);
    }

    #[test]
    fn patterns() {
        assert_eq!(HostPattern::parse("*").ok(), Some(HostPattern::Any));
        assert_eq!(HostPattern::parse("*.Example.com").ok(), Some(HostPattern::Suffix(".example.com".into())));
        assert_eq!(HostPattern::parse("API.example.com").ok(), Some(HostPattern::Exact("api.example.com".into())));
        for bad in ["", "a..b", "foo bar", "*.", "*.*.example.com", "ex*ample.com"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        let s = HostPattern::Suffix(".example.com".into());
        assert!(s.matches("a.b.example.com"));
        assert!(!s.matches("example.com"));
        assert!(!s.matches("badexample.com"));
    }

    #[test]
    fn non_ascii_paths_do_not_panic() {
        let t = table(&[("*", "/é")]);
        assert_eq!(t.find("x", "/é/x"), Some(RouteId(0)));
        assert_eq!(t.find("x", "/\u{1F600}"), None);
    }
}
