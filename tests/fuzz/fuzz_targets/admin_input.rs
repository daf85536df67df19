//! Small pure functions that take text from outside: the admin token
//! comparison, a replica's Prometheus load report, the client's
//! `stoke-max-wait-ms` header, durations and sizes, and API keys.
//!
//! Input: the first byte picks the check (`'0'`–`'8'`, or any byte modulo
//! 9), the rest is its payload; checks that take two values split it at
//! the first newline.
//!
//! | byte | check |
//! | --- | --- |
//! | 0 | `admin::constant_time_eq(a, b)` agrees with `a == b` |
//! | 1, 2, 3 | `load::parse_load` (vLLM, TGI, SGLang): the total is the sum of its lines' |
//! | 4 | `routing::max_wait(route ms, header)` never exceeds the route's |
//! | 5 | `duration::parse_duration`: `format_duration` of its result parses back to it |
//! | 6 | `duration::parse_size`: its result written as digits parses back to it |
//! | 7, 8 | `access::KeySet::check` (Bearer, `x-api-key`): accepts exactly the configured keys |
//!

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use stoke_config::duration::{format_duration, parse_duration, parse_size};
use stoke_config::{Auth, AuthHeader, LoadFormat};
use stoke_router::access::{digest, KeySet};
use stoke_router::admin::constant_time_eq;
use stoke_router::control::load::{metric_names, parse_load};
use stoke_router::proxy::admit::max_wait;

const KEY: &str = "sk-test-0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Some((&first, payload)) = data.split_first() else { return };
    let check = if (b'0'..=b'8').contains(&first) { first - b'0' } else { first % 9 };
    match check {
        0 => tokens(payload),
        1 => load(payload, LoadFormat::Vllm),
        2 => load(payload, LoadFormat::Tgi),
        3 => load(payload, LoadFormat::Sglang),
        4 => wait(payload),
        5 => duration(payload),
        6 => size(payload),
        7 => keys(payload, AuthHeader::Bearer),
        _ => keys(payload, AuthHeader::Named("x-api-key".to_owned())),
    }
});

fn split(payload: &[u8]) -> (&[u8], Option<&[u8]>) {
    match payload.iter().position(|&b| b == b'\n') {
        Some(i) => (&payload[..i], Some(&payload[i + 1..])),
        None => (payload, None),
    }
}

fn tokens(payload: &[u8]) {
    let (a, b) = split(payload);
    let b = b.unwrap_or(b"");
    assert_eq!(constant_time_eq(a, b), a == b, "{a:?} vs {b:?}");
    assert!(constant_time_eq(a, a));
}

/// The report sums running and waiting over every line (label set), each
/// line's value rounded once at the end: so the whole is within one per
/// counted line of the sum of the lines read alone, and `None` exactly
/// when no line counts.
fn load(payload: &[u8], format: LoadFormat) {
    let Ok(text) = std::str::from_utf8(payload) else { return };
    let total = parse_load(text, format);
    let (mut sum, mut counted) = (0u64, 0u64);
    for line in text.lines() {
        if let Some(n) = parse_load(line, format) {
            sum += u64::from(n);
            counted += 1;
        }
    }
    let (running, waiting) = metric_names(format);
    match total {
        None => assert_eq!(counted, 0, "None, yet {counted} lines count alone: {text:?}"),
        Some(n) => {
            assert!(counted > 0, "Some({n}) but no line counts alone: {text:?}");
            assert!(text.contains(running) || text.contains(waiting));
            let cap = u64::from(u32::MAX);
            let (lo, hi) = (sum.saturating_sub(counted).min(cap), (sum + counted).min(cap));
            assert!((lo..=hi).contains(&u64::from(n)), "{n} outside {lo}..={hi} for {text:?}");
        }
    }
}

fn wait(payload: &[u8]) {
    let (route, header) = split(payload);
    let route_max = std::str::from_utf8(route)
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis);
    let got = max_wait(route_max, header);
    assert!(got <= route_max, "{got:?} > {route_max:?}");
    let asked = header.and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| h.trim().parse::<u64>().ok());
    let expected = asked.map_or(route_max, |ms| route_max.min(Duration::from_millis(ms)));
    assert_eq!(got, expected, "header {header:?}");
}

fn duration(payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else { return };
    if let Some(d) = parse_duration(text) {
        assert_eq!(d.subsec_nanos() % 1_000_000, 0, "{text:?} parsed below a millisecond");
        let written = format_duration(d);
        assert_eq!(parse_duration(&written), Some(d), "{text:?} → {d:?} → {written:?}");
    }
}

fn size(payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else { return };
    if let Some(n) = parse_size(text) {
        assert_eq!(parse_size(&n.to_string()), Some(n), "{text:?} → {n}");
    }
}

/// Payload: configured key, newline, presented header value; or, with no
/// newline, the presented value against a fixed key.
fn keys(payload: &[u8], header: AuthHeader) {
    let (key, presented) = match split(payload) {
        (k, Some(v)) => match std::str::from_utf8(k) {
            Ok(k) => (k.to_owned(), v),
            Err(_) => return,
        },
        (v, None) => (KEY.to_owned(), v),
    };
    let auth = Auth { keys: vec![key.clone()], header: header.clone() };
    let set = KeySet::new(&auth);

    let missing = set.check(&header, None).expect_err("no header, no entry");
    assert_eq!((missing.status, missing.code), (401, "missing_api_key"));

    let stripped = match header {
        AuthHeader::Bearer => presented.strip_prefix(b"Bearer ").or_else(|| presented.strip_prefix(b"bearer ")),
        AuthHeader::Named(_) => Some(presented),
    };
    let candidate = stripped.map(<[u8]>::trim_ascii).filter(|k| !k.is_empty());
    match (set.check(&header, Some(presented)), candidate) {
        (Ok(d), Some(k)) => {
            assert_eq!(k, key.as_bytes(), "accepted a key that is not the configured one");
            assert_eq!(d, digest(key.as_bytes()));
        }
        (Ok(_), None) => panic!("accepted {presented:?}, which presents no key"),
        (Err(r), Some(k)) => {
            assert_ne!(k, key.as_bytes(), "refused the configured key: {r:?}");
            assert_eq!((r.status, r.code), (401, "invalid_api_key"));
        }
        (Err(r), None) => assert_eq!((r.status, r.code), (401, "missing_api_key")),
    }
}
