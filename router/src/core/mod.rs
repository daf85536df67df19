//! The decisions of an edge, with no I/O: nothing here reads a clock,
//! spawns a task or touches a socket. Each decision is a function of the
//! compiled snapshot, a view of the live state, the time `now` and (where
//! it needs any) randomness, all passed in — the shape of quinn-proto's
//! `handle(now, …)`. The async shells in [`crate::control`] and
//! [`crate::proxy`] read the clock, call in here, and carry out what comes
//! back; tests and a trace replay drive the same functions on a virtual
//! clock.
//!
//! | module | decides |
//! | --- | --- |
//! | [`wait`] | how long a pool would make a request wait (the wait model) |
//! | [`placement`] | which pool serves a request |
//! | [`admission`] | forward now, hold with an ETA, or refuse with a reason |
//! | [`demand`] | when a cold pool that keeps losing traffic is woken |
//! | [`wake`] | when a wake hook is called again, and when a wake is given up |
//! | [`idle`] | when a pool is idle, so its home edge puts it to sleep |
//! | [`pick`] | which replica of the chosen pool |
//! | [`affinity`] | which replica, when requests share a key (prompt-cache affinity) |

pub mod admission;
pub mod affinity;
pub mod demand;
pub mod idle;
pub mod pick;
pub mod placement;
pub mod wait;
pub mod wake;
