//! The one clock of the async shells: tokio's, so that tests can pause and
//! advance it (`start_paused = true`). Decisions never call this; the
//! shells read it once and pass `now` in. A trace replay
//! ([`crate::simulate`]) sets a virtual time on its thread instead, so
//! that the state it drives (slots ending, idle clocks) reads that time.

use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static VIRTUAL: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Now: the virtual time set on this thread, else the runtime's clock (the
/// real clock outside a runtime, and in builds without tokio's test
/// utilities).
#[inline]
pub fn now() -> Instant {
    match VIRTUAL.with(Cell::get) {
        Some(t) => t,
        None => tokio::time::Instant::now().into_std(),
    }
}

/// Set this thread's virtual time (`None`: back to the runtime's clock).
pub fn set_virtual(at: Option<Instant>) {
    VIRTUAL.with(|v| v.set(at));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtual_time_holds_on_its_thread_only() {
        let t = Instant::now() + std::time::Duration::from_secs(3600);
        set_virtual(Some(t));
        assert_eq!(now(), t);
        std::thread::spawn(move || assert_ne!(now(), t)).join().expect("thread");
        set_virtual(None);
        assert!(now() < t);
    }
}
