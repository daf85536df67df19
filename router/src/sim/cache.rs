//! The simulated replica's prefix cache, after vLLM's automatic prefix
//! caching: a prompt is cut into blocks of [`BLOCK_TOKENS`] tokens, each
//! block named by a hash of itself and every block before it, and the
//! blocks of recent prompts are kept in an LRU of a fixed size in tokens.
//! A request's cached share is the run of leading blocks found; only the
//! rest needs prefill. Tokens are counted as [`BYTES_PER_TOKEN`] bytes of
//! the prompt's text, near what tokenizers give for English.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::Value;

/// Tokens per cache block (vLLM's default block size).
pub const BLOCK_TOKENS: usize = 16;
/// Bytes of prompt text counted as one token.
pub const BYTES_PER_TOKEN: usize = 4;
/// Default capacity of the cache, in tokens.
pub const DEFAULT_CACHE_TOKENS: usize = 64 * 1024;

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// Tokens in the prompt.
    pub tokens: u64,
    /// Of those, tokens whose blocks were cached.
    pub cached: u64,
}

/// An LRU of prompt blocks.
#[derive(Debug)]
pub struct PrefixCache {
    capacity_blocks: usize,
    inner: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct Lru {
    tick: u64,
    by_hash: HashMap<u64, u64>,
    by_tick: BTreeMap<u64, u64>,
}

impl PrefixCache {
    /// A cache of `capacity_tokens` tokens.
    pub fn new(capacity_tokens: usize) -> Self {
        PrefixCache { capacity_blocks: capacity_tokens / BLOCK_TOKENS, inner: Mutex::new(Lru::default()) }
    }

    /// Look `prompt` up and keep its blocks (the most recent first to stay).
    pub fn lookup(&self, prompt: &[u8]) -> Lookup {
        let block_bytes = BLOCK_TOKENS * BYTES_PER_TOKEN;
        let tokens = prompt.len().div_ceil(BYTES_PER_TOKEN) as u64;
        let mut lru = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (mut cached_blocks, mut prefix_run, mut h) = (0u64, true, 0xcbf2_9ce4_8422_2325u64);
        for block in prompt.chunks_exact(block_bytes) {
            for &b in block {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            if prefix_run && lru.by_hash.contains_key(&h) {
                cached_blocks += 1;
            } else {
                prefix_run = false;
            }
            lru.touch(h, self.capacity_blocks);
        }
        Lookup { tokens, cached: (cached_blocks * BLOCK_TOKENS as u64).min(tokens) }
    }

    /// Forget every block (the KV cache was discarded).
    pub fn clear(&self) {
        let mut lru = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        lru.by_hash.clear();
        lru.by_tick.clear();
    }
}

impl Lru {
    fn touch(&mut self, hash: u64, capacity: usize) {
        if capacity == 0 {
            return;
        }
        self.tick += 1;
        if let Some(old) = self.by_hash.insert(hash, self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, hash);
        while self.by_hash.len() > capacity {
            let Some((_, oldest)) = self.by_tick.pop_first() else { break };
            self.by_hash.remove(&oldest);
        }
    }
}

/// The prompt text of a request body as the model reads it: the roles and
/// contents of a chat's messages in order, or a completion's `prompt`.
pub fn prompt_text(body: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            out.extend_from_slice(m.get("role").and_then(Value::as_str).unwrap_or("").as_bytes());
            out.push(b'\n');
            match m.get("content") {
                Some(Value::String(s)) => out.extend_from_slice(s.as_bytes()),
                Some(other) => out.extend_from_slice(other.to_string().as_bytes()),
                None => {}
            }
            out.push(b'\n');
        }
    } else if let Some(p) = body.get("prompt") {
        match p {
            Value::String(s) => out.extend_from_slice(s.as_bytes()),
            other => out.extend_from_slice(other.to_string().as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_prefix_is_found_block_by_block() {
        let cache = PrefixCache::new(1024);
        let system = "s".repeat(640); // 10 blocks of 64 bytes
        let first = format!("{system}first question");
        let a = cache.lookup(first.as_bytes());
        assert_eq!((a.tokens, a.cached), (164, 0));
        // The same opening, another question: its 10 full blocks are cached.
        let second = format!("{system}second question, longer");
        let b = cache.lookup(second.as_bytes());
        assert_eq!(b.cached, 160);
        // A different opening shares nothing, even with equal later text.
        let other = format!("x{system}");
        assert_eq!(cache.lookup(other.as_bytes()).cached, 0);
    }

    #[test]
    fn the_cache_forgets_the_least_recently_used() {
        let cache = PrefixCache::new(2 * BLOCK_TOKENS); // two blocks
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        cache.lookup(a.as_bytes());
        cache.lookup(b.as_bytes());
        assert_eq!(cache.lookup(a.as_bytes()).cached, 16, "still there");
        cache.lookup("c".repeat(64).as_bytes()); // evicts b, the oldest
        assert_eq!(cache.lookup(b.as_bytes()).cached, 0);
    }

    #[test]
    fn chat_prompts_are_their_messages_in_order() {
        let body: Value = serde_json::json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
        assert_eq!(prompt_text(&body), b"system\nbe brief\nuser\nhi\n");
        assert_eq!(prompt_text(&serde_json::json!({"prompt": "once"})), b"once");
    }
}
