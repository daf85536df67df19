//! Live state of pools and replicas, split by concern:
//!
//! | module | holds |
//! | --- | --- |
//! | [`replica`] | one replica's readiness, in-flight count and reported load |
//! | [`pool`] | a pool's in-flight count, idle clock, wake progress, learned times, demand |
//! | [`hold`] | a pool's view under one snapshot: the slots it hands out, its hold queue and tickets |
//! | [`live`] | a snapshot bound to those states: what a request runs against |
//! | [`bind`] | the reload diff, and binding a new snapshot to the old states |
//! | [`router`] | the live snapshot, swapped atomically on reload |
//! | [`budget`] | the edge-wide budget of request body bytes held in memory |
//!
//! Lock-free counters on the request path; states are keyed by pool id and
//! replica address so that they survive reloads. Nothing here reads the
//! clock except a [`Slot`] ending (through [`crate::clock`]); every other
//! time comes in as an argument.

pub mod bind;
pub mod budget;
pub mod hold;
pub mod live;
pub mod pool;
pub mod replica;
pub mod router;

pub use bind::{diff, Diff, StateStore};
pub use budget::{BodyBudget, Held};
pub use hold::{HoldQueue, PoolView, Slot, Ticket};
pub use live::Live;
pub use pool::{Figures, MeasuredRtt, PoolState, EWMA_WEIGHT, SERVICE_TIME_SEED};
pub use replica::ReplicaState;
pub use router::Router;
