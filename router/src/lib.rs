//! stoke-router: the edge of a global inference network.
//!
//! The request path, from the outside in: [`listener`] accepts and hands
//! connections to pingora, whose phases [`proxy`] translates into calls to
//! the routing core ([`routing`]): route match (in `stoke-config`),
//! [`placement`] (which pool), [`pick`] (which replica) and the in-flight
//! accounting of [`state`]. [`health`] keeps readiness and load current.
//! [`sim`] is a simulated GPU fleet for tests, benches and the demo.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod body;
pub mod cli;
pub mod demo;
pub mod drain;
pub mod edge;
pub mod error;
pub mod h3;
pub mod headers;
pub mod health;
pub mod hooks;
pub mod http_client;
pub mod http_server;
pub mod listener;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod pick;
pub mod placement;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod routing;
pub mod sim;
pub mod state;
pub mod status;
pub mod tls;
pub mod upstream;
pub mod wake;
pub mod watch;
