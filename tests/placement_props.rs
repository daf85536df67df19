//! Property tests of the placement decisions: `placement::place` over
//! random ranked candidates and pool states, `pick::pick` over random
//! replicas and seeds, and `Live::place` over random generated networks.
//! Each property is stated against a slow reference written from the
//! modules' documentation, not from their code.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use proptest::prelude::*;
use stoke_config::{Candidate, PoolId, ServiceId};
use stoke_router::core::pick::{pick, ReplicaLoad};
use stoke_router::core::placement::{place, Decision, Placement, PoolStatus};
use stoke_router::state::Router;

// ---- placement::place ------------------------------------------------------

/// RTTs and waits that often tie (small) and sometimes are anything.
fn micros() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..4, 0u32..200_000, any::<u32>()]
}

fn pool_status() -> impl Strategy<Value = PoolStatus> {
    (prop::option::weighted(0.8, micros()), any::<bool>(), any::<bool>())
        .prop_map(|(wait_us, free_slot, cold)| PoolStatus { wait_us, free_slot, cold })
}

/// Ranked candidates as a snapshot has them (nearest first, pool ids in
/// any order) and each pool's status, by pool id.
fn ranked() -> impl Strategy<Value = (Vec<Candidate>, Vec<PoolStatus>)> {
    (0usize..8)
        .prop_flat_map(|n| {
            let ids = Just((0..n as u32).collect::<Vec<_>>()).prop_shuffle();
            (ids, prop::collection::vec(micros(), n), prop::collection::vec(pool_status(), n))
        })
        .prop_map(|(ids, mut rtts, statuses)| {
            rtts.sort_unstable();
            let candidates = ids.iter().zip(rtts).map(|(&id, rtt_us)| Candidate { pool: PoolId(id), rtt_us }).collect();
            (candidates, statuses)
        })
}

/// The decision as documented: the lowest `rtt + wait` among pools that
/// can take or hold the request, ties to the nearer; `Forward` when that
/// pool has a free slot, else `Hold` for its wait. The nearest cold pool
/// is reported when it is strictly nearer than the chosen pool (any cold
/// pool when none is chosen).
fn reference(candidates: &[Candidate], statuses: &[PoolStatus]) -> Placement {
    let status = |c: &Candidate| statuses[c.pool.index()];
    let mut best: Option<(u64, usize)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if let Some(wait) = status(c).wait_us {
            let cost = u64::from(c.rtt_us) + u64::from(wait);
            // Strictly lower only: the earlier (nearer) candidate keeps a tie.
            if best.is_none_or(|(b, _)| cost < b) {
                best = Some((cost, i));
            }
        }
    }
    let chosen = best.map(|(_, i)| candidates[i]);
    let decision = match chosen {
        None => Decision::NoCapacity,
        Some(c) if status(&c).free_slot => Decision::Forward { pool: c.pool },
        Some(c) => Decision::Hold { pool: c.pool, eta_us: status(&c).wait_us.unwrap_or_default() },
    };
    let nearest_cold = candidates.iter().find(|c| status(c).cold);
    let passed_over_cold = match chosen {
        Some(ch) => nearest_cold.filter(|c| c.rtt_us < ch.rtt_us).map(|c| c.pool),
        None => nearest_cold.map(|c| c.pool),
    };
    Placement { decision, passed_over_cold }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn place_picks_the_fastest_available_pool((candidates, statuses) in ranked()) {
        let asked = RefCell::new(Vec::new());
        let p = place(&candidates, |id| {
            asked.borrow_mut().push(id);
            statuses[id.index()]
        });

        // It only asks about candidates, each at most once.
        let asked = asked.into_inner();
        for id in &asked {
            prop_assert!(candidates.iter().any(|c| c.pool == *id), "asked about {id:?}, not a candidate");
            prop_assert_eq!(asked.iter().filter(|a| *a == id).count(), 1, "asked twice about {:?}", id);
        }

        let status_of = |pool: PoolId| statuses[pool.index()];
        let available: Vec<&Candidate> = candidates.iter().filter(|c| status_of(c.pool).wait_us.is_some()).collect();
        match p.decision {
            Decision::Forward { pool } => {
                prop_assert!(status_of(pool).wait_us.is_some(), "forwarded to an unavailable pool");
                prop_assert!(status_of(pool).free_slot, "forwarded to a pool with no free slot");
            }
            Decision::Hold { pool, eta_us } => {
                prop_assert_eq!(status_of(pool).wait_us, Some(eta_us), "held with an eta other than the pool's wait");
                prop_assert!(!status_of(pool).free_slot, "held for a pool with a free slot");
            }
            Decision::NoCapacity => prop_assert!(available.is_empty(), "NoCapacity with {} available", available.len()),
        }
        if let Decision::Forward { pool } | Decision::Hold { pool, .. } = p.decision {
            // Its cost is the minimum; among equal costs it is the nearest.
            let cost = |c: &Candidate| u64::from(c.rtt_us) + u64::from(status_of(c.pool).wait_us.unwrap_or_default());
            let at = candidates.iter().position(|c| c.pool == pool).expect("the chosen pool is a candidate");
            let chosen = cost(&candidates[at]);
            for (i, c) in candidates.iter().enumerate().filter(|(_, c)| status_of(c.pool).wait_us.is_some()) {
                prop_assert!(chosen <= cost(c), "cost {} chosen over {} ({:?})", chosen, cost(c), c);
                if i < at {
                    prop_assert!(chosen < cost(c), "a tie went to the farther pool");
                }
            }
        }
        if let Some(cold) = p.passed_over_cold {
            let at = candidates.iter().position(|c| c.pool == cold).expect("a cold candidate");
            prop_assert!(status_of(cold).cold, "reported {:?} as cold", cold);
            prop_assert!(
                candidates[..at].iter().all(|c| !status_of(c.pool).cold),
                "a nearer cold pool than {:?} was not reported", cold
            );
            if let Decision::Forward { pool } | Decision::Hold { pool, .. } = p.decision {
                let chosen = candidates.iter().find(|c| c.pool == pool).expect("candidate");
                prop_assert!(candidates[at].rtt_us < chosen.rtt_us, "the cold pool is not nearer than the chosen one");
            }
        }

        prop_assert_eq!(p, reference(&candidates, &statuses));
        prop_assert_eq!(p, place(&candidates, |id| statuses[id.index()]), "same inputs, another answer");
    }

    /// The statuses the router actually produces: a free slot means no
    /// wait; cold means no free slot.
    #[test]
    fn place_with_consistent_statuses((candidates, statuses) in ranked()) {
        let statuses: Vec<PoolStatus> = statuses
            .into_iter()
            .map(|s| match s {
                PoolStatus { wait_us: Some(_), free_slot: true, .. } => PoolStatus::FREE,
                PoolStatus { wait_us: None, .. } => PoolStatus::UNAVAILABLE,
                other => other,
            })
            .collect();
        let p = place(&candidates, |id| statuses[id.index()]);
        prop_assert_eq!(p, reference(&candidates, &statuses));
        // With a free pool among the candidates, a held request expects its
        // first byte no later than the nearest free pool would give it.
        if let Some(free) = candidates.iter().find(|c| statuses[c.pool.index()].free_slot) {
            if let Decision::Hold { pool, eta_us } = p.decision {
                let held = candidates.iter().find(|c| c.pool == pool).expect("candidate");
                prop_assert!(u64::from(held.rtt_us) + u64::from(eta_us) <= u64::from(free.rtt_us));
            }
            prop_assert!(p.decision != Decision::NoCapacity);
        }
    }
}

// ---- pick::pick ------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Fake {
    ready: bool,
    busy: u32,
}

impl ReplicaLoad for Fake {
    fn free(&self, max: u32) -> u32 {
        if self.ready {
            max.saturating_sub(self.busy)
        } else {
            0
        }
    }
    fn busy(&self) -> u32 {
        self.busy
    }
}

fn replicas() -> impl Strategy<Value = Vec<Fake>> {
    prop::collection::vec((prop::bool::weighted(0.8), 0u32..6).prop_map(|(ready, busy)| Fake { ready, busy }), 0..10)
}

fn rng(seed: u64) -> impl FnMut(usize) -> usize {
    let mut r = fastrand::Rng::with_seed(seed);
    move |n| r.usize(0..n)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn pick_takes_only_free_replicas(reps in replicas(), max in 0u32..6, seed in any::<u64>()) {
        let eligible: Vec<usize> = (0..reps.len()).filter(|&i| reps[i].free(max) > 0).collect();
        let mut draws = Vec::new();
        let mut r = rng(seed);
        let got = pick(&reps, max, |n| {
            draws.push(n);
            r(n)
        });
        prop_assert!(draws.iter().all(|&n| n >= 1), "rand asked for 0..{:?}", draws);
        match got {
            None => prop_assert!(eligible.is_empty(), "None with {} free replicas", eligible.len()),
            Some(i) => {
                prop_assert!(i < reps.len());
                prop_assert!(reps[i].free(max) > 0, "picked {:?}, which has no free slot under {}", reps[i], max);
                // Of two random candidates the less busy wins: a replica
                // busier than every other free one is never picked.
                if eligible.len() >= 2 {
                    let busiest_alone = eligible.iter().all(|&j| j == i || reps[j].busy < reps[i].busy);
                    prop_assert!(!busiest_alone, "picked the busiest replica {} of {:?}", i, reps);
                }
            }
        }
        prop_assert_eq!(got, pick(&reps, max, rng(seed)), "same seed, another pick");
    }
}

// ---- Live::place -----------------------------------------------------------

const SERVICES: &[&str] = &["llama", "mistral", "qwen", "phi"];
const LOCATIONS: &[(&str, f64, f64)] =
    &[("fra", 50.11, 8.68), ("par", 48.86, 2.35), ("sin", 1.35, 103.82), ("syd", -33.87, 151.21)];

#[derive(Clone, Debug)]
struct GenPool {
    location: usize,
    /// Bit i: serves `SERVICES[i]` (never 0).
    serves: u8,
    /// Whether each replica is ready.
    ready: Vec<bool>,
    max_concurrency: u32,
    scales: bool,
    /// Slots to take on the pool before deciding (fills it).
    busy: u32,
}

fn gen_pool() -> impl Strategy<Value = GenPool> {
    (
        0..LOCATIONS.len(),
        1u8..(1 << SERVICES.len()),
        prop::collection::vec(any::<bool>(), 1..4),
        1u32..4,
        any::<bool>(),
        0u32..6,
    )
        .prop_map(|(location, serves, ready, max_concurrency, scales, busy)| GenPool {
            location,
            serves,
            ready,
            max_concurrency,
            scales,
            busy,
        })
}

fn network_text(edge: usize, pools: &[GenPool]) -> String {
    let mut text =
        format!("[edge]\nlocation = \"{}\"\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n", LOCATIONS[edge].0);
    for (id, lat, lon) in LOCATIONS {
        text.push_str(&format!("\n[[location]]\nid = \"{id}\"\nlat = {lat}\nlon = {lon}\n"));
    }
    let mut port = 20_000;
    for (i, p) in pools.iter().enumerate() {
        let serves: Vec<String> =
            (0..SERVICES.len()).filter(|b| p.serves & (1 << b) != 0).map(|b| format!("\"{}\"", SERVICES[b])).collect();
        let replicas: Vec<String> = p
            .ready
            .iter()
            .map(|_| {
                port += 1;
                format!("\"127.0.0.1:{port}\"")
            })
            .collect();
        text.push_str(&format!(
            "\n[[pool]]\nid = \"p{i}\"\nlocation = \"{}\"\nserves = [{}]\nreplicas = [{}]\nmax_concurrency = {}\n",
            LOCATIONS[p.location].0,
            serves.join(", "),
            replicas.join(", "),
            p.max_concurrency
        ));
        if p.scales {
            text.push_str(&format!(
                "[pool.scale]\nidle_timeout = \"10m\"\nwake_time = \"25s\"\nwake = {{ url = \"http://127.0.0.1:7000/pools/p{i}/wake\" }}\n"
            ));
        }
    }
    text.push_str("\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\n");
    text
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn router_places_only_on_pools_serving_the_service(
        edge in 0..LOCATIONS.len(),
        pools in prop::collection::vec(gen_pool(), 1..7),
        asks in prop::collection::vec(0..SERVICES.len(), 1..16),
    ) {
        let text = network_text(edge, &pools);
        let network = match stoke_config::load_str(&text, Path::new("/tmp/placement_props.toml")) {
            Ok(n) => n,
            Err(e) => return Err(TestCaseError::fail(format!("generated config is invalid:\n{e}\n{text}"))),
        };
        let snapshot = network.for_edge(None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let router = Router::new(snapshot);
        let live = router.live();
        let net = &live.snapshot.network;
        let mut held = Vec::new();
        for (i, p) in pools.iter().enumerate() {
            let id = net.pool_id(&format!("p{i}")).expect("pool in the network");
            for (j, &ready) in p.ready.iter().enumerate() {
                live.pools[id.index()].replicas[j].set_ready(ready);
            }
            for _ in 0..p.busy {
                if let Some(slot) = live.acquire(id, stoke_router::clock::now()) {
                    held.push(slot);
                }
            }
        }

        let served: HashMap<ServiceId, &str> =
            SERVICES.iter().filter_map(|name| net.service_id(name).map(|id| (id, *name))).collect();
        for &ask in &asks {
            let Some(service) = net.service_id(SERVICES[ask]) else {
                // No generated pool serves it: the network has no such service.
                prop_assert!(pools.iter().all(|p| p.serves & (1 << ask) == 0));
                continue;
            };
            prop_assert_eq!(served.get(&service).copied(), Some(SERVICES[ask]));
            let p = live.place(service, stoke_router::clock::now());
            if let Decision::Forward { pool } | Decision::Hold { pool, .. } = p.decision {
                prop_assert!(
                    net.pool(pool).services.contains(&service),
                    "{} placed on {}, which serves only {:?}",
                    SERVICES[ask], net.pool(pool).id, net.pool(pool).services
                );
            }
            if let Decision::Forward { pool } = p.decision {
                prop_assert!(live.pool(pool).free_slots() > 0, "forwarded to {} with no free slot", net.pool(pool).id);
            }
            if let Some(cold) = p.passed_over_cold {
                prop_assert!(net.pool(cold).services.contains(&service), "cold pool {} does not serve it", net.pool(cold).id);
            }
            // A pool that can take the request now exists: never NoCapacity.
            let any_free = net.pools.iter().enumerate().any(|(i, pool)| {
                pool.services.contains(&service) && live.pools[i].free_slots() > 0
            });
            if any_free {
                prop_assert!(p.decision != Decision::NoCapacity);
            }
        }
        drop(held);
    }
}
