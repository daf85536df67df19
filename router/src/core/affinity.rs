//! Prompt-cache affinity: requests that share a key (a prompt's opening, a
//! session header, a body field) go to the same replica of a pool, from
//! every edge, with no state shared between edges.
//!
//! A pool's ready replicas are ordered by rendezvous (highest-random-weight)
//! hashing of the key (Thaler and Ravishankar), computed from the key and
//! each replica's address alone, so every edge orders them alike and a
//! replica that leaves or joins moves only the keys it owns. The first
//! replica in that order wins unless its load is above `max_load` × the
//! pool's mean load + 1 (bounded-load consistent hashing, Mirrokni, Thorup
//! and Zadimoghaddam 2018); then the next one does. Hashes are FNV-1a with
//! a SplitMix64 finish: fixed, so that every build of every edge agrees.

use serde::Deserialize;
use stoke_config::{Affinity, AffinityKey};

use super::pick::ReplicaLoad;

/// How a request's replica was chosen, for the metric and the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    /// The key's first replica.
    Owner,
    /// A later one: the first was over the load bound or full.
    Spilled,
    /// No key: the pool's ordinary pick.
    None,
}

impl Chosen {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Chosen::Owner => "owner",
            Chosen::Spilled => "spilled",
            Chosen::None => "none",
        }
    }
}

/// FNV-1a over `bytes`, finished with SplitMix64: stable across builds.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// SplitMix64's finalizer.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The rendezvous weight of a replica (by the hash of its address) for `key`.
#[inline]
pub fn weight(key: u64, replica: u64) -> u64 {
    mix(key ^ replica.rotate_left(17))
}

/// Pick a replica for `key` among `replicas` (with `ids`, the hashes of
/// their addresses) with a free slot under `max`: the highest weight within
/// the load bound, else the highest weight with a free slot; `None` if none
/// has one. No allocation.
pub fn pick<R: ReplicaLoad>(replicas: &[R], ids: &[u64], max: u32, key: u64, max_load: f64) -> Option<(usize, Chosen)> {
    let (mut ready, mut busy) = (0u32, 0u64);
    for r in replicas {
        if r.free(max) > 0 || r.busy() > 0 {
            ready += 1;
            busy += u64::from(r.busy());
        }
    }
    let bound = if ready == 0 { 0.0 } else { max_load * busy as f64 / f64::from(ready) + 1.0 };
    // The owner: the highest weight among replicas that take requests.
    let mut owner: Option<(u64, usize)> = None;
    let mut within: Option<(u64, usize)> = None;
    for (i, r) in replicas.iter().enumerate() {
        if r.free(max) == 0 {
            continue;
        }
        let w = weight(key, ids[i]);
        if owner.is_none_or(|(best, _)| w > best) {
            owner = Some((w, i));
        }
        if f64::from(r.busy()) + 1.0 <= bound && within.is_none_or(|(best, _)| w > best) {
            within = Some((w, i));
        }
    }
    let (_, owner) = owner?;
    match within {
        Some((_, i)) if i == owner => Some((i, Chosen::Owner)),
        Some((_, i)) => Some((i, Chosen::Spilled)),
        // Everyone over the bound (a burst): the owner still has room.
        None => Some((owner, Chosen::Owner)),
    }
}

/// The request data a key may come from.
pub struct KeySource<'a> {
    /// The JSON body, if the edge read it.
    pub body: Option<&'a [u8]>,
    /// A request header's value (names lower-case).
    pub header: &'a dyn Fn(&str) -> Option<&'a [u8]>,
    /// A top-level string field of the JSON body.
    pub field: &'a dyn Fn(&str) -> Option<String>,
}

/// The key of a request for a pool with `affinity`; `None` when the
/// request has none (no such header, a body that is not JSON or has no
/// messages): it is then served without affinity, never refused.
pub fn key(affinity: &Affinity, source: &KeySource<'_>) -> Option<u64> {
    match &affinity.key {
        AffinityKey::Header(name) => (source.header)(name).filter(|v| !v.is_empty()).map(hash),
        AffinityKey::BodyField(field) => (source.field)(field).filter(|v| !v.is_empty()).map(|v| hash(v.as_bytes())),
        AffinityKey::Prefix => prefix(source.body?, affinity.prefix_bytes).map(|p| hash(&p)),
    }
}

#[derive(Deserialize)]
struct Prompted {
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: serde_json::Value,
}

/// The conversation's opening as the model sees it, at most `limit` bytes:
/// for a chat, the roles and contents of its leading messages through the
/// first user turn (so later turns keep the key, however short the first
/// was); for a completion, its `prompt`. Independent of JSON key order and
/// whitespace (contents that are not plain text are written canonically).
pub fn prefix(body: &[u8], limit: usize) -> Option<Vec<u8>> {
    let p: Prompted = serde_json::from_slice(body).ok()?;
    let mut out = Vec::new();
    if let Some(messages) = p.messages {
        if messages.is_empty() {
            return None;
        }
        for m in &messages {
            out.extend_from_slice(m.role.as_bytes());
            out.push(0);
            match &m.content {
                serde_json::Value::String(s) => out.extend_from_slice(s.as_bytes()),
                // serde_json's map is ordered by key: a canonical form.
                other => out.extend_from_slice(other.to_string().as_bytes()),
            }
            out.push(0x1e);
            if m.role == "user" || out.len() >= limit {
                break;
            }
        }
    } else {
        match p.prompt? {
            serde_json::Value::String(s) => out.extend_from_slice(s.as_bytes()),
            other => out.extend_from_slice(other.to_string().as_bytes()),
        }
    }
    if out.is_empty() {
        return None;
    }
    out.truncate(limit);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::core::pick::fake::Fake;

    fn ids(n: u64) -> Vec<u64> {
        (0..n).map(|i| hash(format!("10.0.0.{i}:8000").as_bytes())).collect()
    }

    fn idle(n: usize) -> Vec<Fake> {
        vec![Fake { ready: true, busy: 0 }; n]
    }

    #[test]
    fn the_same_key_picks_the_same_replica_and_keys_spread() {
        let (reps, ids) = (idle(8), ids(8));
        let mut per = [0u32; 8];
        for k in 0..8000u64 {
            let (i, how) = pick(&reps, &ids, 16, hash(&k.to_le_bytes()), 1.25).expect("room");
            assert_eq!(how, Chosen::Owner);
            assert_eq!(pick(&reps, &ids, 16, hash(&k.to_le_bytes()), 1.25).map(|p| p.0), Some(i), "deterministic");
            per[i] += 1;
        }
        assert!(per.iter().all(|&n| (800..1200).contains(&n)), "keys spread evenly: {per:?}");
    }

    #[test]
    fn a_replica_that_leaves_moves_only_its_own_keys() {
        let ids = ids(6);
        let all = idle(6);
        let mut without = idle(6);
        without[2].ready = false;
        for k in 0..3000u64 {
            let key = hash(&k.to_le_bytes());
            let before = pick(&all, &ids, 16, key, 1.25).expect("room").0;
            let after = pick(&without, &ids, 16, key, 1.25).expect("room").0;
            if before != 2 {
                assert_eq!(after, before, "key {k} moved though its replica stayed");
            } else {
                assert_ne!(after, 2);
            }
        }
        // And one that joins takes keys only for itself.
        for k in 0..3000u64 {
            let key = hash(&k.to_le_bytes());
            let (before, after) = (
                pick(&without, &ids, 16, key, 1.25).expect("room").0,
                pick(&all, &ids, 16, key, 1.25).expect("room").0,
            );
            assert!(after == before || after == 2, "key {k} moved from {before} to {after}");
        }
    }

    #[test]
    fn a_hot_key_spills_under_load_and_returns_when_it_drops() {
        let ids = ids(4);
        let key = hash(b"the system prompt everyone shares");
        let mut reps = idle(4);
        let owner = pick(&reps, &ids, 64, key, 1.25).expect("room").0;
        // The owner is far busier than the mean: the next replica takes it.
        reps[owner].busy = 10;
        let (spill, how) = pick(&reps, &ids, 64, key, 1.25).expect("room");
        assert_ne!(spill, owner);
        assert_eq!(how, Chosen::Spilled);
        // Load evens out again: back to the owner.
        for r in reps.iter_mut() {
            r.busy = 3;
        }
        assert_eq!(pick(&reps, &ids, 64, key, 1.25), Some((owner, Chosen::Owner)));
        // A full owner is passed over whatever the bound.
        reps[owner].busy = 64;
        assert_ne!(pick(&reps, &ids, 64, key, 1.25).expect("room").0, owner);
    }

    #[test]
    fn the_prefix_is_the_conversations_opening() {
        let first = br#"{"model":"m","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"hi"}]}"#;
        let later = br#"{"messages":[{"content":"You are terse.","role":"system"},{"role":"user","content":"hi"},{"role":"assistant","content":"Hello."},{"role":"user","content":"more"}],
            "model" : "m", "stream": true}"#;
        assert_eq!(prefix(first, 4096), prefix(later, 4096), "later turns, key order and whitespace do not change it");
        let other = br#"{"model":"m","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"bye"}]}"#;
        assert_ne!(prefix(first, 4096), prefix(other, 4096));
        // Bounded: a long opening is cut at prefix_bytes.
        let long = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(10_000));
        assert_eq!(prefix(long.as_bytes(), 64).map(|p| p.len()), Some(64));
        // Completions hash their prompt.
        assert_eq!(prefix(br#"{"prompt":"Once upon"}"#, 4096), Some(b"Once upon".to_vec()));
        // Parts written canonically, whatever their key order.
        let a = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#;
        let b = br#"{"messages":[{"role":"user","content":[{"text":"hi","type":"text"}]}]}"#;
        assert_eq!(prefix(a, 4096), prefix(b, 4096));
    }

    #[test]
    fn requests_without_a_key_have_none() {
        assert_eq!(prefix(b"not json", 4096), None);
        assert_eq!(prefix(br#"{"model":"m"}"#, 4096), None);
        assert_eq!(prefix(br#"{"messages":[]}"#, 4096), None);
        let affinity = Affinity { key: AffinityKey::Header("x-session-id".into()), prefix_bytes: 4096, max_load: 1.25 };
        let (none, no_field) = (|_: &str| None, |_: &str| None);
        assert_eq!(key(&affinity, &KeySource { body: None, header: &none, field: &no_field }), None);
        let some = |_: &str| Some(&b"s-1"[..]);
        assert_eq!(key(&affinity, &KeySource { body: None, header: &some, field: &no_field }), Some(hash(b"s-1")));
    }

    #[test]
    fn hashes_are_fixed_across_builds() {
        // Every edge must agree: these values never change.
        assert_eq!(hash(b""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash(b"a"), mix(0xaf63_dc4c_8601_ec8c));
    }
}
