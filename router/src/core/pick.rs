//! Replica pick: power of two choices on load among ready replicas with a
//! free slot (Mitzenmacher; linkerd's `p2c`). Two random candidates, the
//! less loaded wins: near-optimal spread with O(1) state and no herding on
//! the single least-loaded replica when many edges decide at once.
//!
//! Pure: randomness comes in as a function, and replicas are seen through
//! [`ReplicaLoad`], so that the choice is deterministic for a seed.

/// What the pick needs to know of a replica.
pub trait ReplicaLoad {
    /// Free slots under `max` (0 if not ready).
    fn free(&self, max: u32) -> u32;
    /// Requests it is busy with.
    fn busy(&self) -> u32;
}

impl<T: ReplicaLoad + ?Sized> ReplicaLoad for std::sync::Arc<T> {
    #[inline]
    fn free(&self, max: u32) -> u32 {
        (**self).free(max)
    }
    #[inline]
    fn busy(&self) -> u32 {
        (**self).busy()
    }
}

/// Pick a replica index among those with a free slot under `max`.
/// `rand(n)` returns a uniform integer in `0..n`. No allocation.
pub fn pick<R: ReplicaLoad>(replicas: &[R], max: u32, mut rand: impl FnMut(usize) -> usize) -> Option<usize> {
    let eligible = replicas.iter().filter(|r| r.free(max) > 0).count();
    match eligible {
        0 => None,
        1 => replicas.iter().position(|r| r.free(max) > 0),
        n => {
            let a = rand(n);
            // A second, distinct rank.
            let mut b = rand(n - 1);
            if b >= a {
                b += 1;
            }
            let (ia, ib) = (nth_eligible(replicas, max, a)?, nth_eligible(replicas, max, b)?);
            Some(if replicas[ib].busy() < replicas[ia].busy() { ib } else { ia })
        }
    }
}

fn nth_eligible<R: ReplicaLoad>(replicas: &[R], max: u32, n: usize) -> Option<usize> {
    replicas.iter().enumerate().filter(|(_, r)| r.free(max) > 0).nth(n).map(|(i, _)| i)
}

/// A replica for tests of the picks: ready or not, and how busy.
#[cfg(test)]
pub(crate) mod fake {
    use super::ReplicaLoad;

    #[derive(Clone, Copy, Debug)]
    pub struct Fake {
        pub ready: bool,
        pub busy: u32,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::fake::Fake;

    fn rng(seed: u64) -> impl FnMut(usize) -> usize {
        let mut r = fastrand::Rng::with_seed(seed);
        move |n| r.usize(0..n)
    }

    #[test]
    fn none_when_nothing_is_free() {
        let reps = [Fake { ready: false, busy: 0 }, Fake { ready: true, busy: 4 }];
        assert_eq!(pick(&reps, 4, rng(1)), None);
        assert_eq!(pick::<Fake>(&[], 4, rng(1)), None);
    }

    #[test]
    fn only_eligible_replicas_are_picked() {
        let reps = [Fake { ready: false, busy: 0 }, Fake { ready: true, busy: 4 }, Fake { ready: true, busy: 3 }];
        for seed in 0..100 {
            assert_eq!(pick(&reps, 4, rng(seed)), Some(2));
        }
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let reps = [Fake { ready: true, busy: 5 }, Fake { ready: true, busy: 1 }];
        for seed in 0..100 {
            assert_eq!(pick(&reps, 8, rng(seed)), Some(1));
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let reps: Vec<Fake> = (0..8).map(|i| Fake { ready: true, busy: i % 3 }).collect();
        let a: Vec<_> = (0..50).map(|s| pick(&reps, 8, rng(s))).collect();
        let b: Vec<_> = (0..50).map(|s| pick(&reps, 8, rng(s))).collect();
        assert_eq!(a, b);
    }

    /// Largest max − min load seen while `k` requests arrive and stay,
    /// each placed by `choose`.
    fn worst_spread(k: usize, mut choose: impl FnMut(&[Fake]) -> usize) -> u32 {
        let mut reps: Vec<Fake> = (0..8).map(|_| Fake { ready: true, busy: 0 }).collect();
        let mut worst = 0;
        for _ in 0..k {
            let i = choose(&reps);
            reps[i].busy += 1;
            let (min, max) = reps.iter().fold((u32::MAX, 0), |(lo, hi), x| (lo.min(x.busy), hi.max(x.busy)));
            worst = worst.max(max - min);
        }
        worst
    }

    #[test]
    fn load_spreads_evenly_when_requests_stay() {
        // Requests that take a slot and keep it: p2c keeps replicas within
        // a few requests of each other (the gap grows like log log n),
        // where one random choice drifts apart like sqrt(k).
        let (mut p2c_total, mut random_total) = (0, 0);
        for seed in 0..50 {
            let mut r = rng(seed);
            let p2c = worst_spread(200, |reps| pick(reps, 1024, &mut r).expect("room"));
            let mut r = rng(seed);
            let random = worst_spread(200, |reps| r(reps.len()));
            assert!(p2c <= 8, "seed {seed}: p2c spread {p2c}");
            p2c_total += p2c;
            random_total += random;
        }
        assert!(p2c_total * 2 < random_total, "p2c {p2c_total} vs random {random_total}");
    }

    #[test]
    fn a_leaving_replica_disturbs_only_its_own_share() {
        // With equal loads, removing one replica leaves picks among the
        // others uniform: every remaining replica still gets picked.
        let reps: Vec<Fake> = (0..4).map(|i| Fake { ready: i != 2, busy: 0 }).collect();
        let mut seen = [0u32; 4];
        let mut r = rng(3);
        for _ in 0..400 {
            seen[pick(&reps, 4, &mut r).expect("room")] += 1;
        }
        assert_eq!(seen[2], 0);
        for i in [0, 1, 3] {
            assert!(seen[i] > 60, "replica {i} got {}", seen[i]);
        }
    }
}
