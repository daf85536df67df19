//! Edge-wide counts of answers, server errors and refusals by reason: what
//! a staged rollout's health gate compares before and after a config
//! change ([`crate::control::cluster::rollout`]).
//!
//! The counts are the process's (like the metrics recorder they sit
//! beside): one edge per process. Counting an answer is two relaxed atomic
//! additions; refusals, which are rare, take a lock.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

static ANSWERED: AtomicU64 = AtomicU64::new(0);
static SERVER_ERRORS: AtomicU64 = AtomicU64::new(0);
static REFUSALS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Counts since the process started, or over a window (see [`Figures::since`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    /// Requests answered with a status.
    pub answered: u64,
    /// Of them, answered 5xx.
    pub server_errors: u64,
    /// Requests refused or failed by the edge with a 5xx, by the error's
    /// code (`no_capacity`, `upstream_unreachable`, …), held streams ended
    /// with an error event included.
    pub refusals: BTreeMap<String, u64>,
}

/// Count an answer with `status` (0: the client left before one was sent,
/// not counted).
#[inline]
pub fn answered(status: u16) {
    if status == 0 {
        return;
    }
    ANSWERED.fetch_add(1, Ordering::Relaxed);
    if status >= 500 {
        SERVER_ERRORS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Count a refusal or failure with the error code `code`.
pub fn refused(code: &'static str) {
    let mut r = REFUSALS.lock().unwrap_or_else(|e| e.into_inner());
    *r.entry(code).or_insert(0) += 1;
}

/// The counts now.
pub fn now() -> Figures {
    let refusals = REFUSALS.lock().unwrap_or_else(|e| e.into_inner());
    Figures {
        answered: ANSWERED.load(Ordering::Relaxed),
        server_errors: SERVER_ERRORS.load(Ordering::Relaxed),
        refusals: refusals.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
    }
}

impl Figures {
    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Figures) -> Figures {
        Figures {
            answered: self.answered.saturating_sub(earlier.answered),
            server_errors: self.server_errors.saturating_sub(earlier.server_errors),
            refusals: self
                .refusals
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(earlier.refusals.get(k).copied().unwrap_or(0))))
                .filter(|(_, v)| *v > 0)
                .collect(),
        }
    }

    /// The share of answers that were 5xx (0 with no answers).
    pub fn error_share(&self) -> f64 {
        share(self.server_errors, self.answered)
    }

    /// The share of answers refused with `code`.
    pub fn refusal_share(&self, code: &str) -> f64 {
        share(self.refusals.get(code).copied().unwrap_or(0), self.answered)
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_the_difference() {
        let before = Figures { answered: 10, server_errors: 1, refusals: [("no_capacity".into(), 1)].into() };
        let after = Figures {
            answered: 30,
            server_errors: 11,
            refusals: [("no_capacity".into(), 1), ("upstream_unreachable".into(), 10)].into(),
        };
        let w = after.since(&before);
        assert_eq!(w.answered, 20);
        assert_eq!(w.server_errors, 10);
        assert_eq!(w.refusals, [("upstream_unreachable".to_owned(), 10)].into());
        assert!((w.error_share() - 0.5).abs() < 1e-9);
        assert!((w.refusal_share("upstream_unreachable") - 0.5).abs() < 1e-9);
        assert_eq!(Figures::default().error_share(), 0.0);
    }
}
