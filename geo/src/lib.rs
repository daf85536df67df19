//! Geography for placement: where locations are, how far apart they are, and
//! how long a round trip between them takes.
//!
//! Everything here is computed once per config snapshot; the request path only
//! reads the resulting [`RttMatrix`] and rankings.

#![forbid(unsafe_code)]

use std::time::Duration;

/// Mean Earth radius in kilometres (IUGG mean radius R1 = 6371.0088 km).
pub const EARTH_RADIUS_KM: f64 = 6371.0088;

/// Speed of light in optical fibre, in kilometres per millisecond, one way.
///
/// Light travels at c / n in glass with a refractive index n ≈ 1.47, i.e.
/// ≈ 204,000 km/s; 200 km/ms is the figure network engineers round to.
pub const FIBER_KM_PER_MS: f64 = 200.0;

/// How much longer real fibre paths are than the great circle.
///
/// Cables follow coasts, rights of way and sea beds, and traffic is routed
/// through exchange points. Measurements between well-connected cities put
/// the ratio of RTT to the great-circle fibre RTT at 1.3–2.0 (Singla et al.,
/// "The Internet at the Speed of Light", HotNets 2014; RIPE Atlas city-pair
/// data). 1.5 matches typical backbone RTTs between the example network's
/// cities within a few milliseconds (Frankfurt–Paris ≈ 8 ms,
/// Frankfurt–Singapore ≈ 155 ms).
pub const PATH_INFLATION: f64 = 1.5;

/// Fixed cost added to every estimated round trip, in milliseconds: the
/// switching, queueing and last-mile time that does not scale with distance.
pub const BASE_RTT_MS: f64 = 1.0;

/// A point on the Earth, in decimal degrees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Coord {
    /// Latitude in degrees, −90 (south) to 90 (north).
    pub lat: f64,
    /// Longitude in degrees, −180 (west) to 180 (east).
    pub lon: f64,
}

impl Coord {
    /// A coordinate from latitude and longitude in degrees.
    pub const fn new(lat: f64, lon: f64) -> Self {
        Coord { lat, lon }
    }

    /// Whether latitude and longitude are inside their ranges.
    pub fn is_valid(&self) -> bool {
        (-90.0..=90.0).contains(&self.lat) && (-180.0..=180.0).contains(&self.lon)
    }
}

/// Great-circle distance between two points in kilometres (haversine
/// formula on a sphere of [`EARTH_RADIUS_KM`]; within 0.5 % of the
/// ellipsoidal distance).
pub fn great_circle_km(a: Coord, b: Coord) -> f64 {
    let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// The model that turns a distance into an expected round-trip time.
///
/// `rtt = base + 2 × distance × inflation / fibre speed`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RttModel {
    /// One-way speed of light in fibre, km per millisecond.
    pub fiber_km_per_ms: f64,
    /// Ratio of the real path length to the great circle.
    pub path_inflation: f64,
    /// Distance-independent cost of a round trip, in milliseconds.
    pub base_ms: f64,
}

impl Default for RttModel {
    fn default() -> Self {
        RttModel { fiber_km_per_ms: FIBER_KM_PER_MS, path_inflation: PATH_INFLATION, base_ms: BASE_RTT_MS }
    }
}

impl RttModel {
    /// Expected round-trip time over `km` of great-circle distance.
    pub fn rtt_for_km(&self, km: f64) -> Duration {
        let ms = self.base_ms + 2.0 * km * self.path_inflation / self.fiber_km_per_ms;
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    /// Expected round-trip time between two points.
    pub fn rtt(&self, a: Coord, b: Coord) -> Duration {
        self.rtt_for_km(great_circle_km(a, b))
    }
}

/// Round-trip times between every pair of `n` locations, indexed by the
/// locations' positions. Stored in microseconds so that the request path
/// compares integers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RttMatrix {
    n: usize,
    micros: Vec<u32>,
    /// Pairs whose RTT was given ([`set`](Self::set)) rather than estimated.
    given: Vec<bool>,
}

impl RttMatrix {
    /// The estimated matrix for locations at `coords`. A location's RTT to
    /// itself is zero: an edge and a pool in the same location share a
    /// metro network, which the estimate's base cost would overstate.
    pub fn estimate(coords: &[Coord], model: &RttModel) -> Self {
        let n = coords.len();
        let mut micros = vec![0u32; n * n];
        for (i, a) in coords.iter().enumerate() {
            for (j, b) in coords.iter().enumerate() {
                if i != j {
                    micros[i * n + j] = to_micros(model.rtt(*a, *b));
                }
            }
        }
        RttMatrix { n, micros, given: vec![false; n * n] }
    }

    /// Number of locations.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the matrix has no locations.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Replace the estimate for a pair (both directions) with a measured RTT.
    ///
    /// # Panics
    /// If `a` or `b` is not below [`len`](Self::len).
    pub fn set(&mut self, a: usize, b: usize, rtt: Duration) {
        assert!(a < self.n && b < self.n, "location index out of range");
        let us = to_micros(rtt);
        self.micros[a * self.n + b] = us;
        self.micros[b * self.n + a] = us;
        self.given[a * self.n + b] = true;
        self.given[b * self.n + a] = true;
    }

    /// Whether the RTT between `a` and `b` was given rather than estimated
    /// (a given value wins over one measured at run time).
    pub fn is_given(&self, a: usize, b: usize) -> bool {
        self.given.get(a * self.n + b).copied().unwrap_or(false)
    }

    /// Round trip between locations `a` and `b`, in microseconds.
    ///
    /// # Panics
    /// If `a` or `b` is not below [`len`](Self::len).
    #[inline]
    pub fn micros(&self, a: usize, b: usize) -> u32 {
        self.micros[a * self.n + b]
    }

    /// Round trip between locations `a` and `b`.
    pub fn get(&self, a: usize, b: usize) -> Duration {
        Duration::from_micros(u64::from(self.micros(a, b)))
    }

    /// The items of `targets` ranked by RTT from location `from`, nearest
    /// first; ties keep the order of `targets`. Each target is an item and
    /// the location it is at.
    pub fn rank<T>(&self, from: usize, targets: impl IntoIterator<Item = (T, usize)>) -> Vec<Ranked<T>> {
        let mut ranked: Vec<Ranked<T>> =
            targets.into_iter().map(|(item, at)| Ranked { item, rtt_us: self.micros(from, at) }).collect();
        ranked.sort_by_key(|r| r.rtt_us);
        ranked
    }

    /// The location nearest to `from` among `candidates` (itself if it is
    /// one of them); ties go to the first candidate.
    pub fn nearest(&self, from: usize, candidates: impl IntoIterator<Item = usize>) -> Option<usize> {
        candidates.into_iter().min_by_key(|&c| self.micros(from, c))
    }
}

/// An item ranked by its round-trip time from some location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ranked<T> {
    /// What was ranked (a pool index, say).
    pub item: T,
    /// Round trip to it, in microseconds.
    pub rtt_us: u32,
}

fn to_micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRA: Coord = Coord::new(50.1109, 8.6821);
    const PAR: Coord = Coord::new(48.8566, 2.3522);
    const SIN: Coord = Coord::new(1.3521, 103.8198);
    const NYC: Coord = Coord::new(40.7128, -74.0060);
    const LON: Coord = Coord::new(51.5074, -0.1278);
    const SYD: Coord = Coord::new(-33.8688, 151.2093);
    const SFO: Coord = Coord::new(37.7749, -122.4194);

    fn assert_within(actual: f64, expected: f64, rel: f64) {
        let err = (actual - expected).abs() / expected;
        assert!(err <= rel, "{actual} is not within {rel} of {expected} (off by {err})");
    }

    #[test]
    fn known_city_pairs() {
        // Reference distances from the WGS-84 geodesic (Karney), rounded.
        assert_within(great_circle_km(FRA, PAR), 479.0, 0.01);
        assert_within(great_circle_km(FRA, SIN), 10_263.0, 0.01);
        assert_within(great_circle_km(LON, NYC), 5_570.0, 0.01);
        assert_within(great_circle_km(SFO, SYD), 11_947.0, 0.01);
    }

    #[test]
    fn distance_is_symmetric_and_zero_to_self() {
        assert_eq!(great_circle_km(FRA, FRA), 0.0);
        assert_within(great_circle_km(SIN, FRA), great_circle_km(FRA, SIN), 1e-12);
    }

    #[test]
    fn antipodes_do_not_overflow_asin() {
        let d = great_circle_km(Coord::new(0.0, 0.0), Coord::new(0.0, 180.0));
        assert_within(d, std::f64::consts::PI * EARTH_RADIUS_KM, 1e-9);
    }

    #[test]
    fn rtt_estimate_matches_backbone_figures() {
        let m = RttModel::default();
        let fra_par = m.rtt(FRA, PAR).as_secs_f64() * 1000.0;
        let fra_sin = m.rtt(FRA, SIN).as_secs_f64() * 1000.0;
        assert!((7.0..=10.0).contains(&fra_par), "fra-par {fra_par} ms");
        assert!((140.0..=170.0).contains(&fra_sin), "fra-sin {fra_sin} ms");
    }

    #[test]
    fn matrix_overrides_both_directions() {
        let mut m = RttMatrix::estimate(&[FRA, PAR, SIN], &RttModel::default());
        assert_eq!(m.micros(0, 0), 0);
        assert_eq!(m.micros(0, 1), m.micros(1, 0));
        m.set(0, 1, Duration::from_millis(9));
        assert_eq!(m.get(1, 0), Duration::from_millis(9));
        assert_eq!(m.micros(0, 1), 9_000);
    }

    #[test]
    fn ranking_puts_nearest_first_and_keeps_ties_stable() {
        let m = RttMatrix::estimate(&[FRA, PAR, SIN, LON], &RttModel::default());
        let ranked = m.rank(0, [("sin-a", 2), ("par-a", 1), ("fra-a", 0), ("fra-b", 0), ("lon-a", 3)]);
        let order: Vec<_> = ranked.iter().map(|r| r.item).collect();
        assert_eq!(order, ["fra-a", "fra-b", "par-a", "lon-a", "sin-a"]);
        // Paris: London (≈ 344 km) is nearer than Frankfurt (≈ 479 km).
        assert_eq!(m.nearest(1, [2, 3, 0]), Some(3));
        assert_eq!(m.nearest(1, [1, 3]), Some(1));
        assert_eq!(m.nearest(1, []), None);
    }

    #[test]
    fn coord_validity() {
        assert!(FRA.is_valid());
        assert!(!Coord::new(91.0, 0.0).is_valid());
        assert!(!Coord::new(0.0, -180.5).is_valid());
        assert!(!Coord::new(f64::NAN, 0.0).is_valid());
    }
}
