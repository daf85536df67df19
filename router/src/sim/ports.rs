//! Loopback ports for simulated replicas that start later (when their pool
//! is woken). Such a port is chosen at start and bound only at wake, so a
//! port the kernel may hand out as the ephemeral source port of an outgoing
//! connection (probes, hooks, proxied requests: thousands in a demo) could
//! be taken meanwhile, and the replica would fail to bind. Ports here come
//! from below the kernel's ephemeral range (`ip_local_port_range`), which
//! outgoing connections never use, and are never handed out twice by one
//! process.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::Mutex;

/// Where the kernel picks ephemeral ports (Linux), or its usual default.
pub fn ephemeral_range() -> RangeInclusive<u16> {
    let parsed = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| {
        let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
        Some((it.next()??, it.next()??))
    });
    let (low, high) = parsed.unwrap_or((32768, 60999));
    low..=high
}

/// The ports this module may hand out, given the ephemeral range: below
/// it (from 10000), or above it if there is more room there.
pub fn candidate_range(ephemeral: &RangeInclusive<u16>) -> RangeInclusive<u16> {
    let below = 10_000..=ephemeral.start().saturating_sub(1);
    let above = ephemeral.end().saturating_add(1)..=u16::MAX;
    let len = |r: &RangeInclusive<u16>| (*r.end() as i32 - *r.start() as i32 + 1).max(0);
    if len(&below) >= len(&above) {
        below
    } else {
        above
    }
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback address outside the ephemeral range, not handed out
/// before by this process.
pub fn replica_addr() -> std::io::Result<SocketAddr> {
    let range = candidate_range(&ephemeral_range());
    let (start, len) = (*range.start(), u32::from(*range.end()).saturating_sub(u32::from(*range.start())) + 1);
    if range.is_empty() || len == 0 {
        return Err(std::io::Error::other("no ports outside the ephemeral range"));
    }
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    // A random start, so that processes side by side rarely try the same.
    let offset = fastrand::u32(0..len);
    for i in 0..len {
        let port = (u32::from(start) + (offset + i) % len) as u16;
        if handed.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() {
            handed.insert(port);
            return Ok(addr);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "every port outside the ephemeral range is taken"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_stay_outside_the_ephemeral_range_and_are_not_reused() {
        let ephemeral = ephemeral_range();
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let addr = replica_addr().expect("a port");
            assert!(!ephemeral.contains(&addr.port()), "{addr} is in the ephemeral range {ephemeral:?}");
            assert!(addr.ip().is_loopback());
            assert!(seen.insert(addr.port()), "{addr} handed out twice");
        }
    }

    #[test]
    fn the_larger_side_of_the_ephemeral_range_is_used() {
        assert_eq!(candidate_range(&(32768..=60999)), 10_000..=32767);
        assert_eq!(candidate_range(&(1024..=20000)), 20001..=u16::MAX);
    }
}
