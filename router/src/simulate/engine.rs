//! The replay: a discrete-event simulation of the whole network on a
//! virtual clock, with no sockets. Every edge of the config gets its own
//! [`Router`] (snapshot, pool and replica states, hold queues), exactly as
//! `stoke serve` builds it, and its requests go through the code that
//! serves live traffic: [`admit::place`] (route-away-then-warm, placement,
//! admission with ETA, replica pick and affinity), the pools' hold queues,
//! [`wake::begin`] and the [`WakeSchedule`] for single-flight wakes,
//! [`sleep::due`] for the home edge's idle rule and pre-warm, and
//! [`probe::apply_load`] for the load other edges put on a replica.
//!
//! What is modelled instead of run: the GPU replicas (a boot time, a
//! concurrency limit with a waiting queue, a prefill and a decode rate),
//! the orchestrator behind the hooks (a wake boots every replica of the
//! pool, a sleep stops them), health probes (each edge sees a replica's
//! change at its next probe, on a fixed phase) and the network (each
//! request and answer takes the edge–pool RTT of the geo model).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stoke_config::{IdleTimeout, Network, PoolId, ServiceId, ServiceSource};

use super::report::{Figures, PolicyReport};
use super::trace::Trace;
use crate::clock;
use crate::control::cluster::claim::{LEASE_MARGIN, READY_HOLD};
use crate::control::cluster::load::{self, PUBLISH_EVERY};
use crate::control::{probe, sleep, wake};
use crate::core::affinity;
use crate::core::wake::{WakeSchedule, WakeStep, FAST_PROBE};
use crate::proxy::admit::{self, Keys, Placed};
use crate::state::{Live, Router, Slot, Ticket};

/// How fast a pool's replicas work.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Prompt tokens prefilled per second (0: prefill takes no time).
    pub prefill_tps: f64,
    /// Tokens generated per second, per request.
    pub decode_tps: f64,
}

impl Default for Rates {
    /// An 8B-class model on one modern GPU: a prompt of 1,000 tokens
    /// prefills in 0.2 s, and each request streams 40 tokens a second.
    fn default() -> Self {
        Rates { prefill_tps: 5000.0, decode_tps: 40.0 }
    }
}

/// How the replay's GPU replicas work.
#[derive(Clone, Debug)]
pub struct ReplicaModel {
    /// Rates by pool id.
    pub rates: HashMap<String, Rates>,
    /// Rates of the other pools.
    pub default_rates: Rates,
    /// Each replica's prefix cache, in tokens (the simulated replica's
    /// model, [`crate::sim::cache`]): a request's cached share needs no prefill.
    pub cache_tokens: usize,
}

impl Default for ReplicaModel {
    fn default() -> Self {
        ReplicaModel {
            rates: HashMap::new(),
            default_rates: Rates::default(),
            cache_tokens: crate::sim::cache::DEFAULT_CACHE_TOKENS,
        }
    }
}

/// The prompt of trace request `index`, as bytes the prefix cache hashes
/// (the cache's 4 bytes a token): a session's turns extend one stream, so
/// that each turn's prompt begins with the one before, as a conversation
/// does; a request with no session shares nothing.
pub fn prompt(req: &super::trace::TraceRequest, index: usize) -> Vec<u8> {
    let seed = match &req.session {
        Some(s) => affinity::hash(s.as_bytes()),
        None => affinity::hash(&(index as u64).to_le_bytes()) ^ 0x5eed,
    };
    let len = req.prompt_tokens as usize * crate::sim::cache::BYTES_PER_TOKEN;
    let mut out = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(&affinity::hash(&(seed ^ i.rotate_left(32)).to_le_bytes()).to_le_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// The idle policy a replay applies to every pool that scales.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    /// No pool ever sleeps: every pool is on from the start.
    AlwaysOn,
    /// Every scaling pool with this idle window.
    Fixed(Duration),
    /// The config as written.
    Config,
    /// Every scaling pool with `idle_timeout = "auto"` (its own bounds if
    /// it has them, else the defaults), and the load scrape that needs
    /// (the default one, where the pool has none), one depth: any light
    /// depth is left out.
    Auto,
    /// As [`Policy::Auto`], with two depths: every scaling pool also gets
    /// a light depth with `light_timeout = "auto"` (its own, if it has one,
    /// else vLLM's sleep mode with the default wake time and cost).
    AutoLight,
}

impl Policy {
    /// Parse `always-on`, `fixed:DURATION`, `config`, `auto` or
    /// `auto-light`.
    pub fn parse(s: &str) -> Result<Policy, String> {
        match s {
            "always-on" => Ok(Policy::AlwaysOn),
            "config" => Ok(Policy::Config),
            "auto" => Ok(Policy::Auto),
            "auto-light" => Ok(Policy::AutoLight),
            _ => match s.strip_prefix("fixed:") {
                Some(d) => stoke_config::duration::parse_duration(d)
                    .filter(|d| !d.is_zero())
                    .map(Policy::Fixed)
                    .ok_or_else(|| format!("\"{d}\" is not a duration such as 30s or 5m")),
                None => Err(format!(
                    "unknown policy \"{s}\"; expected always-on, fixed:DURATION, config, auto or auto-light"
                )),
            },
        }
    }

    /// Rewrite the pools of `network` as the policy says.
    pub fn apply(&self, network: &mut Network) {
        for pool in &mut network.pools {
            match self {
                Policy::AlwaysOn => pool.scale = None,
                Policy::Config => {}
                Policy::Fixed(d) => {
                    if let Some(s) = &mut pool.scale {
                        s.idle_timeout = IdleTimeout::Fixed(*d);
                        s.light = None;
                    }
                }
                Policy::Auto | Policy::AutoLight => {
                    if let Some(s) = &mut pool.scale {
                        if !matches!(s.idle_timeout, IdleTimeout::Auto { .. }) {
                            s.idle_timeout = IdleTimeout::Auto {
                                min: stoke_config::defaults::MIN_IDLE,
                                max: stoke_config::defaults::MAX_IDLE,
                            };
                        }
                        if *self == Policy::Auto {
                            s.light = None;
                        } else {
                            let light = s.light.get_or_insert_with(|| {
                                let (sleep, wake) = stoke_config::vllm_light_hooks(1);
                                stoke_config::LightSleep {
                                    sleep,
                                    wake,
                                    probe: Some("/is_sleeping".into()),
                                    idle_timeout: stoke_config::light_bounds(s.idle_timeout),
                                    wake_time: stoke_config::defaults::LIGHT_WAKE_TIME,
                                    cost: stoke_config::defaults::LIGHT_COST,
                                }
                            });
                            light.idle_timeout = stoke_config::light_bounds(s.idle_timeout);
                            pool.health.sleeping_path.get_or_insert_with(|| "/is_sleeping".into());
                        }
                        // As the config check demands: the home edge sees
                        // other edges' load (the default scrape).
                        pool.load.get_or_insert_with(|| stoke_config::LoadReport {
                            path: stoke_config::defaults::LOAD_PATH.into(),
                            format: stoke_config::LoadFormat::Vllm,
                            interval: stoke_config::defaults::LOAD_INTERVAL,
                        });
                    }
                }
            }
        }
    }
}

/// Virtual time: microseconds from the replay's start.
type T = u64;

fn us(d: Duration) -> T {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 4)
}

/// What happens at a moment of the replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Trace request `0` arrives at its edge.
    Arrive(usize),
    /// A held request's deadline.
    Deadline(u64),
    /// A request ends at its replica (and its answer reaches the edge).
    Finish(u64),
    /// A replica of a pool is booted (if it was not stopped meanwhile: the generation).
    Booted { pool: usize, replica: usize, generation: u64 },
    /// An edge's health probe of a replica sees what the replica is now.
    Probe { edge: usize, pool: usize, replica: usize },
    /// A turn of an edge's wake loop for a pool.
    WakeTurn { edge: usize, pool: usize },
    /// An edge scrapes a pool's replicas' load.
    Scrape { edge: usize, pool: usize },
    /// An edge's sleeper looks at its home pools.
    Sleeper { edge: usize },
    /// An edge of a clustered network publishes its load report.
    Publish { edge: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Power {
    Off,
    Booting,
    Ready,
    /// In light sleep: running, the model out of GPU memory.
    Light,
    /// Waking from light sleep.
    LightWaking,
}

/// One GPU replica.
#[derive(Debug)]
struct Gpu {
    power: Power,
    generation: u64,
    on_since: T,
    up: T,
    /// When its light sleep began, and the time in light sleep before it.
    light_since: T,
    light_us: T,
    running: u32,
    waiting: VecDeque<u64>,
    /// Emptied when the replica stops.
    cache: crate::sim::cache::PrefixCache,
}

/// A request on a replica.
struct Job {
    req: usize,
    edge: usize,
    pool: usize,
    replica: usize,
    slot: Option<Slot>,
    arrived: T,
    held_us: T,
    ttft_us: T,
}

/// A request in a hold queue.
struct Held {
    ticket: Ticket,
    req: usize,
    edge: usize,
    pool: usize,
    service: ServiceId,
    arrived: T,
    max_wait: Duration,
}

struct EdgeSim {
    /// The edge's snapshot bound to its state, as its router serves it.
    live: Arc<Live>,
    /// Whether this edge is the home edge of a pool (it runs a sleeper).
    home: bool,
}

/// One replay of a trace under one policy.
pub struct Replay<'a> {
    trace: &'a Trace,
    epoch: Instant,
    now: T,
    seq: u64,
    events: BinaryHeap<Reverse<(T, u64, Ev)>>,
    edges: Vec<EdgeSim>,
    edge_of: Vec<usize>,
    gpus: Vec<Vec<Gpu>>,
    rates: Vec<Rates>,
    cache_tokens: usize,
    boot: Vec<T>,
    /// Probe phase of each (edge, pool, replica), and the pool's probe interval.
    phase: Vec<Vec<Vec<T>>>,
    interval: Vec<T>,
    /// The route's `max_wait` of each service (`None`: no route serves it).
    max_wait: Vec<Option<Duration>>,
    jobs: HashMap<u64, Job>,
    held: HashMap<u64, Held>,
    held_order: Vec<Vec<VecDeque<u64>>>,
    wakes: HashMap<(usize, usize), WakeSchedule>,
    next_id: u64,
    rng: fastrand::Rng,
    total: Figures,
    pools: Vec<Figures>,
    /// Whether each pool scales to zero in the config as written.
    scaling: Vec<bool>,
    /// Each pool's light wake time, with a light depth.
    light_wake: Vec<Option<T>>,
    /// Each pool's light depth's cost share (0 without one).
    light_cost: Vec<f64>,
    /// With `[cluster]`: each edge's last published load report (the
    /// shared load view), and the wake claims (pool → holder edge, until).
    cluster: Option<ClusterSim>,
}

/// What the cluster shares, modelled: the load reports every edge
/// publishes every [`PUBLISH_EVERY`] (each edge sums the others' into its
/// pool and replica states, as live), and the wake claims (only the holder
/// calls a pool's wake hook; the others wait for its lease). NATS itself
/// is taken as instant and never down.
#[derive(Default)]
struct ClusterSim {
    reports: Vec<Option<load::Report>>,
    /// Each edge's load fingerprint when last looked at.
    prints: Vec<u64>,
    claims: HashMap<usize, (usize, T)>,
}

/// Why a replay could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The config did not load.
    #[error(transparent)]
    Config(#[from] stoke_config::ConfigError),
}

impl<'a> Replay<'a> {
    /// Build the network of `text` (loaded as from `path`) under `policy`,
    /// with replicas that work as `model` says.
    pub fn new(
        text: &str,
        path: &std::path::Path,
        policy: &Policy,
        trace: &'a Trace,
        model: &ReplicaModel,
        seed: u64,
    ) -> Result<Replay<'a>, ReplayError> {
        let mut base = stoke_config::load_str(text, path)?;
        let scaling: Vec<bool> = base.pools.iter().map(|p| p.scale.is_some()).collect();
        policy.apply(&mut base);
        let edge_ids: Vec<String> = base.locations.iter().filter(|l| l.edge).map(|l| l.id.clone()).collect();
        let mut snapshots = Vec::new();
        for id in &edge_ids {
            let mut net = stoke_config::load_str(text, path)?;
            policy.apply(&mut net);
            snapshots.push(net.for_edge(Some(id))?);
        }
        // Nothing fails from here on: the states bound now, and all that
        // the replay drives, read the virtual clock.
        let epoch = Instant::now();
        clock::set_virtual(Some(epoch));
        fastrand::seed(seed);
        let mut rng = fastrand::Rng::with_seed(seed);
        let edges: Vec<EdgeSim> = snapshots
            .into_iter()
            .map(|snapshot| {
                let here = snapshot.location;
                let home = snapshot.network.pools.iter().any(|p| p.home_edge == here && p.scale.is_some());
                EdgeSim { live: Router::new(snapshot).live(), home }
            })
            .collect();
        let net = &base;
        let gpus = net
            .pools
            .iter()
            .map(|p| {
                let on = p.scale.is_none();
                (0..p.replicas.len())
                    .map(|_| Gpu {
                        power: if on { Power::Ready } else { Power::Off },
                        generation: 0,
                        on_since: 0,
                        up: 0,
                        light_since: 0,
                        light_us: 0,
                        running: 0,
                        waiting: VecDeque::new(),
                        cache: crate::sim::cache::PrefixCache::new(model.cache_tokens),
                    })
                    .collect()
            })
            .collect();
        // An edge probes every replica before it starts accepting: pools
        // that are always on are ready everywhere from the start.
        for e in &edges {
            for (pool, view) in net.pools.iter().zip(e.live.pools.iter()) {
                for r in view.replicas.iter() {
                    r.set_ready(pool.scale.is_none());
                }
            }
        }
        let interval: Vec<T> = net.pools.iter().map(|p| us(p.health.interval).max(1)).collect();
        let phase = edges
            .iter()
            .map(|_| {
                net.pools
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (0..p.replicas.len()).map(|_| rng.u64(0..interval[i])).collect())
                    .collect()
            })
            .collect();
        let max_wait = (0..net.services.len())
            .map(|s| {
                net.routes
                    .iter()
                    .find(|r| match &r.service {
                        ServiceSource::Fixed(id) => id.index() == s,
                        ServiceSource::BodyField(_) | ServiceSource::Header(_) => true,
                    })
                    .map(|r| r.max_wait)
            })
            .collect();
        let edge_of =
            trace.requests.iter().map(|r| edge_ids.iter().position(|id| *id == r.edge).unwrap_or(0)).collect();
        let mut replay = Replay {
            trace,
            epoch,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            held_order: edges.iter().map(|_| net.pools.iter().map(|_| VecDeque::new()).collect()).collect(),
            edges,
            edge_of,
            gpus,
            rates: net.pools.iter().map(|p| model.rates.get(&p.id).copied().unwrap_or(model.default_rates)).collect(),
            cache_tokens: model.cache_tokens,
            boot: net.pools.iter().map(|p| p.scale.as_ref().map_or(0, |s| us(s.wake_time))).collect(),
            phase,
            interval,
            max_wait,
            jobs: HashMap::new(),
            held: HashMap::new(),
            wakes: HashMap::new(),
            next_id: 0,
            rng,
            total: Figures::default(),
            pools: net.pools.iter().map(|_| Figures::default()).collect(),
            scaling,
            light_wake: net
                .pools
                .iter()
                .map(|p| p.scale.as_ref().and_then(|s| s.light.as_ref()).map(|l| us(l.wake_time)))
                .collect(),
            light_cost: net
                .pools
                .iter()
                .map(|p| p.scale.as_ref().and_then(|s| s.light.as_ref()).map_or(0.0, |l| l.cost))
                .collect(),
            cluster: None,
        };
        if net.cluster.is_some() {
            let n = replay.edges.len();
            replay.cluster = Some(ClusterSim { reports: vec![None; n], prints: vec![0; n], claims: HashMap::new() });
            for e in 0..replay.edges.len() {
                let first = replay.rng.u64(0..us(PUBLISH_EVERY));
                replay.at(first, Ev::Publish { edge: e });
            }
        }
        for i in 0..trace.requests.len() {
            let t = (trace.requests[i].t * 1e6) as T;
            replay.at(t, Ev::Arrive(i));
        }
        for e in 0..replay.edges.len() {
            for (pool, p) in net.pools.iter().enumerate() {
                if let Some(load) = &p.load {
                    let first = replay.rng.u64(0..us(load.interval).max(1));
                    replay.at(first, Ev::Scrape { edge: e, pool });
                }
            }
            if replay.edges[e].home {
                replay.at(0, Ev::Sleeper { edge: e });
            }
        }
        Ok(replay)
    }

    fn at(&mut self, t: T, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, ev)));
    }

    fn instant(&self, t: T) -> Instant {
        self.epoch + Duration::from_micros(t)
    }

    fn network(&self) -> &Network {
        &self.edges[0].live.snapshot.network
    }

    /// Run to the end: until the last request is answered. `progress`
    /// is told the share of the trace done, now and then.
    pub fn run(mut self, policy: &str, until: Option<f64>, mut progress: impl FnMut(f64)) -> PolicyReport {
        let started = std::time::Instant::now();
        let last_arrival = self.trace.requests.last().map_or(0, |r| (r.t * 1e6) as T);
        let last_arrival = last_arrival.max(until.map_or(0, |u| (u.max(0.0) * 1e6) as T));
        let mut turns = 0u64;
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            if t > last_arrival && self.jobs.is_empty() && self.held.is_empty() {
                break;
            }
            self.now = t;
            clock::set_virtual(Some(self.instant(t)));
            self.handle(ev);
            turns += 1;
            if turns % 65_536 == 0 && last_arrival > 0 {
                progress((t as f64 / last_arrival as f64).min(1.0));
            }
        }
        let horizon = self.now.max(last_arrival);
        let report = self.report(policy, horizon, started.elapsed().as_secs_f64());
        // Drop the states while the virtual clock still reads replay time.
        drop(self);
        clock::set_virtual(None);
        report
    }

    fn report(&mut self, policy: &str, horizon: T, took_s: f64) -> PolicyReport {
        for (pool, gpus) in self.gpus.iter().enumerate() {
            let up: T = gpus
                .iter()
                .map(|g| g.up + if matches!(g.power, Power::Off | Power::Light) { 0 } else { horizon - g.on_since })
                .sum();
            let light: T = gpus
                .iter()
                .map(|g| g.light_us + if g.power == Power::Light { horizon - g.light_since } else { 0 })
                .sum();
            let share = self.light_cost[pool];
            let s = (up as f64 + light as f64 * share) / 1e6;
            self.pools[pool].light_seconds = light as f64 / 1e6;
            self.total.light_seconds += light as f64 / 1e6;
            self.pools[pool].gpu_seconds = s;
            self.total.gpu_seconds += s;
            if self.scaling[pool] {
                self.total.scaling_gpu_seconds += s;
            }
        }
        let net = &self.edges[0].live.snapshot.network;
        let windows = net
            .pools
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let scale = p.scale.as_ref()?;
                let home = self.edges.iter().find(|e| e.live.snapshot.location == p.home_edge)?;
                let state = &home.live.pools[i].state;
                let show = |rule: IdleTimeout, chosen: Option<crate::core::idle::Window>| match rule {
                    IdleTimeout::Fixed(d) => stoke_config::duration::format_duration(d),
                    IdleTimeout::Auto { .. } => match chosen {
                        Some(w) => {
                            format!("{} ({})", stoke_config::duration::format_duration(w.idle), w.reason.as_str())
                        }
                        None => "auto (not chosen)".into(),
                    },
                };
                let mut w = show(scale.idle_timeout, state.auto_window());
                if let Some(l) = &scale.light {
                    w = format!("light {}, deep {w}", show(l.idle_timeout, state.auto_light_window()));
                }
                Some((p.id.clone(), w))
            })
            .collect();
        PolicyReport {
            policy: policy.to_owned(),
            total: std::mem::take(&mut self.total),
            pools: net.pools.iter().map(|p| p.id.clone()).zip(std::mem::take(&mut self.pools)).collect(),
            windows,
            horizon_s: horizon as f64 / 1e6,
            took_s,
        }
    }

    fn handle(&mut self, ev: Ev) {
        self.handle_one(ev);
        // Live, each edge looks every few milliseconds for a change large
        // enough to publish at once.
        if self.cluster.is_some() && !matches!(ev, Ev::Publish { .. }) {
            for e in 0..self.edges.len() {
                self.send_report(e, true);
            }
        }
    }

    fn handle_one(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(i) => self.arrive(i),
            Ev::Deadline(id) => self.deadline(id),
            Ev::Finish(id) => self.finish(id),
            Ev::Booted { pool, replica, generation } => {
                let g = &mut self.gpus[pool][replica];
                if g.generation == generation && matches!(g.power, Power::Booting | Power::LightWaking) {
                    g.power = Power::Ready;
                    self.probes_after_change(pool, replica);
                }
            }
            Ev::Probe { edge, pool, replica } => self.probe(edge, pool, replica),
            Ev::WakeTurn { edge, pool } => self.wake_turn(edge, pool),
            Ev::Scrape { edge, pool } => self.scrape(edge, pool),
            Ev::Sleeper { edge } => self.sleeper(edge),
            Ev::Publish { edge } => self.publish(edge),
        }
    }

    fn arrive(&mut self, i: usize) {
        let r = &self.trace.requests[i];
        let e = self.edge_of[i];
        self.total.requests += 1;
        let live = self.edges[e].live.clone();
        let Some(service) = live.snapshot.network.service_id(&r.model) else {
            return self.refuse(None, "unknown_model", 0);
        };
        let Some(max_wait) = self.max_wait[service.index()] else {
            return self.refuse(None, "no_route", 0);
        };
        let mut keys = Keys::default();
        if let Some(session) = &r.session {
            for c in live.snapshot.candidates(service) {
                if live.pool(c.pool).affinity.is_some() {
                    keys.push(c.pool, affinity::hash(session.as_bytes()));
                }
            }
        }
        let now = self.now;
        self.admit(e, i, service, now, max_wait, &keys);
    }

    fn admit(&mut self, e: usize, i: usize, service: ServiceId, arrived: T, max_wait: Duration, keys: &Keys) {
        let live = self.edges[e].live.clone();
        let (now, started) = (self.instant(self.now), self.instant(arrived));
        let deadline = crate::core::admission::deadline(started, max_wait);
        let mut woken = Vec::new();
        let placed = admit::place(&live, service, started, now, deadline, keys, |pool, why| woken.push((pool, why)));
        for (pool, why) in woken {
            self.start_wake(e, pool, why);
        }
        match placed {
            Ok(Placed::Admitted(a)) => self.forward(e, i, service, a.pool, a.slot, arrived, 0),
            Ok(Placed::Hold(pool)) => {
                let view = live.pool(pool).clone();
                match view.hold_keyed(now, keys.of(pool)) {
                    None => self.refuse(Some(pool.index()), "queue_full", 0),
                    Some(ticket) => {
                        let id = self.id();
                        let p = pool.index();
                        self.held.insert(id, Held { ticket, req: i, edge: e, pool: p, service, arrived, max_wait });
                        self.held_order[e][p].push_back(id);
                        self.at(arrived.saturating_add(us(max_wait)), Ev::Deadline(id));
                        self.poll_held(e, p);
                    }
                }
            }
            Err(reject) => self.refuse(None, reject.code, 0),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn refuse(&mut self, pool: Option<usize>, code: &'static str, held_us: T) {
        *self.total.refused.entry(code).or_default() += 1;
        self.total.hold_ms.push(held_us as f64 / 1000.0);
        if let Some(p) = pool {
            let f = &mut self.pools[p];
            f.requests += 1;
            *f.refused.entry(code).or_default() += 1;
            f.hold_ms.push(held_us as f64 / 1000.0);
        }
    }

    fn fail(&mut self, pool: usize, held_us: T) {
        self.total.failed += 1;
        self.total.hold_ms.push(held_us as f64 / 1000.0);
        let f = &mut self.pools[pool];
        f.requests += 1;
        f.failed += 1;
        f.hold_ms.push(held_us as f64 / 1000.0);
    }

    /// A request has a slot: send it to its replica. A replica that is not
    /// running refuses the connection; the edge marks it down and tries
    /// another replica or pool at once (never holds), as live.
    #[allow(clippy::too_many_arguments)]
    fn forward(&mut self, e: usize, i: usize, service: ServiceId, pool: PoolId, slot: Slot, arrived: T, tries: u32) {
        let p = pool.index();
        let live = self.edges[e].live.clone();
        let view = live.pool(pool);
        let Some(r) = view.replicas.iter().position(|x| Arc::ptr_eq(x, slot.replica())) else {
            return self.fail(p, self.now - arrived);
        };
        if self.gpus[p][r].power != Power::Ready {
            slot.replica().set_ready(false);
            // A replica in light sleep answers 503, and the edge takes it
            // as asleep, as live ([`crate::proxy::policy::mark_asleep`]).
            if matches!(self.gpus[p][r].power, Power::Light | Power::LightWaking) {
                slot.replica().set_asleep(true);
                view.note_depth();
            }
            drop(slot);
            self.poll_held(e, p);
            if tries < 2 {
                if let Some((pool2, slot2)) = admit::reacquire(&live, service) {
                    return self.forward(e, i, service, pool2, slot2, arrived, tries + 1);
                }
                // Nothing free: the pool went to sleep under this edge.
                // Admitted again, as live: held for a wake within the
                // route's max_wait.
                if let Some(max_wait) = self.max_wait[service.index()] {
                    return self.admit(e, i, service, arrived, max_wait, &Keys::default());
                }
            }
            return self.fail(p, self.now - arrived);
        }
        let id = self.id();
        let held_us = self.now - arrived;
        self.jobs
            .insert(id, Job { req: i, edge: e, pool: p, replica: r, slot: Some(slot), arrived, held_us, ttft_us: 0 });
        let g = &mut self.gpus[p][r];
        if g.running < view.max_concurrency {
            g.running += 1;
            self.start_job(id);
        } else {
            g.waiting.push_back(id);
        }
    }

    /// The replica starts on a request now: it ends after the prefill and
    /// the decode, and the edge sees its answer a round trip after it left.
    fn start_job(&mut self, id: u64) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        let net = &self.edges[0].live.snapshot.network;
        let req = &self.trace.requests[job.req];
        let rates = self.rates[job.pool];
        let rtt =
            us(net.rtt.get(self.edges[job.edge].live.snapshot.location.index(), net.pools[job.pool].location.index()));
        // Prefill: only the prompt tokens the replica's prefix cache does not hold.
        let found = self.gpus[job.pool][job.replica].cache.lookup(&prompt(req, job.req));
        for f in [&mut self.total, &mut self.pools[job.pool]] {
            f.cache_queried += found.tokens;
            f.cache_hits += found.cached;
        }
        let uncached = (found.tokens - found.cached) as f64;
        let prefill = if rates.prefill_tps > 0.0 { uncached / rates.prefill_tps } else { 0.0 };
        let per_token = 1.0 / rates.decode_tps.max(1e-3);
        let decode = f64::from(req.output_tokens.max(1)) * per_token;
        job.ttft_us = (self.now - job.arrived) + rtt + ((prefill + per_token) * 1e6) as T;
        let end = self.now + rtt + ((prefill + decode) * 1e6) as T;
        self.at(end, Ev::Finish(id));
    }

    fn finish(&mut self, id: u64) {
        // Gone: its replica was stopped under it (counted then).
        let Some(mut job) = self.jobs.remove(&id) else { return };
        let (p, r) = (job.pool, job.replica);
        self.total.ok += 1;
        self.total.hold_ms.push(job.held_us as f64 / 1000.0);
        self.total.ttft_ms.push(job.ttft_us as f64 / 1000.0);
        let f = &mut self.pools[p];
        f.requests += 1;
        f.ok += 1;
        f.hold_ms.push(job.held_us as f64 / 1000.0);
        f.ttft_ms.push(job.ttft_us as f64 / 1000.0);
        // The slot ends at the edge (its drop hands capacity to held requests).
        drop(job.slot.take());
        let g = &mut self.gpus[p][r];
        g.running = g.running.saturating_sub(1);
        if let Some(next) = g.waiting.pop_front() {
            g.running += 1;
            self.start_job(next);
        }
        self.poll_held(job.edge, p);
    }

    fn deadline(&mut self, id: u64) {
        let Some(mut h) = self.held.remove(&id) else { return };
        self.held_order[h.edge][h.pool].retain(|x| *x != id);
        if let Some(slot) = h.ticket.try_slot() {
            let pool = PoolId(h.pool as u32);
            return self.forward(h.edge, h.req, h.service, pool, slot, h.arrived, 0);
        }
        let view = h.ticket.view().clone();
        drop(h.ticket);
        let reject = admit::wait_timeout(&view, h.max_wait, self.instant(self.now));
        self.refuse(Some(h.pool), reject.code, self.now - h.arrived);
    }

    /// Held requests of `pool` at edge `e` that were handed a slot leave
    /// for their replica, first come first served.
    fn poll_held(&mut self, e: usize, p: usize) {
        while let Some(&id) = self.held_order[e][p].front() {
            let Some(slot) = self.held.get_mut(&id).and_then(|h| h.ticket.try_slot()) else { return };
            self.held_order[e][p].pop_front();
            let Some(h) = self.held.remove(&id) else { continue };
            self.forward(e, h.req, h.service, PoolId(p as u32), slot, h.arrived, 0);
        }
    }

    fn start_wake(&mut self, e: usize, pool: PoolId, why: wake::Reason) {
        let now = self.instant(self.now);
        let Some(schedule) = wake::begin(self.edges[e].live.pool(pool), now, why) else { return };
        tracing::debug!(
            target: "stoke::simulate",
            t = self.now as f64 / 1e6,
            pool = %self.edges[e].live.pool(pool).state.id,
            edge = %self.edges[e].live.snapshot.edge_location().id,
            reason = why.as_str(),
            "waking pool"
        );
        if why == wake::Reason::Prewarm {
            self.total.prewarms += 1;
            self.pools[pool.index()].prewarms += 1;
        }
        self.wakes.insert((e, pool.index()), schedule);
        self.at(self.now, Ev::WakeTurn { edge: e, pool: pool.index() });
    }

    /// One turn of an edge's wake loop, as [`wake`]'s: step the schedule,
    /// call the hook when it says so, probe the pool's replicas fast.
    fn wake_turn(&mut self, e: usize, p: usize) {
        let Some(mut schedule) = self.wakes.remove(&(e, p)) else { return };
        let live = self.edges[e].live.clone();
        let view = live.pools[p].clone();
        let now = self.instant(self.now);
        match schedule.step(now, view.is_warm(), view.state.expected_wake()) {
            WakeStep::Ready { took } => {
                view.state.end_wake(Some(took));
                view.state.woke(now);
                view.state.set_wake_error(None);
                view.dispatch(now);
                // The claimant marks the claim ready for a moment.
                let t = self.now;
                if let Some(c) = self.cluster.as_mut() {
                    if c.claims.get(&p).is_some_and(|(holder, _)| *holder == e) {
                        c.claims.insert(p, (e, t + us(READY_HOLD)));
                    }
                }
                return self.poll_held(e, p);
            }
            WakeStep::GiveUp { after } => {
                view.state.end_wake(None);
                view.state.set_wake_error(Some(format!("no replica became ready within {} s", after.as_secs())));
                if let Some(c) = self.cluster.as_mut() {
                    if c.claims.get(&p).is_some_and(|(holder, _)| *holder == e) {
                        c.claims.remove(&p);
                    }
                }
                return;
            }
            WakeStep::Call { attempt } if !self.claim(e, p, attempt, view.state.expected_wake(), &mut schedule) => {}
            WakeStep::Call { .. } => {
                // From light sleep, each sleeping replica's own wake, as
                // live ([`wake`]'s hook choice); else the orchestrator.
                if self.light_wake[p].is_some() && view.replicas.iter().any(|r| r.is_asleep()) {
                    self.light_wake(p, e);
                } else {
                    self.orchestrator_wake(p, e);
                }
            }
            WakeStep::Probe => {}
        }
        for r in 0..view.replicas.len() {
            self.observe(e, p, r);
        }
        if view.is_warm() {
            view.dispatch(now);
            self.poll_held(e, p);
        }
        self.wakes.insert((e, p), schedule);
        let turn = us(FAST_PROBE.mul_f64(0.75 + self.rng.f64() * 0.5));
        self.at(self.now + turn, Ev::WakeTurn { edge: e, pool: p });
    }

    /// The orchestrator gets a wake call: every stopped replica boots.
    fn orchestrator_wake(&mut self, p: usize, edge: usize) {
        tracing::debug!(
            target: "stoke::simulate",
            t = self.now as f64 / 1e6,
            pool = %self.network().pools[p].id,
            edge = %self.edges[edge].live.snapshot.edge_location().id,
            "wake call"
        );
        self.total.wake_calls += 1;
        self.pools[p].wake_calls += 1;
        let mut booted = false;
        for r in 0..self.gpus[p].len() {
            let g = &mut self.gpus[p][r];
            if g.power != Power::Off {
                continue;
            }
            booted = true;
            g.power = Power::Booting;
            g.on_since = self.now;
            g.generation += 1;
            let ev = Ev::Booted { pool: p, replica: r, generation: g.generation };
            self.at(self.now + self.boot[p], ev);
        }
        if booted {
            self.total.wakes += 1;
            self.pools[p].wakes += 1;
        }
    }

    /// In a clustered network, whether edge `e` may call the wake hook of
    /// `p` (its `attempt`-th call): it holds the claim or takes it, for a
    /// lease up to its next resend, as live. If another edge holds it, the
    /// call waits for the lease to run out.
    fn claim(&mut self, e: usize, p: usize, attempt: u32, expected: Duration, schedule: &mut WakeSchedule) -> bool {
        let now = self.now;
        let instant = self.instant(now);
        let Some(c) = self.cluster.as_mut() else { return true };
        match c.claims.get(&p) {
            Some(&(holder, until)) if holder != e && until > now => {
                let retry = Duration::from_micros(until - now).clamp(FAST_PROBE, wake::MAX_CLAIM_WAIT);
                schedule.defer(instant + retry);
                false
            }
            _ => {
                let lease = crate::core::wake::resend_after(expected, attempt) + LEASE_MARGIN;
                c.claims.insert(p, (e, now + us(lease)));
                true
            }
        }
    }

    /// Edge `e` publishes its load report; when it says something new,
    /// every other edge takes the others' reports into its states (held
    /// requests get capacity that was freed), as live.
    fn publish(&mut self, e: usize) {
        self.at(self.now + us(PUBLISH_EVERY), Ev::Publish { edge: e });
        self.send_report(e, false);
    }

    /// Edge `e` publishes its report now if it says something new (or,
    /// with `only_large`, only if it moved as much as live publishes at
    /// once for: a pool busy or idle, an eighth of its slots), and every
    /// other edge takes it in.
    fn send_report(&mut self, e: usize, only_large: bool) {
        let now = self.instant(self.now);
        let live = self.edges[e].live.clone();
        let Some(c) = self.cluster.as_mut() else { return };
        if only_large {
            let print = load::fingerprint(&live);
            if c.prints[e] == print {
                return;
            }
            c.prints[e] = print;
        }
        let report = load::report(&live, &live.snapshot.edge_location().id, now);
        let unchanged = match &c.reports[e] {
            Some(last) => *last == report || (only_large && !load::large_change(&live, last, &report)),
            None => false,
        };
        if unchanged {
            return;
        }
        c.reports[e] = Some(report);
        for f in 0..self.edges.len() {
            if f == e {
                continue;
            }
            let Some(c) = self.cluster.as_ref() else { return };
            let received: Vec<load::Received> = c
                .reports
                .iter()
                .enumerate()
                .filter(|(g, _)| *g != f)
                .filter_map(|(_, r)| r.clone().map(|report| load::Received { at: now, report }))
                .collect();
            let live = self.edges[f].live.clone();
            for p in load::take_in(&live, received.iter(), now) {
                self.poll_held(f, p);
            }
        }
    }

    /// Each replica of `p` in light sleep gets a wake call (from `edge`):
    /// it is ready after the pool's light wake time.
    fn light_wake(&mut self, p: usize, edge: usize) {
        let Some(took) = self.light_wake[p] else { return };
        tracing::debug!(
            target: "stoke::simulate",
            t = self.now as f64 / 1e6,
            pool = %self.network().pools[p].id,
            edge = %self.edges[edge].live.snapshot.edge_location().id,
            "light wake call"
        );
        let mut woke = false;
        for r in 0..self.gpus[p].len() {
            let g = &mut self.gpus[p][r];
            if g.power != Power::Light {
                continue;
            }
            woke = true;
            g.light_us += self.now - g.light_since;
            g.on_since = self.now;
            g.power = Power::LightWaking;
            g.generation += 1;
            let ev = Ev::Booted { pool: p, replica: r, generation: g.generation };
            self.at(self.now + took, ev);
        }
        if woke {
            self.total.light_wakes += 1;
            self.pools[p].light_wakes += 1;
        }
    }

    /// The home edge puts the replicas of `p` named in `call` to light
    /// sleep: each stops serving, keeps running, and costs its share.
    fn light_sleep(&mut self, e: usize, p: usize, call: &sleep::LightCall) {
        tracing::debug!(target: "stoke::simulate", t = self.now as f64 / 1e6, pool = %self.network().pools[p].id, "light sleep");
        self.total.light_sleeps += 1;
        self.pools[p].light_sleeps += 1;
        let view = self.edges[e].live.pools[p].clone();
        for (r, state) in view.replicas.iter().enumerate() {
            if !call.replicas.iter().any(|a| **a == *state.addr_text) {
                continue;
            }
            let g = &mut self.gpus[p][r];
            if g.power == Power::Ready {
                g.up += self.now - g.on_since;
                g.light_since = self.now;
                g.power = Power::Light;
                g.generation += 1;
                // vLLM's level 1 sleep discards the KV cache.
                g.cache = crate::sim::cache::PrefixCache::new(self.cache_tokens);
            }
            state.set_entering_sleep(false);
            state.set_asleep(g.power == Power::Light);
            self.probes_after_change(p, r);
        }
        view.note_depth();
    }

    /// What edge `e` sees of replica `r` of pool `p` when it probes it:
    /// ready, or asleep, or neither; true if it just became ready.
    fn observe(&mut self, e: usize, p: usize, r: usize) -> bool {
        let view = self.edges[e].live.pools[p].clone();
        let power = self.gpus[p][r].power;
        let state = &view.replicas[r];
        state.set_asleep(matches!(power, Power::Light | Power::LightWaking));
        let ready = power == Power::Ready && !state.is_entering_sleep();
        let became = state.set_ready(ready) != ready && ready;
        view.note_depth();
        became
    }

    /// The orchestrator gets a sleep call: every replica stops, and the
    /// requests still on one (from an edge that is not the home edge) fail.
    fn orchestrator_sleep(&mut self, p: usize) {
        tracing::debug!(target: "stoke::simulate", t = self.now as f64 / 1e6, pool = %self.network().pools[p].id, "sleep call");
        self.total.sleeps += 1;
        self.pools[p].sleeps += 1;
        // The next wake, from any edge, starts with a fresh claim.
        if let Some(c) = self.cluster.as_mut() {
            c.claims.remove(&p);
        }
        for r in 0..self.gpus[p].len() {
            let g = &mut self.gpus[p][r];
            match g.power {
                Power::Off => continue,
                Power::Light => g.light_us += self.now - g.light_since,
                _ => g.up += self.now - g.on_since,
            }
            g.power = Power::Off;
            g.cache = crate::sim::cache::PrefixCache::new(self.cache_tokens);
            g.generation += 1;
            g.running = 0;
            g.waiting.clear();
            let lost: Vec<u64> =
                self.jobs.iter().filter(|(_, j)| j.pool == p && j.replica == r).map(|(id, _)| *id).collect();
            for id in lost {
                if let Some(job) = self.jobs.remove(&id) {
                    let (edge, held) = (job.edge, job.held_us);
                    drop(job);
                    self.fail(p, held);
                    self.poll_held(edge, p);
                }
            }
            self.probes_after_change(p, r);
        }
    }

    /// Every edge's next health probe of a replica whose state changed.
    fn probes_after_change(&mut self, pool: usize, replica: usize) {
        let interval = self.interval[pool];
        for e in 0..self.edges.len() {
            let phase = self.phase[e][pool][replica];
            let wait = (phase + interval - self.now % interval) % interval;
            self.at(self.now + wait, Ev::Probe { edge: e, pool, replica });
        }
    }

    fn probe(&mut self, e: usize, p: usize, r: usize) {
        let view = self.edges[e].live.pools[p].clone();
        if self.observe(e, p, r) {
            view.state.woke(self.instant(self.now));
            view.dispatch(self.instant(self.now));
            self.poll_held(e, p);
        }
    }

    fn scrape(&mut self, e: usize, p: usize) {
        let view = self.edges[e].live.pools[p].clone();
        let now = self.instant(self.now);
        for (r, state) in view.replicas.iter().enumerate() {
            let g = &self.gpus[p][r];
            // A stopped replica answers no scrape; a sleeping one has no load.
            if g.power != Power::Ready {
                continue;
            }
            let load = g.running + g.waiting.len() as u32;
            if load == 0 && state.reported_load() == 0 {
                continue;
            }
            probe::apply_load(&view, state, load, now);
        }
        self.poll_held(e, p);
        let interval = self.network().pools[p].load.as_ref().map_or(1_000_000, |l| us(l.interval).max(1));
        self.at(self.now + interval, Ev::Scrape { edge: e, pool: p });
    }

    fn sleeper(&mut self, e: usize) {
        let live = self.edges[e].live.clone();
        let due = sleep::due(&live, self.instant(self.now));
        for pool in due.prewarm {
            self.start_wake(e, pool, wake::Reason::Prewarm);
        }
        for call in due.lights {
            let Some(pid) = live.snapshot.network.pool_id(&call.pool) else { continue };
            let p = pid.index();
            let busy = live.snapshot.network.pools[p].load.is_some()
                && self.gpus[p].iter().any(|g| g.power == Power::Ready && (g.running > 0 || !g.waiting.is_empty()));
            if busy {
                let view = live.pool(pid);
                for r in view.replicas.iter() {
                    if r.is_entering_sleep() {
                        r.set_entering_sleep(false);
                        r.set_ready(true);
                    }
                }
                view.state.unmark_light_slept();
                view.state.touch(self.instant(self.now));
                view.dispatch(self.instant(self.now));
            } else {
                self.light_sleep(e, p, &call);
            }
        }
        for call in due.sleeps {
            let Some(pid) = live.snapshot.network.pool_id(&call.pool) else { continue };
            let p = pid.index();
            // The last look at the replicas' own load, as live.
            let busy = live.snapshot.network.pools[p].load.is_some()
                && self.gpus[p].iter().any(|g| g.power == Power::Ready && (g.running > 0 || !g.waiting.is_empty()));
            if busy {
                sleep::keep(live.pool(pid), &call, self.instant(self.now));
            } else {
                self.orchestrator_sleep(p);
            }
        }
        self.at(self.now + us(due.next_check).max(1), Ev::Sleeper { edge: e });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::trace::TraceRequest;

    const RATES: Rates = Rates { prefill_tps: 0.0, decode_tps: 100.0 };

    fn trace(reqs: &[(f64, &str)]) -> Trace {
        let requests = reqs
            .iter()
            .map(|&(t, edge)| TraceRequest {
                t,
                edge: edge.into(),
                model: "m".into(),
                prompt_tokens: 10,
                output_tokens: 20,
                session: None,
            })
            .collect();
        Trace { requests, source: "test".into(), format: "jsonl", assign: None }
    }

    fn replay(text: &str, policy: &str, t: &Trace) -> PolicyReport {
        let policy_parsed = Policy::parse(policy).expect("policy");
        let model = ReplicaModel { default_rates: RATES, ..ReplicaModel::default() };
        let r = Replay::new(text, std::path::Path::new("t.toml"), &policy_parsed, t, &model, 7).expect("replay");
        r.run(policy, None, |_| {})
    }

    fn world(scale: &str) -> String {
        crate::testing::two_pools_text(4, scale)
    }

    #[test]
    fn a_sessions_turns_find_their_conversation_cached_where_affinity_sends_them() {
        let config = |affinity: &str| {
            format!(
                "[edge]\nlocation = \"fra\"\nadmin = \"127.0.0.1:0\"\n[[location]]\nid = \"fra\"\nlat = 50.1\nlon = 8.7\n\
                 [[pool]]\nid = \"fra-gpu\"\nlocation = \"fra\"\nserves = [\"m\"]\n\
                 replicas = [\"127.0.0.1:9\", \"127.0.0.1:10\", \"127.0.0.1:11\", \"127.0.0.1:12\"]\n{affinity}\n\
                 [[route]]\nservice = \"m\"\n"
            )
        };
        // Twenty conversations of four turns, each turn's prompt the one
        // before and 256 tokens more.
        let mut requests = Vec::new();
        for turn in 0..4u32 {
            for s in 0..20u32 {
                requests.push(TraceRequest {
                    t: f64::from(turn * 20 + s) * 0.5,
                    edge: "fra".into(),
                    model: "m".into(),
                    prompt_tokens: 256 * (turn + 1),
                    output_tokens: 10,
                    session: Some(format!("s{s}")),
                });
            }
        }
        let t = Trace { requests, source: "test".into(), format: "jsonl", assign: None };
        let hit_rate = |text: &str| {
            let r = replay(text, "config", &t);
            r.total.cache_hits as f64 / r.total.cache_queried as f64
        };
        let keyed = hit_rate(&config("[pool.affinity]\nkey = \"header:x-session-id\""));
        let spread = hit_rate(&config(""));
        // Turn k finds k−1 of its k parts cached: 1,536 of 2,560 tokens.
        assert!((keyed - 0.6).abs() < 0.01, "with affinity: {keyed}");
        assert!(spread < keyed - 0.15, "without: {spread} against {keyed}");
        // The same conversation with no session shares nothing.
        assert_eq!(prompt(&t.requests[0], 0)[..64], prompt(&t.requests[20], 20)[..64], "a turn extends the one before");
        let mut lone = t.requests[0].clone();
        lone.session = None;
        assert_ne!(prompt(&lone, 0)[..64], prompt(&lone, 1)[..64]);
    }

    #[test]
    fn a_config_that_does_not_load_leaves_the_clock_alone() {
        let t = trace(&[(0.0, "fra")]);
        let bad =
            Replay::new("[edge", std::path::Path::new("t.toml"), &Policy::Config, &t, &ReplicaModel::default(), 1);
        assert!(bad.is_err());
        let (a, b) = (clock::now(), clock::now());
        assert!(b >= a && a.elapsed() < Duration::from_secs(1), "the real clock again");
        std::thread::sleep(Duration::from_millis(2));
        assert!(clock::now() > a, "time moves: not a virtual time left behind");
    }

    #[test]
    fn policies_parse() {
        assert_eq!(Policy::parse("fixed:30s"), Ok(Policy::Fixed(Duration::from_secs(30))));
        assert_eq!(Policy::parse("always-on"), Ok(Policy::AlwaysOn));
        assert_eq!(Policy::parse("auto"), Ok(Policy::Auto));
        assert_eq!(Policy::parse("auto-light"), Ok(Policy::AutoLight));
        assert!(Policy::parse("fixed:0s").is_err());
        assert!(Policy::parse("fixed:soon").is_err());
        assert!(Policy::parse("sometimes").is_err());
    }

    #[test]
    fn a_cold_pool_wakes_once_and_its_held_requests_are_answered_after_the_boot() {
        let text = world("idle_timeout = \"1h\"\nwake_time = \"2s\"");
        let t = trace(&[(0.0, "fra"), (0.05, "fra"), (0.1, "fra"), (10.0, "fra")]);
        let mut r = replay(&text, "config", &t);
        assert_eq!(r.pools[1].1.wakes, 0, "Paris is not needed");
        let fra = &mut r.pools[0].1;
        assert_eq!((fra.wakes, fra.requests, fra.ok), (1, 4, 4), "{fra:?}");
        // Held for the boot (2 s) and the fast probe that sees it.
        let held = fra.hold_ms.max();
        assert!((2000.0..2200.0).contains(&held), "{held}");
        assert_eq!(fra.hold_ms.quantile(0.25), 0.0, "the last request finds the pool warm");
        assert!(r.total.ttft_ms.max() >= held);
        // Awake from the wake call to the end, not before.
        let horizon = r.horizon_s;
        assert!((r.total.gpu_seconds - horizon).abs() < 0.01, "{} vs {horizon}", r.total.gpu_seconds);
    }

    #[test]
    fn always_on_never_wakes_and_keeps_every_replica_up() {
        let text = world("idle_timeout = \"1h\"\nwake_time = \"2s\"");
        let t = trace(&[(0.0, "fra"), (30.0, "par")]);
        let r = replay(&text, "always-on", &t);
        assert_eq!((r.total.wakes, r.total.ok), (0, 2));
        assert!((r.total.gpu_seconds - 2.0 * r.horizon_s).abs() < 0.01);
        assert_eq!(r.total.hold_ms.max(), 0.0);
    }

    #[test]
    fn a_pool_sleeps_after_its_window_and_wakes_for_the_next_request() {
        let text = world("idle_timeout = \"1h\"\nwake_time = \"2s\"");
        let t = trace(&[(0.0, "fra"), (100.0, "fra")]);
        let short = replay(&text, "fixed:10s", &t);
        let fra = &short.pools[0].1;
        assert_eq!((fra.wakes, fra.sleeps, fra.ok), (1, 1, 1), "{fra:?}");
        // Up for the wake, the request and the 10 s window (and the
        // sleeper's look at it).
        assert!(fra.gpu_seconds > 12.0 && fra.gpu_seconds < 16.0, "{}", fra.gpu_seconds);
        // The second request wakes a pool again: Paris, now that
        // Frankfurt's learned wake is a little slower than Paris's guess
        // plus the 9 ms between them.
        assert_eq!((short.total.wakes, short.total.ok), (2, 2));
        let long = replay(&text, "fixed:5m", &t);
        assert_eq!((long.total.wakes, long.total.sleeps), (1, 0));
        assert!(long.total.gpu_seconds > short.total.gpu_seconds + 80.0);
    }

    #[test]
    fn a_light_depth_sleeps_through_pauses_cheaply_and_wakes_in_its_own_time() {
        // Requests 60 s apart on one pool: with one depth, 10 s awake then
        // a cold start (20 s) each time; with a light depth after 5 s, a
        // 1 s wake from light sleep, and the rest of each pause at 30 %.
        let light = "idle_timeout = \"10m\"\nwake_time = \"20s\"\nlight = { kind = \"vllm\" }\n\
                     light_timeout = \"5s\"\nlight_wake_time = \"1s\"";
        let text = crate::testing::two_pools_text(1, light);
        let t = trace(&[(0.0, "fra"), (60.0, "fra"), (120.0, "fra"), (180.0, "fra")]);
        let mut two = replay(&text, "config", &t);
        let fra = &two.pools[0].1;
        assert_eq!((fra.wakes, fra.light_sleeps, fra.light_wakes, fra.ok), (1, 3, 3, 4), "{fra:?}");
        // The first request waits for the boot; the others for a light wake.
        let mut holds = fra.hold_ms.clone();
        assert!((20_000.0..20_300.0).contains(&holds.max()), "{fra:?}");
        assert!((1_000.0..1_300.0).contains(&holds.quantile(0.5)), "{fra:?}");
        // Awake: the boot, each request and 5 s after it (and the
        // sleeper's look), each light wake; lightly asleep: the rest of each
        // pause (the first from the end of the boot), counted at 0.3.
        assert!(fra.light_seconds > 33.0 + 2.0 * 52.0 && fra.light_seconds < 35.0 + 2.0 * 54.0, "{fra:?}");
        let mut one = replay(
            &text.replace("light = { kind = \"vllm\" }\nlight_timeout = \"5s\"\nlight_wake_time = \"1s\"", ""),
            "fixed:10s",
            &t,
        );
        assert_eq!(one.pools[0].1.light_sleeps, 0);
        assert!(
            two.total.gpu_seconds < one.total.gpu_seconds,
            "{} vs {}",
            two.total.gpu_seconds,
            one.total.gpu_seconds
        );
        assert!(two.total.hold_ms.quantile(0.5) < one.total.hold_ms.quantile(0.5) / 5.0);
        // A pause longer than the deep window ends in deep sleep: the next
        // request needs a cold start (Paris's, as it happens: its guess is
        // a hair below Frankfurt's learned boot).
        let t = trace(&[(0.0, "fra"), (1000.0, "fra")]);
        let deep = replay(&text, "config", &t);
        let fra = &deep.pools[0].1;
        assert_eq!((fra.light_sleeps, fra.sleeps), (1, 1), "{fra:?}");
        assert_eq!((deep.total.wakes, deep.total.light_wakes, deep.total.ok), (2, 0, 2), "{:?}", deep.total);
    }

    #[test]
    fn auto_light_gives_every_scaling_pool_two_depths_and_auto_one() {
        let text = world("idle_timeout = \"1h\"\nwake_time = \"20s\"");
        let mut reqs = Vec::new();
        for i in 0..40 {
            reqs.push((f64::from(i) * 45.0, "fra"));
        }
        let t = trace(&reqs);
        let two = replay(&text, "auto-light", &t);
        let one = replay(&text, "auto", &t);
        assert_eq!(one.total.light_sleeps, 0);
        assert!(two.total.light_sleeps > 10, "{:?}", two.total);
        assert!(
            two.total.gpu_seconds < one.total.gpu_seconds,
            "{} vs {}",
            two.total.gpu_seconds,
            one.total.gpu_seconds
        );
        assert!(two.windows.iter().any(|(_, w)| w.starts_with("light ")), "{:?}", two.windows);
    }

    #[test]
    fn a_wait_longer_than_the_route_allows_is_refused_and_still_wakes_the_pool() {
        let text = world("idle_timeout = \"1h\"\nwake_time = \"5s\"")
            .replace("service = \"m\"", "service = \"m\"\nmax_wait = \"1s\"");
        let t = trace(&[(0.0, "fra"), (20.0, "fra")]);
        let r = replay(&text, "config", &t);
        assert_eq!(r.total.refused.get("wait_exceeds_deadline"), Some(&1), "{:?}", r.total.refused);
        assert_eq!((r.total.ok, r.pools[0].1.wakes), (1, 1));
    }

    #[test]
    fn the_same_seed_replays_the_same_way() {
        let text = world("idle_timeout = \"5s\"\nwake_time = \"1s\"");
        let reqs: Vec<(f64, &str)> =
            (0..300).map(|i| (f64::from(i) * 0.37, if i % 3 == 0 { "par" } else { "fra" })).collect();
        let t = trace(&reqs);
        let (mut a, mut b) = (replay(&text, "auto", &t), replay(&text, "auto", &t));
        assert_eq!(a.total.gpu_seconds, b.total.gpu_seconds);
        assert_eq!(a.total.ttft_ms.quantile(0.99), b.total.ttft_ms.quantile(0.99));
        assert_eq!(a.total.ok, 300);
    }

    #[test]
    fn auto_bridges_short_gaps_and_sleeps_through_long_ones() {
        // Bursts 3 s apart, with an hour between two busy periods; waking
        // takes 4 s: bridging the bursts is cheaper than waking for each.
        let text = world("idle_timeout = \"auto\"\nmin_idle = \"1s\"\nwake_time = \"4s\"")
            .replace("max_concurrency = 4\n", "max_concurrency = 4\nload = {}\n");
        let mut reqs = Vec::new();
        for period in [0.0, 3600.0] {
            for i in 0..40 {
                reqs.push((period + f64::from(i) * 3.0, "fra"));
            }
        }
        let r = replay(&text, "config", &trace(&reqs));
        let all = &r.total;
        assert_eq!(all.ok, 80);
        assert!(all.wakes <= 3, "no wake between bursts 3 s apart: {all:?}");
        assert!(all.sleeps >= 1, "slept through the hour: {all:?}");
        assert!(all.gpu_seconds < 600.0, "{}", all.gpu_seconds);
        let (_, w) = &r.windows[0];
        assert!(w.contains("histogram"), "{w}");
    }
}

#[cfg(test)]
mod sleep_tests {
    //! What the replay showed the live sleeper getting wrong, fixed in the
    //! shared code and checked here on the virtual clock.

    use super::*;
    use crate::simulate::trace::TraceRequest;

    fn config(fra_scale: &str, par_pool: &str) -> String {
        format!(
            r#"{}
[[pool]]
id = "fra-gpu"
location = "fra"
serves = ["m"]
replicas = ["127.0.0.1:9"]
max_concurrency = 4
load = {{ interval = "60s" }}
[pool.scale]
{fra_scale}
wake = {{ url = "http://127.0.0.1:9/wake" }}
sleep = {{ url = "http://127.0.0.1:9/sleep" }}
{par_pool}
[[route]]
service = "m"
"#,
            crate::testing::FRA_PAR
        )
    }

    fn run(text: &str, reqs: &[(f64, &str, u32)], until: f64) -> PolicyReport {
        let requests = reqs
            .iter()
            .map(|&(t, edge, output_tokens)| TraceRequest {
                t,
                edge: edge.into(),
                model: "m".into(),
                prompt_tokens: 10,
                output_tokens,
                session: None,
            })
            .collect();
        let trace = Trace { requests, source: "test".into(), format: "jsonl", assign: None };
        let model =
            ReplicaModel { default_rates: Rates { prefill_tps: 0.0, decode_tps: 100.0 }, ..ReplicaModel::default() };
        let r = Replay::new(text, std::path::Path::new("t.toml"), &Policy::Config, &trace, &model, 3).expect("replay");
        r.run("config", Some(until), |_| {})
    }

    #[test]
    fn a_pool_woken_by_another_edge_is_put_to_sleep_again_by_its_home_edge() {
        // Paris has no pool: its requests wake Frankfurt's, which its home
        // edge (Frankfurt) only sees become ready through its probes.
        let text = config("idle_timeout = \"10s\"\nwake_time = \"2s\"", "");
        let r = run(&text, &[(0.0, "par", 20), (100.0, "par", 20)], 300.0);
        let fra = &r.pools[0].1;
        assert_eq!((fra.ok, fra.wakes), (2, 2), "{fra:?}");
        assert_eq!(fra.sleeps, 2, "slept after each busy spell: {fra:?}");
        assert!(fra.gpu_seconds < 60.0, "{}", fra.gpu_seconds);
    }

    #[test]
    fn a_pool_woken_for_demand_that_went_elsewhere_sleeps_again() {
        // Paris always on; Frankfurt's edge routes away from its cold pool
        // until the demand wakes it, and then nobody comes.
        let par = "[[pool]]\nid = \"par-gpu\"\nlocation = \"par\"\nserves = [\"m\"]\nreplicas = [\"127.0.0.1:10\"]\n";
        let text = config("idle_timeout = \"10s\"\nwake_time = \"20s\"", par);
        let reqs = [
            (0.0, "fra", 10),
            (1.0, "fra", 10),
            (2.0, "fra", 10),
            (100.0, "fra", 10),
            (101.0, "fra", 10),
            (102.0, "fra", 10),
        ];
        let r = run(&text, &reqs, 300.0);
        let fra = &r.pools[0].1;
        assert_eq!(r.total.ok, 6);
        assert_eq!((fra.wakes, fra.sleeps), (2, 2), "{fra:?}");
        assert!(fra.gpu_seconds < 100.0, "{}", fra.gpu_seconds);
    }

    #[test]
    fn the_home_edge_does_not_cut_off_a_request_another_edge_sent_since_the_last_scrape() {
        // Frankfurt serves one short request and is idle at home one second
        // later; meanwhile Paris's edge has sent a ten-second generation
        // that Frankfurt's scrapes (a minute apart) have not seen.
        let text = config("idle_timeout = \"1s\"\nwake_time = \"2s\"", "");
        let r = run(&text, &[(0.0, "fra", 10), (2.5, "par", 1000)], 60.0);
        assert_eq!((r.total.ok, r.total.failed), (2, 0), "{:?}", r.total);
        assert_eq!(r.pools[0].1.sleeps, 1, "asleep once the long request is done");
    }

    #[test]
    fn in_a_cluster_one_edge_calls_the_wake_and_the_home_edge_sees_the_others_requests() {
        // Both edges want Frankfurt's cold pool at once: alone, each calls
        // its wake hook; as one cluster, one edge does.
        let text = config("idle_timeout = \"1s\"\nwake_time = \"2s\"", "");
        let clustered = format!("{text}\n[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\n");
        let reqs = [(0.0, "fra", 10), (0.0, "par", 10), (2.5, "par", 1000)];
        let alone = run(&text, &reqs, 60.0);
        let one = run(&clustered, &reqs, 60.0);
        assert_eq!((alone.total.wakes, one.total.wakes), (1, 1));
        assert_eq!(alone.total.wake_calls, 2, "{:?}", alone.total);
        assert_eq!(one.total.wake_calls, 1, "{:?}", one.total);
        assert_eq!((one.total.ok, one.total.failed), (3, 0));
        // Paris's ten-second generation shows in Frankfurt's shared view
        // within a publish, not only at its next scrape (a minute apart):
        // the pool sleeps once, after it.
        assert_eq!(one.pools[0].1.sleeps, 1, "{:?}", one.pools[0].1);
    }
}
