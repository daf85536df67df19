//! The demo's network: the ten locations of `config/examples/network.toml`,
//! GPU pools in seven of them (one H100 in Frankfurt always on, the
//! network's fallback; six pools that scale to zero with their region's
//! day), all on loopback ports chosen at start.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

/// A location of the demo network.
pub struct Site {
    /// Id.
    pub id: &'static str,
    /// Display name.
    pub name: &'static str,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Relative demand at its daily peak (big metros send more).
    pub demand: f64,
}

/// The ten edge locations.
pub const SITES: &[Site] = &[
    Site { id: "fra", name: "Frankfurt", lat: 50.11, lon: 8.68, demand: 1.0 },
    Site { id: "par", name: "Paris", lat: 48.86, lon: 2.35, demand: 1.0 },
    Site { id: "lon", name: "London", lat: 51.51, lon: -0.13, demand: 1.2 },
    Site { id: "iad", name: "Washington DC", lat: 38.91, lon: -77.04, demand: 0.8 },
    Site { id: "nyc", name: "New York", lat: 40.71, lon: -74.01, demand: 1.3 },
    Site { id: "sfo", name: "San Francisco", lat: 37.77, lon: -122.42, demand: 1.2 },
    Site { id: "gru", name: "São Paulo", lat: -23.55, lon: -46.63, demand: 0.7 },
    Site { id: "sin", name: "Singapore", lat: 1.35, lon: 103.82, demand: 0.9 },
    Site { id: "nrt", name: "Tokyo", lat: 35.68, lon: 139.69, demand: 1.1 },
    Site { id: "syd", name: "Sydney", lat: -33.87, lon: 151.21, demand: 0.6 },
];

/// A GPU pool of the demo.
pub struct PoolSpec {
    /// Id.
    pub id: &'static str,
    /// Location id.
    pub location: &'static str,
    /// Models served.
    pub serves: &'static [&'static str],
    /// Replica count.
    pub replicas: usize,
    /// Cold start (simulated boot time); `None`: always on.
    pub wake_time: Option<Duration>,
}

/// The pools: one Frankfurt H100 stays on as the network's fallback (and
/// carries the night's few requests); every other pool wakes with its
/// region's day and sleeps through its night.
pub const POOLS: &[PoolSpec] = &[
    PoolSpec {
        id: "fra-h100",
        location: "fra",
        serves: &["llama-3.1-8b", "llama-3.1-70b"],
        replicas: 1,
        wake_time: None,
    },
    PoolSpec {
        id: "iad-h100",
        location: "iad",
        serves: &["llama-3.1-8b", "llama-3.1-70b"],
        replicas: 2,
        wake_time: Some(Duration::from_secs(5)),
    },
    PoolSpec {
        id: "par-l40s",
        location: "par",
        serves: &["llama-3.1-8b"],
        replicas: 1,
        wake_time: Some(Duration::from_secs(3)),
    },
    PoolSpec {
        id: "sfo-a100",
        location: "sfo",
        serves: &["llama-3.1-8b"],
        replicas: 2,
        wake_time: Some(Duration::from_secs(4)),
    },
    PoolSpec {
        id: "gru-l4",
        location: "gru",
        serves: &["llama-3.1-8b"],
        replicas: 1,
        wake_time: Some(Duration::from_secs(3)),
    },
    PoolSpec {
        id: "sin-l4",
        location: "sin",
        serves: &["llama-3.1-8b"],
        replicas: 1,
        wake_time: Some(Duration::from_secs(3)),
    },
    PoolSpec {
        id: "nrt-h100",
        location: "nrt",
        serves: &["llama-3.1-8b", "llama-3.1-70b"],
        replicas: 1,
        wake_time: Some(Duration::from_secs(5)),
    },
];

/// Loopback addresses the world uses.
pub struct Ports {
    /// The simulated orchestrator.
    pub orchestrator: SocketAddr,
    /// Replicas, per pool in [`POOLS`] order.
    pub replicas: Vec<Vec<SocketAddr>>,
}

/// The idle window of the demo's scaling pools: `idle_timeout = "auto"`
/// within these bounds (a demo hour is 10 s: from 12 minutes to 6 hours
/// of its day).
pub const MIN_IDLE: Duration = Duration::from_secs(2);
/// See [`MIN_IDLE`].
pub const MAX_IDLE: Duration = Duration::from_secs(60);

/// The light depth of the demo's scaling pools: vLLM's sleep mode (the
/// simulated replicas speak it), waking in half a second (a demo hour is
/// 10 s: about three minutes of its day), at 30 % of an awake replica.
pub const LIGHT: &str = "light = { kind = \"vllm\" }\nlight_wake_time = \"500ms\"\nlight_cost = 0.3";

/// The config text of the demo network. Every edge listens on a free
/// port (port 0) with its own admin listener. Pools that scale have
/// `idle_timeout` (`None`: `"auto"` within [`MIN_IDLE`]..[`MAX_IDLE`]),
/// and with `light` the light depth [`LIGHT`] before it.
pub fn config(ports: &Ports, idle_timeout: Option<Duration>, light: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# The stoke demo network (generated).\n[edge]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         debug_headers = true\nthreads = 1\ndrain_timeout = \"5s\"\n\
         # Every replica is on loopback: rank by the locations' distance.\nmeasure_rtt = false\n"
    );
    for site in SITES {
        let _ = writeln!(
            s,
            "[[location]]\nid = \"{}\"\nname = \"{}\"\nlat = {}\nlon = {}\n",
            site.id, site.name, site.lat, site.lon
        );
    }
    for (pool, reps) in POOLS.iter().zip(&ports.replicas) {
        let serves = pool.serves.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ");
        let replicas = reps.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            s,
            "[[pool]]\nid = \"{}\"\nlocation = \"{}\"\nserves = [{serves}]\nreplicas = [{replicas}]\n\
             max_concurrency = 8\nmax_queue = 128\n\
             health = {{ path = \"/health\", interval = \"1s\", timeout = \"500ms\" }}\n\
             load = {{ path = \"/metrics\", format = \"vllm\", interval = \"1s\" }}",
            pool.id, pool.location
        );
        if let Some(wake) = pool.wake_time {
            let orch = ports.orchestrator;
            let idle = match idle_timeout {
                Some(d) => format!("idle_timeout = \"{}ms\"", d.as_millis()),
                None => format!(
                    "idle_timeout = \"auto\"\nmin_idle = \"{}ms\"\nmax_idle = \"{}ms\"",
                    MIN_IDLE.as_millis(),
                    MAX_IDLE.as_millis()
                ),
            };
            let light = if light {
                // With a fixed deep window, the light one is half of it.
                match idle_timeout {
                    Some(d) => format!("{LIGHT}\nlight_timeout = \"{}ms\"\n", (d / 2).as_millis().max(1)),
                    None => format!("{LIGHT}\n"),
                }
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "[pool.scale]\n{idle}\nwake_time = \"{}ms\"\n{light}\
                 wake = {{ url = \"http://{orch}/pools/{id}/wake\" }}\n\
                 sleep = {{ url = \"http://{orch}/pools/{id}/sleep\" }}",
                wake.as_millis(),
                id = pool.id,
            );
        }
        s.push('\n');
    }
    s.push_str(
        "[[route]]\nname = \"openai\"\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"20s\"\n",
    );
    s
}

/// Fixed loopback addresses for the demo's config where nothing listens
/// on them (a replay, a validity check).
fn placeholder_ports() -> Ports {
    Ports {
        orchestrator: SocketAddr::from(([127, 0, 0, 1], 7000)),
        replicas: POOLS
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (0..p.replicas).map(|j| SocketAddr::from(([127, 0, 0, 1], 9000 + (i * 10 + j) as u16))).collect()
            })
            .collect(),
    }
}

/// The demo's config as `stoke simulate --demo` replays it: the same
/// network, with placeholder replica addresses (a replay opens no socket),
/// as one cluster, as the demo runs where `nats-server` is installed.
pub fn replay_config() -> String {
    let d = super::DemoOptions::default();
    let mut text = config(&placeholder_ports(), d.idle_timeout, d.light);
    text.push_str("\n[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\nname = \"stoke-demo\"\n");
    text
}

/// How fast the demo's simulated replicas work: no prefill time, and the
/// simulated orchestrator's token rate.
pub fn replica_rates() -> crate::simulate::Rates {
    crate::simulate::Rates { prefill_tps: 0.0, decode_tps: crate::sim::OrchestratorOptions::default().tokens_per_sec }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_is_valid() {
        for (idle, light) in [(None, false), (Some(Duration::from_secs(30)), true)] {
            let text = config(&placeholder_ports(), idle, light);
            let network =
                stoke_config::load_str(&text, std::path::Path::new("demo.toml")).unwrap_or_else(|e| panic!("{e}"));
            let lights = network.pools.iter().filter(|p| p.scale.as_ref().is_some_and(|s| s.light.is_some())).count();
            assert_eq!(lights, if light { POOLS.len() - 1 } else { 0 });
        }
        let text = config(&placeholder_ports(), None, true);
        let network =
            stoke_config::load_str(&text, std::path::Path::new("demo.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(network.locations.len(), 10);
        assert_eq!(network.edge_locations().count(), 10);
        assert_eq!(network.pools.len(), POOLS.len());
        let syd = network.for_edge(Some("syd")).unwrap_or_else(|e| panic!("{e}"));
        let llama = syd.network.service_id("llama-3.1-8b").expect("service");
        // Sydney has no pool of its own: Singapore is its nearest.
        assert_eq!(syd.network.pool(syd.candidates(llama)[0].pool).id, "sin-l4");
    }
}
