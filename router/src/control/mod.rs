//! The async shells around the decision core: they read the clock, do the
//! I/O, call into [`crate::core`] for every decision, and carry out what
//! it says.
//!
//! | module | runs |
//! | --- | --- |
//! | [`wake`] | a pool's wake: the hook, its resends, fast probes, give-up |
//! | [`sleep`] | the home edge's sleeper: idle pools to sleep, once per idle period |
//! | [`probe`] | health probes and load scrapes of every replica |
//! | [`load`] | reading a replica's running and waiting requests from its metrics |
//! | [`hooks`] | the wake and sleep actuators (webhook or command) |
//! | [`cluster`] | the other edges, over NATS: shared load, one wake per pool |

pub mod cluster;
pub mod hooks;
pub mod load;
pub mod probe;
pub mod sleep;
pub mod wake;
