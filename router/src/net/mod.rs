//! Small HTTP/1.1 pieces over hyper for the edge's own traffic: the client
//! of probes, load scrapes and hooks, and the server of the admin API and
//! the simulator.

pub mod client;
pub mod server;
