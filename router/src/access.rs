//! Access control per route: API keys and request rate limits.
//!
//! Keys are kept as SHA-256 digests and looked up by digest, so a lookup
//! takes the same time whatever the presented key shares with a real one,
//! and no key is ever logged. Rate limits are token buckets per API key or
//! per client IP, in a bounded table.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stoke_config::{Auth, AuthHeader};

use crate::error::Reject;

/// A key's digest.
pub type KeyDigest = [u8; 32];

/// SHA-256 of a key.
pub fn digest(key: &[u8]) -> KeyDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The keys a route accepts, as digests.
#[derive(Debug, Default)]
pub struct KeySet {
    digests: HashSet<KeyDigest>,
}

impl KeySet {
    /// Digest every key of `auth`.
    pub fn new(auth: &Auth) -> Self {
        KeySet { digests: auth.keys.iter().map(|k| digest(k.as_bytes())).collect() }
    }

    /// Check the key a request presents (the value of its key header);
    /// returns the key's digest (the rate-limit identity).
    pub fn check(&self, header: &AuthHeader, value: Option<&[u8]>) -> Result<KeyDigest, Reject> {
        let where_ = match header {
            AuthHeader::Bearer => "Authorization: Bearer <key>".to_owned(),
            AuthHeader::Named(name) => format!("the {name} header"),
        };
        let key = value.and_then(|v| match header {
            AuthHeader::Bearer => v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer ")),
            AuthHeader::Named(_) => Some(v),
        });
        let Some(key) = key.map(|k| k.trim_ascii()).filter(|k| !k.is_empty()) else {
            return Err(Reject::client(401, "missing_api_key", format!("this route needs an API key in {where_}")));
        };
        let d = digest(key);
        if self.digests.contains(&d) {
            Ok(d)
        } else {
            Err(Reject::client(401, "invalid_api_key", format!("the API key in {where_} is not valid for this route")))
        }
    }
}

/// Entries per shard of the bucket table; beyond it, idle buckets go first.
pub const MAX_BUCKETS_PER_SHARD: usize = 8192;
const SHARDS: usize = 16;

/// Token buckets, keyed by (route, client identity).
#[derive(Debug)]
pub struct RateLimiter {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<u64, Bucket>>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Who a bucket counts.
#[derive(Debug, Clone, Copy, Hash)]
pub enum Identity<'a> {
    /// An API key (by digest).
    Key(&'a KeyDigest),
    /// A client address.
    Ip(IpAddr),
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter { hasher: RandomState::new(), shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl RateLimiter {
    /// Take one token for `who` on `route` (any value that identifies the
    /// route; rate per second, burst size); `Err(wait)` when the bucket is
    /// empty.
    pub fn take(
        &self,
        route: impl std::hash::Hash,
        who: Identity<'_>,
        rate: f64,
        burst: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let key = self.hasher.hash_one((route, who));
        let shard = &self.shards[(key as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_BUCKETS_PER_SHARD && !map.contains_key(&key) {
            evict(&mut map, rate, burst, now);
        }
        let cap = f64::from(burst.max(1));
        let b = map.entry(key).or_insert(Bucket { tokens: cap, last: now });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(cap);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            // `check` bounds the rate; a wait that still cannot be said is
            // as long as can be.
            Err(Duration::try_from_secs_f64((1.0 - b.tokens) / rate).unwrap_or(Duration::MAX))
        }
    }
}

/// Make room for a batch of new clients at once (so that a full table
/// costs one scan per batch, not per request): drop buckets that have
/// refilled (their clients are idle), and if that frees less than an
/// eighth, the least recently used eighth.
fn evict(map: &mut HashMap<u64, Bucket>, rate: f64, burst: u32, now: Instant) {
    let cap = f64::from(burst.max(1));
    let target = map.len() - map.len() / 8;
    map.retain(|_, b| b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < cap);
    if map.len() > target {
        let mut ages: Vec<Instant> = map.values().map(|b| b.last).collect();
        let cut = map.len() - target;
        ages.select_nth_unstable(cut - 1);
        let oldest_kept = ages[cut - 1];
        map.retain(|_, b| b.last > oldest_kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(header: AuthHeader) -> Auth {
        Auth { keys: vec!["sk-test-0123456789abcdef".into()], header }
    }

    #[test]
    fn bearer_keys() {
        let a = auth(AuthHeader::Bearer);
        let set = KeySet::new(&a);
        assert!(set.check(&a.header, Some(b"Bearer sk-test-0123456789abcdef")).is_ok());
        assert_eq!(
            set.check(&a.header, Some(b"Bearer sk-test-0123456789abcdeX")).map_err(|r| r.code),
            Err("invalid_api_key")
        );
        assert_eq!(set.check(&a.header, Some(b"sk-test-0123456789abcdef")).map_err(|r| r.code), Err("missing_api_key"));
        assert_eq!(set.check(&a.header, None).map_err(|r| r.status), Err(401));
    }

    #[test]
    fn named_header_keys() {
        let a = auth(AuthHeader::Named("x-api-key".into()));
        let set = KeySet::new(&a);
        assert!(set.check(&a.header, Some(b" sk-test-0123456789abcdef ")).is_ok());
        assert!(set.check(&a.header, Some(b"")).is_err());
    }

    #[test]
    fn buckets_allow_a_burst_then_the_rate() {
        let l = RateLimiter::default();
        let ip = Identity::Ip("10.0.0.1".parse().expect("ip"));
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.take("r", ip, 2.0, 5, t0).is_ok());
        }
        let wait = l.take("r", ip, 2.0, 5, t0).expect_err("empty");
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO);
        // Half a second later one token is back.
        assert!(l.take("r", ip, 2.0, 5, t0 + Duration::from_millis(500)).is_ok());
        // Another client and another route have their own buckets.
        assert!(l.take("r", Identity::Ip("10.0.0.2".parse().expect("ip")), 2.0, 5, t0).is_ok());
        assert!(l.take("other", ip, 2.0, 5, t0).is_ok());
    }

    #[test]
    fn the_table_stays_bounded() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_BUCKETS_PER_SHARD * SHARDS * 2) as u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = l.take("r", Identity::Ip(ip), 1.0, 2, t0);
        }
        let total: usize = l.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or(0)).sum();
        assert!(total <= MAX_BUCKETS_PER_SHARD * SHARDS, "{total}");
    }
}
