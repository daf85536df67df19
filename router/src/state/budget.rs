//! The edge-wide budget of request body bytes held in memory: bodies read
//! to find the model, and bodies read ahead while a request is held. Each
//! buffer counts what it holds as it grows ([`Held::grow`]) and gives it
//! back when dropped, on every path; a buffer that would pass the budget
//! is refused, so memory stays bounded however many requests send bodies
//! at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Body bytes held now, against a maximum.
#[derive(Debug)]
pub struct BodyBudget {
    held: AtomicU64,
    max: AtomicU64,
}

/// The budget would be passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exhausted {
    /// The budget.
    pub max: u64,
}

impl BodyBudget {
    /// A budget of `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(BodyBudget { held: AtomicU64::new(0), max: AtomicU64::new(max) })
    }

    /// Change the maximum (a reload); what is held stays held.
    pub fn set_max(&self, max: u64) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The maximum.
    pub fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }

    /// A buffer's account, holding nothing yet.
    pub fn account(self: &Arc<Self>) -> Held {
        Held { budget: self.clone(), bytes: 0 }
    }
}

/// What one buffer holds of the budget; dropping it gives it back.
#[derive(Debug)]
pub struct Held {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl Held {
    /// Count `n` more bytes, or refuse if the budget would be passed.
    pub fn grow(&mut self, n: usize) -> Result<(), Exhausted> {
        let n = n as u64;
        let max = self.budget.max();
        self.budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |h| h.checked_add(n).filter(|t| *t <= max))
            .map_err(|_| Exhausted { max })?;
        self.bytes += n;
        Ok(())
    }

    /// Bytes this buffer holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_count_what_they_hold_and_give_it_back() {
        let b = BodyBudget::new(100);
        let mut one = b.account();
        let mut two = b.account();
        assert!(one.grow(60).is_ok());
        assert_eq!(two.grow(50), Err(Exhausted { max: 100 }), "over the budget");
        assert!(two.grow(40).is_ok());
        assert_eq!(b.held(), 100);
        drop(one);
        assert_eq!(b.held(), 40);
        assert!(two.grow(60).is_ok());
        drop(two);
        assert_eq!(b.held(), 0);
    }
}
