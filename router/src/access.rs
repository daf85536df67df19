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

/// Entries per shard of the bucket table. Beyond it, buckets that have
/// refilled (their clients are idle: dropping them changes nothing) make
/// room; a client with a debt is never forgotten, so a flood of new
/// addresses cannot reset anyone's bucket. New clients that find no room
/// share one overflow bucket per shard and route until room appears.
pub const MAX_BUCKETS_PER_SHARD: usize = 8192;
const SHARDS: usize = 16;

/// How often a full shard looks for refilled buckets to drop.
const EVICT_EVERY: Duration = Duration::from_millis(100);

/// Wrong API keys a client may present in a burst (per route), before it
/// is refused with 429 for a while.
pub const FAILED_KEY_BURST: u32 = 10;
/// Wrong API keys a client may present per second after its burst: one
/// every 6 s (10 a minute).
pub const FAILED_KEY_RATE: f64 = 10.0 / 60.0;

/// Token buckets, keyed by (route, client identity).
#[derive(Debug)]
pub struct RateLimiter {
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
}

#[derive(Debug, Default)]
struct Shard {
    buckets: HashMap<u64, Bucket>,
    /// Shared by the new clients a full shard cannot take in.
    overflow: Option<Bucket>,
    last_evict: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    cap: f64,
}

impl Bucket {
    fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let cap = f64::from(burst.max(1));
        Bucket { tokens: cap, last: now, rate, cap }
    }

    /// Refill up to `now`.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.cap);
        self.last = now;
    }

    /// Whether it would be full at `now`: the same as a new bucket.
    fn refilled(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate >= self.cap
    }

    /// How long until a whole token is back.
    fn wait(&self) -> Duration {
        // The config bounds the rate; a wait that still cannot be said is
        // as long as can be.
        Duration::try_from_secs_f64((1.0 - self.tokens).max(0.0) / self.rate).unwrap_or(Duration::MAX)
    }
}

/// Who a bucket counts.
#[derive(Debug, Clone, Copy, Hash)]
pub enum Identity<'a> {
    /// An API key (by digest).
    Key(&'a KeyDigest),
    /// A client: an IPv4 address, or an IPv6 /64 (one subscriber's
    /// allocation, whose addresses are free to rotate).
    Ip(IpAddr),
    /// A client's wrong API keys (same grouping as [`Identity::Ip`]).
    FailedKeys(IpAddr),
}

impl Identity<'_> {
    /// The identity of the client at `ip`, IPv6 grouped by /64.
    pub fn client(ip: IpAddr) -> Identity<'static> {
        Identity::Ip(client_prefix(ip))
    }

    /// The identity counting the wrong keys of the client at `ip`.
    pub fn failed_keys(ip: IpAddr) -> Identity<'static> {
        Identity::FailedKeys(client_prefix(ip))
    }
}

/// The part of an address that identifies a client: the whole of an IPv4
/// address (also when mapped into IPv6), the /64 prefix of an IPv6 one.
pub fn client_prefix(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter { hasher: RandomState::new(), shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect() }
    }
}

impl RateLimiter {
    /// Take one token for `who` on `route` (any value that identifies the
    /// route; rate per second, burst size) at `now`; `Err(wait)` when the
    /// bucket is empty.
    pub fn take(
        &self,
        route: impl std::hash::Hash,
        who: Identity<'_>,
        rate: f64,
        burst: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        self.with_bucket(route, who, rate, burst, now, |b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Ok(())
            } else {
                Err(b.wait())
            }
        })
    }

    /// Whether `who` has a token on `route` now, without taking it.
    pub fn peek(
        &self,
        route: impl std::hash::Hash,
        who: Identity<'_>,
        rate: f64,
        burst: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        self.with_bucket(route, who, rate, burst, now, |b| if b.tokens >= 1.0 { Ok(()) } else { Err(b.wait()) })
    }

    fn with_bucket<R>(
        &self,
        route: impl std::hash::Hash,
        who: Identity<'_>,
        rate: f64,
        burst: u32,
        now: Instant,
        f: impl FnOnce(&mut Bucket) -> R,
    ) -> R {
        let key = self.hasher.hash_one((route, who));
        let mut shard = self.shards[(key as usize) % SHARDS].lock().unwrap_or_else(|e| e.into_inner());
        let shard = &mut *shard;
        if shard.buckets.len() >= MAX_BUCKETS_PER_SHARD && !shard.buckets.contains_key(&key) {
            let due = shard.last_evict.is_none_or(|t| now.saturating_duration_since(t) >= EVICT_EVERY);
            if due {
                shard.last_evict = Some(now);
                shard.buckets.retain(|_, b| !b.refilled(now));
            }
            if shard.buckets.len() >= MAX_BUCKETS_PER_SHARD {
                let b = shard.overflow.get_or_insert_with(|| Bucket::new(rate, burst, now));
                b.refill(now);
                return f(b);
            }
        }
        let b = shard.buckets.entry(key).or_insert_with(|| Bucket::new(rate, burst, now));
        b.refill(now);
        f(b)
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
    fn ipv6_clients_are_counted_by_their_64() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(l.take("r", Identity::client(a), 1.0, 1, t0).is_ok());
        assert!(l.take("r", Identity::client(same_64), 1.0, 1, t0).is_err(), "a new address in the same /64");
        assert!(l.take("r", Identity::client(other_64), 1.0, 1, t0).is_ok());
        // IPv4, mapped or not, is one address.
        let v4: IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert!(l.take("r", Identity::client(v4), 1.0, 1, t0).is_ok());
        assert!(l.take("r", Identity::client(mapped), 1.0, 1, t0).is_err());
        assert!(l.take("r", Identity::client("10.0.0.2".parse().expect("ip")), 1.0, 1, t0).is_ok());
    }

    #[test]
    fn a_flood_of_new_addresses_cannot_reset_a_clients_bucket() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        let me = Identity::client("192.0.2.1".parse().expect("ip"));
        assert!(l.take("r", me, 0.01, 1, t0).is_ok());
        assert!(l.take("r", me, 0.01, 1, t0).is_err(), "limited");
        // Twice the table's size of new clients, over a few seconds.
        for i in 0..(MAX_BUCKETS_PER_SHARD * SHARDS * 2) as u32 {
            let ip = IpAddr::from((i | 0x0a00_0000).to_be_bytes());
            let _ = l.take("r", Identity::client(ip), 0.01, 1, t0 + Duration::from_millis(u64::from(i) / 64));
        }
        assert!(l.take("r", me, 0.01, 1, t0 + Duration::from_secs(10)).is_err(), "still limited after the flood");
    }

    #[test]
    fn the_table_stays_bounded() {
        let l = RateLimiter::default();
        let t0 = Instant::now();
        for i in 0..(MAX_BUCKETS_PER_SHARD * SHARDS * 2) as u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let _ = l.take("r", Identity::Ip(ip), 1.0, 2, t0);
        }
        let total: usize = l.shards.iter().map(|s| s.lock().map(|m| m.buckets.len()).unwrap_or(0)).sum();
        assert!(total <= MAX_BUCKETS_PER_SHARD * SHARDS, "{total}");
    }
}
