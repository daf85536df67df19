//! What a replay measured: per policy and per pool, GPU-seconds, wakes,
//! requests answered and refused, hold times and times to first token; as
//! a table for a terminal and as the JSON of the contract.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

/// Samples of one latency, kept whole (a replay's requests fit in memory;
/// exact percentiles beat bucketed ones when policies are compared).
#[derive(Clone, Debug, Default)]
pub struct Samples(Vec<f32>);

impl Samples {
    /// Add a sample, in milliseconds.
    pub fn push(&mut self, ms: f64) {
        self.0.push(ms as f32);
    }

    /// The `q` quantile (nearest rank), 0 without samples.
    pub fn quantile(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable_by(f32::total_cmp);
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        f64::from(self.0[rank - 1])
    }

    /// The largest sample, 0 without samples.
    pub fn max(&self) -> f64 {
        self.0.iter().copied().fold(0.0f32, f32::max).into()
    }
}

/// The figures of one policy, for the whole network or one pool.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Replica time awake, boot included, and in light sleep at its
    /// `light_cost`.
    pub gpu_seconds: f64,
    /// Of that, the pools that scale to zero in the config as written (the
    /// part an idle policy changes).
    pub scaling_gpu_seconds: f64,
    /// Times a sleeping pool was started (its replicas booted).
    pub wakes: u64,
    /// Wake hook calls made (with resends and one per edge).
    pub wake_calls: u64,
    /// Wakes the home edge started ahead of an expected busy period.
    pub prewarms: u64,
    /// Sleep hook calls made.
    pub sleeps: u64,
    /// Light sleeps begun (the replicas' own sleep).
    pub light_sleeps: u64,
    /// Wakes from light sleep.
    pub light_wakes: u64,
    /// Replica time in light sleep (counted in `gpu_seconds` at the light
    /// depth's cost).
    pub light_seconds: f64,
    /// Requests.
    pub requests: u64,
    /// Answered by a replica.
    pub ok: u64,
    /// Answered 503 (or 404 for a model nobody serves), by reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Answered 502: the replica went away under the request.
    pub failed: u64,
    /// Time held for capacity or a wake, every answered request (0 if not held).
    pub hold_ms: Samples,
    /// Time to first token, requests answered by a replica.
    pub ttft_ms: Samples,
    /// Prompt tokens looked up in the replicas' prefix caches.
    pub cache_queried: u64,
    /// Of those, found cached.
    pub cache_hits: u64,
}

impl Figures {
    /// Requests refused, whatever the reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    /// Share of requests answered by a replica.
    pub fn ok_share(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            self.ok as f64 / self.requests as f64
        }
    }

    fn json(&mut self) -> Value {
        json!({
            "gpu_seconds": round(self.gpu_seconds, 1),
            "scaling_gpu_seconds": round(self.scaling_gpu_seconds, 1),
            "wakes": self.wakes,
            "wake_calls": self.wake_calls,
            "prewarms": self.prewarms,
            "sleeps": self.sleeps,
            "light_sleeps": self.light_sleeps,
            "light_wakes": self.light_wakes,
            "light_seconds": round(self.light_seconds, 1),
            "requests": self.requests,
            "ok": self.ok,
            "refused": self.refused_total(),
            "refused_by_reason": self.refused,
            "failed": self.failed,
            "hold_ms": {
                "p50": round(self.hold_ms.quantile(0.5), 1),
                "p99": round(self.hold_ms.quantile(0.99), 1),
                "max": round(self.hold_ms.max(), 1),
            },
            "ttft_ms": {
                "p50": round(self.ttft_ms.quantile(0.5), 1),
                "p99": round(self.ttft_ms.quantile(0.99), 1),
            },
            "prefix_cache": {
                "queried_tokens": self.cache_queried,
                "hit_tokens": self.cache_hits,
                "hit_rate": round(if self.cache_queried == 0 { 0.0 } else { self.cache_hits as f64 / self.cache_queried as f64 }, 3),
            },
        })
    }
}

fn round(x: f64, places: i32) -> f64 {
    let k = 10f64.powi(places);
    (x * k).round() / k
}

/// One policy's outcome.
#[derive(Clone, Debug)]
pub struct PolicyReport {
    /// The policy as given (`fixed:5m`).
    pub policy: String,
    /// The whole network.
    pub total: Figures,
    /// Per pool id, config order.
    pub pools: Vec<(String, Figures)>,
    /// The idle window each scaling pool ended with (`auto`: as chosen), per pool id.
    pub windows: Vec<(String, String)>,
    /// Seconds of virtual time replayed.
    pub horizon_s: f64,
    /// Wall-clock seconds the replay took.
    pub took_s: f64,
}

/// The whole report.
#[derive(Clone, Debug)]
pub struct Report {
    /// About the trace: source, format, requests, span, mapping.
    pub trace: Value,
    /// One per policy, in the order asked.
    pub policies: Vec<PolicyReport>,
}

impl Report {
    /// The JSON of the contract (`stoke simulate --json`).
    pub fn json(&mut self) -> Value {
        let policies: Vec<Value> = self
            .policies
            .iter_mut()
            .map(|p| {
                let mut v = p.total.json();
                let pools: serde_json::Map<String, Value> =
                    p.pools.iter_mut().map(|(id, f)| (id.clone(), f.json())).collect();
                v["policy"] = json!(p.policy);
                v["pools"] = Value::Object(pools);
                v["idle_windows"] = json!(p.windows.iter().cloned().collect::<BTreeMap<_, _>>());
                v["horizon_s"] = json!(round(p.horizon_s, 1));
                v["replay_wall_s"] = json!(round(p.took_s, 2));
                v
            })
            .collect();
        json!({"trace": self.trace, "policies": policies})
    }

    /// A table for a terminal: one line per policy, then per pool.
    pub fn table(&mut self) -> String {
        let mut s = String::new();
        let always_on = self.policies.iter().find(|p| p.policy == "always-on").map(|p| p.total.gpu_seconds);
        let _ = writeln!(
            s,
            "{:<14} {:>10} {:>6} {:>6} {:>6} {:>8} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "policy",
            "GPU-s",
            "vs on",
            "wakes",
            "light",
            "requests",
            "ok %",
            "refused",
            "hold p50",
            "hold p99",
            "hold max",
            "ttft p50",
            "ttft p99"
        );
        for p in &mut self.policies {
            line(&mut s, &p.policy, &mut p.total, always_on);
        }
        for p in &mut self.policies {
            let _ = writeln!(s, "\n{} (replayed {:.0} s of trace in {:.2} s)", p.policy, p.horizon_s, p.took_s);
            for (id, f) in &mut p.pools {
                line(&mut s, &format!("  {id}"), f, None);
            }
            if !p.windows.is_empty() {
                let w: Vec<String> = p.windows.iter().map(|(id, w)| format!("{id} {w}")).collect();
                let _ = writeln!(s, "  idle windows: {}", w.join(", "));
            }
        }
        s
    }
}

fn line(s: &mut String, name: &str, f: &mut Figures, always_on: Option<f64>) {
    let vs = match always_on {
        Some(a) if a > 0.0 => format!("{:.2}", f.gpu_seconds / a),
        _ => "".into(),
    };
    let ms = |x: f64| if x >= 10_000.0 { format!("{:.1}s", x / 1000.0) } else { format!("{x:.0}ms") };
    let _ = writeln!(
        s,
        "{:<14} {:>10.0} {:>6} {:>6} {:>6} {:>8} {:>8.2} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        name,
        f.gpu_seconds,
        vs,
        f.wakes,
        f.light_wakes,
        f.requests,
        f.ok_share() * 100.0,
        f.refused_total() + f.failed,
        ms(f.hold_ms.quantile(0.5)),
        ms(f.hold_ms.quantile(0.99)),
        ms(f.hold_ms.max()),
        ms(f.ttft_ms.quantile(0.5)),
        ms(f.ttft_ms.quantile(0.99)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut s = Samples::default();
        assert_eq!(s.quantile(0.5), 0.0);
        for x in 1..=100 {
            s.push(f64::from(x));
        }
        assert_eq!((s.quantile(0.5), s.quantile(0.99), s.max()), (50.0, 99.0, 100.0));
    }
}
