//! Metric names and recording helpers, in one place (DESIGN.md lists the
//! families). Recorded through the `metrics` facade; the admin API renders
//! them in the Prometheus text format.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// `stoke_requests_total{route,pool,status}`: requests answered.
pub const REQUESTS_TOTAL: &str = "stoke_requests_total";
/// `stoke_request_duration_seconds`: time from request to the end of the answer.
pub const REQUEST_DURATION: &str = "stoke_request_duration_seconds";
/// `stoke_upstream_ttfb_seconds`: time from forwarding to the replica's response head.
pub const UPSTREAM_TTFB: &str = "stoke_upstream_ttfb_seconds";
/// `stoke_pool_warm_capacity{pool}`: free slots over ready replicas.
pub const POOL_WARM_CAPACITY: &str = "stoke_pool_warm_capacity";
/// `stoke_pool_in_flight{pool}`: requests this edge has on the pool.
pub const POOL_IN_FLIGHT: &str = "stoke_pool_in_flight";
/// `stoke_pool_queue_depth{pool}`: requests held for the pool.
pub const POOL_QUEUE_DEPTH: &str = "stoke_pool_queue_depth";
/// `stoke_wakeups_total{pool,result}`: wake hook calls and wake outcomes.
pub const WAKEUPS_TOTAL: &str = "stoke_wakeups_total";
/// `stoke_wake_duration_seconds{pool}`: time from wake to a ready replica.
pub const WAKE_DURATION: &str = "stoke_wake_duration_seconds";
/// `stoke_sleeps_total{pool}`: sleep hook calls.
pub const SLEEPS_TOTAL: &str = "stoke_sleeps_total";
/// Light sleeps begun (the replicas' own sleep calls), by pool.
pub const LIGHT_SLEEPS_TOTAL: &str = "stoke_light_sleeps_total";
/// Wakes from light sleep that ended with a ready replica, by pool.
pub const LIGHT_WAKEUPS_TOTAL: &str = "stoke_light_wakeups_total";
/// `stoke_config_reloads_total{result}`: reloads, `ok` or `error`.
pub const CONFIG_RELOADS_TOTAL: &str = "stoke_config_reloads_total";
/// `stoke_config_snapshot_version`: version of the live snapshot.
pub const CONFIG_SNAPSHOT_VERSION: &str = "stoke_config_snapshot_version";

/// `stoke_connections_refused_total`: connections closed at accept because
/// `max_connections` were open.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "stoke_connections_refused_total";
/// Counter: requests to pools with `[pool.affinity]`, by how the replica
/// was chosen (`owner`, `spilled`, `none`).
pub const AFFINITY_TOTAL: &str = "stoke_affinity_total";

/// Gauge: 1 while the cluster connection is up.
pub const CLUSTER_CONNECTED: &str = "stoke_cluster_connected";
/// Gauge: other edges whose load reports are fresh.
pub const CLUSTER_PEERS: &str = "stoke_cluster_peers";
/// Counter: wake claims, by result (`won`, `lost`, `alone`).
pub const CLUSTER_CLAIMS_TOTAL: &str = "stoke_cluster_claims_total";
/// Counter: load reports not published (disconnected, or no answer in time).
pub const CLUSTER_PUBLISHES_DROPPED: &str = "stoke_cluster_publishes_dropped_total";

/// Gauge: this process's generation (1 when started by `stoke serve`, one
/// more at each upgrade).
pub const PROCESS_GENERATION: &str = "stoke_process_generation";
/// Gauge: requests and streams that the process this one took over from
/// still has in progress (0 once it has exited).
pub const PREVIOUS_IN_PROGRESS: &str = "stoke_previous_process_in_progress";
/// Counter: upgrades that failed (the new process did not serve), this
/// process serving on.
pub const UPGRADES_FAILED_TOTAL: &str = "stoke_upgrades_failed_total";

/// Counter: spans of request traces, by result (`exported`; `dropped`:
/// the export queue was full; `failed`: the collector did not take them).
pub const TRACE_SPANS_TOTAL: &str = "stoke_trace_spans_total";
/// `stoke_config_cluster_version`: the cluster config version this edge
/// runs (`stoke push`); 0 while it runs its local file.
pub const CONFIG_CLUSTER_VERSION: &str = "stoke_config_cluster_version";
/// `stoke_rollout_verdicts_total{result}`: this edge's health-gate
/// verdicts as a canary, `pass` or `fail`.
pub const ROLLOUT_VERDICTS_TOTAL: &str = "stoke_rollout_verdicts_total";

/// Counter: log lines dropped because the log writer fell behind.
pub const LOG_LINES_DROPPED: &str = "stoke_log_lines_dropped_total";

/// Histogram buckets for latencies: 100 µs to 60 s, roughly ×2.5 apart.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Install the Prometheus recorder for this process (once) and return its
/// handle. Several edges in one process (tests, the demo) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (a host program);
            // then ours only renders what it records itself.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Fold histogram samples into buckets every few seconds. The recorder keeps
/// every sample until it is rendered or upkept, so an edge whose `/metrics`
/// nobody scrapes would otherwise grow by each request's samples forever.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("stoke-metrics-upkeep".to_owned()).spawn(move || loop {
        std::thread::sleep(UPKEEP_INTERVAL);
        handle.run_upkeep();
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the metrics upkeep thread; histograms are folded only when /metrics is scraped");
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS_TOTAL, "Requests answered, by route, pool and status.");
    describe_counter!(
        TRACE_SPANS_TOTAL,
        "Spans of request traces, by result: exported, dropped (queue full), failed (collector)."
    );
    describe_counter!(AFFINITY_TOTAL, "Requests to pools with affinity, by how the replica was chosen.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Time from request to the end of the answer.");
    describe_histogram!(UPSTREAM_TTFB, Unit::Seconds, "Time from forwarding to the replica's response head.");
    describe_gauge!(POOL_WARM_CAPACITY, "Free slots over the pool's ready replicas.");
    describe_gauge!(POOL_IN_FLIGHT, "Requests this edge has in flight on the pool.");
    describe_gauge!(POOL_QUEUE_DEPTH, "Requests held for the pool.");
    describe_counter!(WAKEUPS_TOTAL, "Wake hook calls and wake outcomes, by pool and result.");
    describe_histogram!(WAKE_DURATION, Unit::Seconds, "Time from a wake's start to a ready replica.");
    describe_counter!(SLEEPS_TOTAL, "Sleep hook calls, by pool.");
    describe_counter!(LIGHT_SLEEPS_TOTAL, "Light sleeps begun (each replica's own sleep call), by pool.");
    describe_counter!(LIGHT_WAKEUPS_TOTAL, "Wakes from light sleep that ended with a ready replica, by pool.");
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads, by result.");
    describe_gauge!(CONFIG_SNAPSHOT_VERSION, "Version of the live config snapshot.");
    describe_gauge!(
        CONFIG_CLUSTER_VERSION,
        "The cluster config version this edge runs (stoke push); 0: its local file."
    );
    describe_counter!(ROLLOUT_VERDICTS_TOTAL, "This edge's health-gate verdicts as a rollout's canary, by result.");
    describe_gauge!(CLUSTER_CONNECTED, "1 while this edge is connected to the cluster's NATS server.");
    describe_gauge!(CLUSTER_PEERS, "Other edges whose load reports are fresh.");
    describe_counter!(
        CLUSTER_CLAIMS_TOTAL,
        "Wake claims, by result: won (this edge calls the hook), lost, alone (no cluster)."
    );
    describe_counter!(CLUSTER_PUBLISHES_DROPPED, "Load reports not published: disconnected, or no answer in time.");
    describe_counter!(CONNECTIONS_REFUSED_TOTAL, "Connections closed at accept because max_connections were open.");
    describe_counter!(LOG_LINES_DROPPED, "Log lines dropped because the log writer fell behind (16k lines queued).");
}

/// Status codes as static strings, so that labelling a request allocates nothing for them.
pub fn status_label(status: u16) -> &'static str {
    match status {
        0 => "0",
        200 => "200",
        201 => "201",
        204 => "204",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        411 => "411",
        413 => "413",
        429 => "429",
        431 => "431",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => match status / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}
