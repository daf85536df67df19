//! stoke-router: the edge of a global inference network.
//!
//! The request path, from the outside in: [`proxy::listener`] accepts
//! connections on pingora-core and hands every request, HTTP/1.1 and
//! HTTP/2 through [`proxy::conn`] (hyper) and HTTP/3 through [`h3`], to the one
//! forwarding engine ([`proxy::engine`]), which calls the routing core
//! ([`proxy::request`]) and forwards (over hyper's client connections,
//! [`proxy::upstream`]), streams, retries and accounts. Every decision — placement and the wait model,
//! admission, wake schedule, idle rule, replica pick — is pure code in
//! [`core`], over the live state of [`state`]; the async shells of
//! [`control`] (wakes, sleeps, probes) and [`proxy::admit`] read the clock
//! and carry the decisions out. [`sim`] is a simulated GPU fleet for tests,
//! benches and the demo.
//!
//! Modules depend downwards only: `core` on nothing of this crate; `state`
//! on `core`; `control` on both; `proxy` and `h3` on those; `reload`,
//! `admin`, `edge`, `demo` and `cli` on top.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod cli;
pub mod clock;
pub mod control;
pub mod core;
pub mod demo;
pub mod drain;
pub mod edge;
pub mod error;
pub mod h3;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod otel;
pub mod proxy;
pub mod push;
pub mod reload;
pub mod signals;
pub mod sim;
pub mod simulate;
pub mod state;
pub mod tally;
pub mod tls;
pub mod upgrade;

#[cfg(test)]
mod testing;
