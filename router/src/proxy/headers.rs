//! Header policy shared by every protocol: request ids, hop-by-hop headers
//! (RFC 9110 §7.6.1), forwarded headers and the path rewrite.

use http::header::{HeaderName, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING};
use http::HeaderMap;

/// `x-request-id`.
pub const REQUEST_ID: &str = "x-request-id";
/// `x-forwarded-for`.
pub const FORWARDED_FOR: &str = "x-forwarded-for";
/// `x-forwarded-host`.
pub const FORWARDED_HOST: &str = "x-forwarded-host";
/// `x-forwarded-proto`.
pub const FORWARDED_PROTO: &str = "x-forwarded-proto";
/// Debug header: the edge's location id.
pub const STOKE_EDGE: &str = "stoke-edge";
/// Debug header: the pool that served.
pub const STOKE_POOL: &str = "stoke-pool";
/// Debug header: the replica that served.
pub const STOKE_REPLICA: &str = "stoke-replica";
/// Debug header: milliseconds held waiting for capacity or a wake.
pub const STOKE_WAIT_MS: &str = "stoke-wait-ms";

/// Hop-by-hop headers never forwarded in either direction, besides those
/// that `Connection` names. `Transfer-Encoding` is not here: the HTTP layer
/// re-frames bodies itself and needs it. `TE: trailers` is kept (gRPC).
const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "upgrade"];
/// Only meaningful between a client and this proxy.
const REQUEST_ONLY_HOP: &[&str] = &["proxy-authorization"];
/// Only meaningful between this proxy and a client.
const RESPONSE_ONLY_HOP: &[&str] = &["proxy-authenticate"];

/// Which hop-by-hop headers of `headers` to remove before forwarding a
/// request (`request = true`) or a response. Returns names, so that the
/// caller removes them through its own header type (pingora keeps a case
/// map beside the `HeaderMap`).
pub fn hop_by_hop(headers: &HeaderMap, request: bool) -> Vec<HeaderName> {
    let extra = if request { REQUEST_ONLY_HOP } else { RESPONSE_ONLY_HOP };
    let mut out = Vec::new();
    // One pass over the names present: most messages carry none of these,
    // and comparing a few short names is cheaper than hashing each list
    // entry into the map.
    let mut connection = false;
    for name in headers.keys() {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || extra.contains(&n) {
            connection |= name == CONNECTION;
            out.push(name.clone());
        } else if request && name == TE {
            let trailers =
                headers.get(TE).is_some_and(|te| te.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers")));
            if !trailers {
                out.push(TE);
            }
        }
    }
    if connection {
        for value in headers.get_all(CONNECTION) {
            let Ok(v) = value.to_str() else { continue };
            for token in v.split(',') {
                if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes()) {
                    // Connection may not name the headers that frame the body.
                    if name != TRANSFER_ENCODING
                        && name != CONTENT_LENGTH
                        && headers.contains_key(&name)
                        && !out.contains(&name)
                    {
                        out.push(name);
                    }
                }
            }
        }
    }
    out
}

/// Whether `value` is an acceptable client-sent request id: 1 to 128
/// visible ASCII characters.
pub fn valid_request_id(value: &[u8]) -> bool {
    !value.is_empty() && value.len() <= 128 && value.iter().all(|b| b.is_ascii_graphic())
}

/// A new request id: 32 lowercase hex digits (128 random bits).
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for word in [fastrand::u64(..), fastrand::u64(..)] {
        for shift in (0..16).rev() {
            id.push(char::from(HEX[((word >> (shift * 4)) & 0xf) as usize]));
        }
    }
    id
}

/// The path (and query) to forward: `path_and_query` with `prefix`
/// removed when `strip` is set, always starting with `/`.
pub fn forward_path(path_and_query: &str, prefix: &str, strip: bool) -> Option<String> {
    if !strip || prefix == "/" {
        return None;
    }
    let rest = path_and_query.strip_prefix(prefix)?;
    Some(if rest.starts_with('/') { rest.to_owned() } else { format!("/{rest}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn connection_named_and_fixed_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret, transfer-encoding"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        let names = hop_by_hop(&h, true);
        for n in ["connection", "keep-alive", "x-secret", "te", "proxy-authorization"] {
            assert!(names.iter().any(|x| x == n), "{n} not removed: {names:?}");
        }
        assert!(!names.iter().any(|x| x == "transfer-encoding"));
    }

    #[test]
    fn nothing_to_remove_from_ordinary_headers() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("x"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("te", HeaderValue::from_static("trailers"));
        assert!(hop_by_hop(&h, true).is_empty());
        h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
        assert!(hop_by_hop(&h, true).is_empty());
        assert_eq!(hop_by_hop(&h, false), ["proxy-authenticate"]);
    }

    #[test]
    fn connection_naming_te_or_a_fixed_header_lists_it_once() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("TE, Keep-Alive, content-length"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-length", HeaderValue::from_static("3"));
        let names = hop_by_hop(&h, true);
        assert_eq!(names.iter().filter(|n| *n == "keep-alive").count(), 1, "{names:?}");
        assert!(names.iter().any(|n| n == "te"), "{names:?}");
        assert!(!names.iter().any(|n| n == "content-length"), "{names:?}");
    }

    #[test]
    fn te_trailers_is_kept() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        assert!(hop_by_hop(&h, true).is_empty());
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(valid_request_id(id.as_bytes()));
        assert_ne!(id, new_request_id());
    }

    #[test]
    fn prefix_stripping() {
        assert_eq!(forward_path("/infer/v1/chat?x=1", "/infer/", true), Some("/v1/chat?x=1".to_owned()));
        assert_eq!(forward_path("/infer/v1", "/infer", true), Some("/v1".to_owned()));
        assert_eq!(forward_path("/infer", "/infer", true), Some("/".to_owned()));
        assert_eq!(forward_path("/v1/x", "/v1/", false), None);
        assert_eq!(forward_path("/v1/x", "/", true), None);
    }
}
