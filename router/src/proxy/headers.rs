//! Header policy shared by every protocol: request ids, hop-by-hop headers
//! (RFC 9110 §7.6.1), forwarded headers and the path rewrite.

use bytes::{Bytes, BytesMut};
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

/// Whether `name` is a hop-by-hop header never forwarded, besides those
/// that `Connection` names: in either direction `connection`,
/// `keep-alive`, `proxy-connection` and `upgrade`; `proxy-authorization`
/// in a request (only meaningful between a client and this proxy) and
/// `proxy-authenticate` in a response. `Transfer-Encoding` is not one: the
/// HTTP layer re-frames bodies itself and needs it. `TE: trailers` is kept
/// (gRPC).
fn is_hop_by_hop(name: &str, request: bool) -> bool {
    // One `match`: a jump on the length, then one comparison.
    match name {
        "connection" | "keep-alive" | "proxy-connection" | "upgrade" => true,
        "proxy-authorization" => request,
        "proxy-authenticate" => !request,
        _ => false,
    }
}

/// Which hop-by-hop headers of `headers` to remove before forwarding a
/// request (`request = true`) or a response. Returns names, so that a
/// caller can remove them in place (the engine) or leave them out of a copy
/// (HTTP/3).
pub fn hop_by_hop(headers: &HeaderMap, request: bool) -> Vec<HeaderName> {
    let mut out = Vec::new();
    // One pass over the names present: most messages carry none of these,
    // and comparing a few short names is cheaper than hashing each list
    // entry into the map.
    let mut connection = false;
    for name in headers.keys() {
        let n = name.as_str();
        if is_hop_by_hop(n, request) {
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
                let token = token.trim();
                // The usual values: `close` names no header, and a
                // `Keep-Alive` header is removed by its name already.
                if token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("close") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
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
pub fn new_request_id() -> Bytes {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (half, word) in [fastrand::u64(..), fastrand::u64(..)].into_iter().enumerate() {
        for (i, digit) in id[half * 16..(half + 1) * 16].iter_mut().enumerate() {
            *digit = HEX[((word >> ((15 - i) * 4)) & 0xf) as usize];
        }
    }
    small_bytes(&id)
}

/// Request ids and client addresses (small values every request sends) are
/// cut from a block of this many bytes per thread: one allocation (and one
/// for the block's count) per 16 request ids, and the copies of an id in
/// the replica's head and the answer's share it. A block is freed when the
/// last request with a value from it ends: an open stream keeps its
/// block (at most this size) alive.
const ID_BLOCK: usize = 512;

thread_local! {
    static ID_BLOCKS: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// `bytes` (a request id, an address) as shared bytes cut from this
/// thread's block.
pub fn small_bytes(bytes: &[u8]) -> Bytes {
    ID_BLOCKS.with(|block| {
        let mut block = block.borrow_mut();
        if block.capacity() < bytes.len() {
            *block = BytesMut::with_capacity(ID_BLOCK.max(bytes.len()));
        }
        block.extend_from_slice(bytes);
        block.split().freeze()
    })
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
        assert!(valid_request_id(&id));
        assert_ne!(id, new_request_id());
        // Ids cut from one block and across blocks stay whole and distinct.
        let ids: Vec<Bytes> = (0..3 * ID_BLOCK / 32).map(|_| new_request_id()).collect();
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|id| &id[..]).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids.iter().all(|id| id.len() == 32 && id.iter().all(u8::is_ascii_hexdigit)));
        let long = [b'x'; 128];
        assert_eq!(&small_bytes(&long)[..], &long[..]);
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
