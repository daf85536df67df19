//! Held streams that say they are held (`hold_keepalive` on a route): a
//! request with `"stream": true` that would wait for a pool to wake gets
//! the `text/event-stream` head at once and an SSE comment every interval
//! naming the pool, its state and the ETA, so that clients and load
//! balancers in front of the edge see a live connection, not a silent one.
//! Once a slot is free, the replica's stream follows on the same response;
//! if the hold fails, an SSE error event in OpenAI's shape ends it. The
//! protocol adapters write the bytes; this holds the policy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use stoke_config::{PoolId, ServiceId};

use super::admit::{self, Admitted};
use super::headers;
use super::policy;
use crate::clock;
use crate::core::wait::remaining_wake;
use crate::error::Reject;
use crate::state::{Live, Router};

/// A streaming request to be held with keep-alive comments.
#[derive(Debug)]
pub struct HeldStream {
    /// The service.
    pub service: ServiceId,
    /// The whole body (it was read to find the service).
    pub body: Bytes,
    /// The pool placement chose when it was decided.
    pub pool: PoolId,
    /// The request's wait.
    pub max_wait: Duration,
    /// How often a comment is sent.
    pub interval: Duration,
    /// Its affinity keys.
    pub keys: super::admit::Keys,
}

/// Whether the top-level `stream` field of a JSON body is `true`.
pub fn stream_requested(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Flag {
        #[serde(default)]
        stream: bool,
    }
    serde_json::from_slice::<Flag>(body).is_ok_and(|f| f.stream)
}

/// The head of a held stream: 200, `text/event-stream`, no caching, the
/// request id, the edge's debug header and `Alt-Svc` where they apply.
pub fn head(
    request_id: &policy::RequestId,
    live: &Live,
    alt_svc: Option<&HeaderValue>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut h = vec![
        (http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
        (http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (HeaderName::from_static(headers::REQUEST_ID), request_id.value()),
    ];
    if live.snapshot.network.edge.debug_headers {
        h.push((HeaderName::from_static(headers::STOKE_EDGE), policy::value(&live.snapshot.edge_location().id)));
    }
    if let Some(alt) = alt_svc {
        h.push((http::header::ALT_SVC, alt.clone()));
    }
    h
}

/// The comment line for a request held for `pool` at `now`: its state and
/// what is left of its expected wait.
pub fn comment(live: &Live, pool: PoolId, now: Instant) -> Bytes {
    let view = live.pool(pool);
    let state = view.state.condition(view.is_warm(), view.scales);
    let eta = match view.state.waking_since() {
        Some(since) => remaining_wake(view.state.expected_wake(), since, now),
        None => Duration::from_micros(u64::from(view.status(now).wait_us.unwrap_or(0))),
    };
    Bytes::from(format!(": {state} {}, eta {}s\n\n", view.state.id, eta.as_secs_f64().ceil() as u64))
}

/// The SSE event that ends a held stream whose hold failed (or whose
/// replica failed): OpenAI's error object as the event's data.
pub fn error_event(reject: &Reject) -> Bytes {
    Bytes::from(format!("data: {}\n\n", reject.body()))
}

/// A held stream's replica answered other than 200: the head already sent
/// said 200, so this becomes the stream's error event.
pub fn replica_refused(status: u16) -> Reject {
    Reject::bad_gateway(format!("the replica answered {status}"))
}

/// A held stream's replica failed while its answer streamed.
pub fn replica_failed(e: &super::upstream::UpstreamError) -> Reject {
    Reject::bad_gateway(format!("the replica failed mid-stream: {}", e.kind()))
}

/// What the adapter does next while a stream is held.
pub enum Step {
    /// Send this comment; stop if the client is gone.
    Say(Bytes),
    /// The hold is over: a slot, or why not.
    Done(Result<Admitted, Reject>),
}

type AdmitFuture<'a> = Pin<Box<dyn Future<Output = Result<Admitted, Reject>> + Send + 'a>>;

/// A held stream's admission, with its comments.
pub struct KeptAlive<'a> {
    admit: AdmitFuture<'a>,
    tick: tokio::time::Interval,
    live: &'a Live,
    pool: PoolId,
}

impl<'a> KeptAlive<'a> {
    /// Admit `held` (which arrived at `started`); the client is watched
    /// by the comments' writes.
    /// A hold is noted in `hold` for the request's trace.
    pub fn new(
        router: &'a Arc<Router>,
        live: &'a Arc<Live>,
        held: &'a HeldStream,
        started: Instant,
        hold: &'a mut Option<crate::otel::Hold>,
    ) -> Self {
        let admit =
            admit::admit(router, live, held.service, started, held.max_wait, std::future::pending(), &held.keys, hold);
        let mut tick = tokio::time::interval(held.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        KeptAlive { admit: Box::pin(admit), tick, live, pool: held.pool }
    }

    /// The next step: a comment is due (the first at once), or the hold
    /// is over.
    pub async fn next(&mut self) -> Step {
        tokio::select! {
            // The admission first: its first turn starts the wake that the
            // first comment reports.
            biased;
            done = &mut self.admit => Step::Done(done),
            _ = self.tick.tick() => Step::Say(comment(self.live, self.pool, clock::now())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_true_stream_field_counts() {
        assert!(stream_requested(br#"{"model":"m","stream":true}"#));
        assert!(!stream_requested(br#"{"model":"m","stream":false}"#));
        assert!(!stream_requested(br#"{"model":"m"}"#));
        assert!(!stream_requested(br#"{"model":"m","stream":"yes"}"#));
        assert!(!stream_requested(br#"{"model":"m","meta":{"stream":true}}"#));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_stream_hears_from_the_edge_every_interval_until_its_slot() {
        let router = crate::testing::two_pools(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        let live = router.live();
        let service = live.snapshot.network.service_id("m").expect("service");
        let held = HeldStream {
            service,
            body: Bytes::new(),
            pool: PoolId(0),
            max_wait: Duration::from_secs(60),
            interval: Duration::from_secs(5),
            keys: Default::default(),
        };
        let started = clock::now();
        let mut hold = None;
        let mut kept = KeptAlive::new(&router, &live, &held, started, &mut hold);
        let mut said = Vec::new();
        let done = loop {
            match kept.next().await {
                Step::Say(line) => {
                    said.push((clock::now() - started, String::from_utf8_lossy(&line).into_owned()));
                    if said.len() == 3 {
                        // The pool comes up.
                        live.pools[0].replicas[0].set_ready(true);
                        live.pools[0].dispatch(clock::now());
                    }
                }
                Step::Done(r) => break r,
            }
        };
        assert!(done.is_ok(), "{done:?}");
        let at: Vec<u64> = said.iter().map(|(t, _)| t.as_secs()).collect();
        assert_eq!(at, [0, 5, 10], "{said:?}");
        assert_eq!(said[0].1, ": waking fra-gpu, eta 20s\n\n");
        // (Its hook points at a closed port: the state may read wake_failed
        // by now; the ETA still counts down.)
        assert!(said[2].1.starts_with(": ") && said[2].1.ends_with(" fra-gpu, eta 10s\n\n"), "{said:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_that_fails_ends_in_an_error_event() {
        let reject = Reject::unavailable("wait_timeout", "held too long", Duration::from_secs(1));
        let event = String::from_utf8(error_event(&reject).to_vec()).expect("text");
        let data = event.strip_prefix("data: ").and_then(|d| d.strip_suffix("\n\n")).expect("an SSE data line");
        let v: serde_json::Value = serde_json::from_str(data).expect("json");
        assert_eq!(v["error"]["code"], "wait_timeout");
    }
}
