//! The simulator: GPU replicas and an orchestrator as real HTTP servers, so
//! that tests, benches and the demo exercise stoke without GPUs.

pub mod http_server;
pub mod replica;

pub use replica::{Replica, ReplicaOptions, ReplicaStats};
