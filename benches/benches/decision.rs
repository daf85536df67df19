//! Why: every request runs this decision (route match, placement, replica
//! pick and slot) on a proxy worker thread; the goal is under 1 µs and no
//! heap allocation per decision, for 10 locations × 100 pools × 8 replicas.
//! A counting global allocator checks the second goal before the benches run.
//!
//! Run: `cargo bench -p stoke-benches --bench decision`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, BenchmarkId, Criterion};
use stoke_benches::{load, ready_router, sample_requests, Request, SampleRequests};
use stoke_config::{PoolId, ServiceSource};
use stoke_router::clock;
use stoke_router::core::placement::Decision;
use stoke_router::state::Router;

/// The network of the decision benches: 10 locations × 100 pools × 8 replicas.
const LOCATIONS: usize = 10;
const POOLS: usize = 100;
/// Routes of the decision network: 100 hosts of 10 routes each.
const ROUTES: usize = 1_000;
/// Routes of the large table used to see how route match scales.
const ROUTES_LARGE: usize = 10_000;
/// The model a request names in its body or header.
const MODEL: &str = "llama-3.1-8b";
/// Decisions run for the allocation check.
const CHECKED_DECISIONS: u64 = 100_000;

/// Counts every allocation of the process, so that the bench can show that
/// the decision makes none.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// The workspace denies `unsafe_code`; it is allowed on this impl alone
// because `GlobalAlloc` is an unsafe trait and counting allocations is how
// the bench proves the request path makes none. Every call is forwarded
// unchanged to `System`, so this allocator keeps `System`'s contract.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// One request's decision, as the proxy makes it: load the live snapshot,
/// match the route, find the service (fixed, or by the model name a body or
/// header gave), place, and take a slot on a replica (released at once
/// here, as when the response ends). `None` if any step finds nothing.
#[inline]
fn decide(router: &Router, host: &str, path: &str, model: &str) -> Option<PoolId> {
    let live = router.live();
    let network = &live.snapshot.network;
    let route = network.route_table.find(host, path)?;
    let service = match &network.route(route).service {
        ServiceSource::Fixed(id) => *id,
        ServiceSource::BodyField(_) | ServiceSource::Header(_) => network.service_id(model)?,
    };
    // The shell reads the clock once per decision and passes it in.
    let now = clock::now();
    match live.place(service, now).decision {
        Decision::Forward { pool } => {
            let slot = live.acquire(pool, now)?;
            drop(slot);
            Some(pool)
        }
        Decision::Hold { .. } | Decision::NoCapacity => None,
    }
}

fn requests(s: &SampleRequests) -> Vec<(&'static str, Request)> {
    let mut out = vec![("exact", s.exact.clone())];
    if let Some(w) = &s.wildcard {
        out.push(("wildcard", w.clone()));
    }
    out.push(("fallback", s.fallback.clone()));
    out
}

/// Run the whole decision many times and check that the allocation count
/// does not move. Panics (failing the bench run) if it does.
fn check_no_allocation() {
    let router = ready_router(LOCATIONS, POOLS, ROUTES).expect("generated network loads");
    let reqs = requests(&sample_requests(ROUTES));
    // Warm up: thread-locals (the RNG, arc-swap's per-thread node) are set
    // up on first use, once per thread, not per request.
    for (_, r) in &reqs {
        for _ in 0..1_000 {
            black_box(decide(&router, &r.host, &r.path, MODEL));
        }
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut placed = 0u64;
    for i in 0..CHECKED_DECISIONS {
        let r = &reqs[i as usize % reqs.len()].1;
        placed += u64::from(black_box(decide(&router, black_box(&r.host), black_box(&r.path), MODEL)).is_some());
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!(
        "allocation check: {CHECKED_DECISIONS} decisions ({placed} placed, {} kinds of route match), {allocations} heap allocations",
        reqs.len()
    );
    assert_eq!(placed, CHECKED_DECISIONS, "every sample request should be placed");
    assert_eq!(allocations, 0, "the decision path allocated on the heap");
}

fn decision(c: &mut Criterion) {
    let router = ready_router(LOCATIONS, POOLS, ROUTES).expect("generated network loads");
    let live = router.live();
    let network = &live.snapshot.network;
    let samples = sample_requests(ROUTES);
    let service = network.service_id(MODEL).expect("the model is served");
    let pool = match live.place(service, clock::now()).decision {
        Decision::Forward { pool } => pool,
        other => panic!("a ready network should forward, got {other:?}"),
    };

    let mut g = c.benchmark_group("decision");

    // Step 0: the live snapshot (an arc-swap load), which a request keeps.
    g.bench_function("live", |b| b.iter(|| router.live()));

    // Step 1: route match, by kind of host match, on 1,000 and 10,000 routes.
    for (kind, r) in requests(&samples) {
        g.bench_with_input(BenchmarkId::new("route_match/1k_routes", kind), &r, |b, r| {
            b.iter(|| network.route_table.find(black_box(&r.host), black_box(&r.path)))
        });
    }
    let large = load(&stoke_benches::generate_network(LOCATIONS, POOLS, ROUTES_LARGE)).expect("large network loads");
    for (kind, r) in requests(&sample_requests(ROUTES_LARGE)) {
        g.bench_with_input(BenchmarkId::new("route_match/10k_routes", kind), &r, |b, r| {
            b.iter(|| large.route_table.find(black_box(&r.host), black_box(&r.path)))
        });
    }

    // Step 2: the service named by a body field or header.
    g.bench_function("service_by_name", |b| b.iter(|| network.service_id(black_box(MODEL))));

    // Step 3: placement among the pools that serve the service.
    g.bench_function("place", |b| b.iter(|| live.place(black_box(service), clock::now())));

    // Step 4: replica pick (power of two choices) and slot, released at once.
    g.bench_function("acquire_release", |b| {
        b.iter(|| {
            let slot = live.acquire(black_box(pool), clock::now()).expect("a free slot");
            drop(slot);
        })
    });

    // All of it, per kind of route match.
    for (kind, r) in requests(&samples) {
        g.bench_with_input(BenchmarkId::new("whole", kind), &r, |b, r| {
            b.iter(|| decide(&router, black_box(&r.host), black_box(&r.path), MODEL).expect("placed"))
        });
    }
    g.finish();

    // Placement when the nearest pools are down: it walks further down the
    // ranking. A router of its own, so the main one stays all ready.
    let degraded = ready_router(LOCATIONS, POOLS, ROUTES).expect("generated network loads");
    let dl = degraded.live();
    for c in dl.snapshot.candidates(service).iter().take(2) {
        for r in dl.pool(c.pool).replicas.iter() {
            r.set_ready(false);
        }
    }
    c.bench_function("decision/place/two_nearest_down", |b| b.iter(|| dl.place(black_box(service), clock::now())));
}

criterion_group!(benches, decision);

fn main() {
    check_no_allocation();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
