//! The simulator: GPU replicas and an orchestrator as real HTTP servers, so
//! that tests, benches and the demo exercise stoke without GPUs.

pub mod cache;
pub mod orchestrator;
pub mod ports;
pub mod replica;

pub use orchestrator::{Call, Orchestrator, OrchestratorOptions};
pub use replica::{Replica, ReplicaOptions, ReplicaStats};
