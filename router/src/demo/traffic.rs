//! The demo's users: at each edge location, requests arrive as a Poisson
//! process whose rate follows the local time of day (busy afternoons, quiet
//! nights), with a day compressed into a few minutes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{watch, Semaphore};

use super::world::Site;

/// Requests per second at an edge at its daily peak, times the site's demand.
pub const PEAK_RATE: f64 = 4.0;

/// Requests in flight per edge at most (the generator never piles up).
pub const MAX_IN_FLIGHT_PER_EDGE: usize = 64;

/// The compressed clock: `day` of real time is 24 hours; it starts at
/// `start_hour` UTC.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Real start.
    pub started: Instant,
    /// Real duration of one day.
    pub day: Duration,
    /// UTC hour at the start.
    pub start_hour: f64,
}

impl Clock {
    /// UTC hour now, 0 ≤ h < 24.
    pub fn utc_hour(&self) -> f64 {
        let frac = self.started.elapsed().as_secs_f64() / self.day.as_secs_f64().max(0.001);
        (self.start_hour + frac * 24.0).rem_euclid(24.0)
    }

    /// Real time that one simulated hour takes.
    pub fn hour(&self) -> Duration {
        self.day / 24
    }
}

pub use crate::simulate::day::{daylight, local_hour, DAY_ENDS, DAY_STARTS, NIGHT_FLOOR};

/// What the users saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Answered 2xx.
    pub ok: AtomicU64,
    /// Requests that were held (stoke-wait-ms > 0).
    pub held: AtomicU64,
    /// Total time held, milliseconds.
    pub held_ms: AtomicU64,
    latency: Mutex<Histogram>,
}

impl Stats {
    /// Latency percentile in milliseconds (`q` in 0..=1).
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency.lock().map(|h| h.quantile(q)).unwrap_or(0.0)
    }

    fn record(&self, ok: bool, latency: Duration, waited_ms: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
        if waited_ms > 0 {
            self.held.fetch_add(1, Ordering::Relaxed);
            self.held_ms.fetch_add(waited_ms, Ordering::Relaxed);
        }
        if let Ok(mut h) = self.latency.lock() {
            h.record(latency);
        }
    }
}

/// Log-spaced latency buckets from 1 ms to about 100 s: bounded memory,
/// about 5 % precision.
#[derive(Debug)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const BUCKETS_PER_DOUBLING: f64 = 16.0;

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; (17.0 * BUCKETS_PER_DOUBLING) as usize + 1], total: 0 }
    }
}

impl Histogram {
    fn record(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = if ms <= 1.0 { 0 } else { (ms.log2() * BUCKETS_PER_DOUBLING) as usize };
        let i = i.min(self.counts.len() - 1);
        self.counts[i] += 1;
        self.total += 1;
    }

    fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let target = (q.clamp(0.0, 1.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return 2f64.powf((i as f64 + 0.5) / BUCKETS_PER_DOUBLING);
            }
        }
        0.0
    }
}

/// Requests the demo remembers sending, at most (a day of the default
/// demo is a few thousand).
pub const MAX_RECORDED: usize = 1_000_000;

/// Every request the demo's users sent, as a trace for `stoke simulate`
/// (`t` from the demo's start): replayed at the end for the summary's
/// comparison, and written out with `--record`.
pub type Recorder = Arc<Mutex<Vec<crate::simulate::TraceRequest>>>;

/// When the next request of a Poisson process at `rate` per second comes
/// (`u` uniform in 0..1), if it comes within `check`; `None`: look again
/// after `check` (the rate may have changed). At a zero rate, never.
pub fn next_arrival(rate: f64, check: Duration, u: f64) -> Option<Duration> {
    if rate <= 0.0 {
        return None;
    }
    let gap = Duration::from_secs_f64(-(1.0 - u).ln() / rate);
    (gap <= check).then_some(gap)
}

/// Send requests to the edge at `addr` (for `site`) until `stop`.
pub async fn run_site(
    site: &'static Site,
    addr: SocketAddr,
    clock: Clock,
    stats: Arc<Stats>,
    record: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_EDGE));
    let mut rng = fastrand::Rng::new();
    loop {
        let rate = PEAK_RATE * site.demand * daylight(local_hour(clock.utc_hour(), site.lon));
        // Poisson arrivals. The rate changes with the hour, so wait at most
        // a simulated quarter hour before looking at it again (arrivals are
        // memoryless: drawing anew then is exact).
        let check = clock.hour() / 4;
        let next = next_arrival(rate, check, rng.f64());
        tokio::select! {
            _ = tokio::time::sleep(next.unwrap_or(check)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if next.is_none() {
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let (client, stats) = (client.clone(), stats.clone());
        let big = rng.f64() < 0.2;
        let stream = rng.bool();
        let max_tokens = rng.u32(8..48);
        let record = record.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let model = if big { "llama-3.1-70b" } else { "llama-3.1-8b" };
            let body = serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": "Tell me about the edge."}],
                "max_tokens": max_tokens,
                "stream": stream,
            })
            .to_string();
            {
                let r = crate::simulate::TraceRequest {
                    t: clock.started.elapsed().as_secs_f64(),
                    edge: site.id.to_owned(),
                    model: model.to_owned(),
                    // As the simulated replica counts them: 4 bytes a token.
                    prompt_tokens: (body.len() / 4).max(1) as u32,
                    output_tokens: max_tokens,
                    session: None,
                };
                if let Ok(mut out) = record.lock() {
                    if out.len() < MAX_RECORDED {
                        out.push(r);
                    }
                }
            }
            let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)));
            let Ok(req) = req else { return };
            let started = Instant::now();
            let outcome = tokio::time::timeout(Duration::from_secs(60), async {
                let resp = client.request(req).await.ok()?;
                let ok = resp.status().is_success();
                let waited = resp
                    .headers()
                    .get("stoke-wait-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                let body_ok = resp.into_body().collect().await.is_ok();
                Some((ok && body_ok, waited))
            })
            .await;
            let (ok, waited) = outcome.ok().flatten().unwrap_or((false, 0));
            stats.record(ok, started.elapsed(), waited);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_follows_the_sun() {
        assert_eq!(daylight(3.0), NIGHT_FLOOR);
        assert_eq!(daylight(21.5), NIGHT_FLOOR);
        assert!(daylight(14.5) > 0.95, "early afternoon peak");
        assert!(daylight(9.0) < daylight(12.0));
        // 13:30 UTC is early afternoon in Frankfurt and midnight in Sydney.
        assert!(daylight(local_hour(13.5, 8.68)) > 0.8);
        assert_eq!(daylight(local_hour(13.5, 151.21)), NIGHT_FLOOR);
    }

    #[test]
    fn nobody_asks_at_night() {
        let check = Duration::from_millis(2500);
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(next_arrival(0.0, check, u), None, "a zero rate sends nothing");
        }
        assert_eq!(next_arrival(2.0, check, 0.0), Some(Duration::ZERO));
        assert!(next_arrival(2.0, check, 0.5).is_some_and(|g| g < Duration::from_millis(400)));
        assert_eq!(next_arrival(0.001, check, 0.5), None, "not within this look");
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        for ms in 1..=1000 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((450.0..=550.0).contains(&p50), "{p50}");
        assert!((940.0..=1050.0).contains(&p99), "{p99}");
    }
}
