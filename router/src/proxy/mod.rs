//! The request path: the forwarding engine every protocol shares, and its
//! adapters.
//!
//! | module | does |
//! | --- | --- |
//! | [`engine`] | the forwarding engine: one exchange from request head to the answer's last byte, for every protocol |
//! | [`request`] | one request through the routing core, whatever the protocol: route, access, service, admission; metrics and the access log |
//! | [`admit`] | the admission shell: place, take a slot or hold, start wakes, wait |
//! | [`policy`] | the one response policy: ids, limits, forwarded and debug headers, the edge's own answers, upstream failures, retries |
//! | [`headers`] | header names and hop-by-hop rules |
//! | [`keepalive`] | held streams that say they are held (`hold_keepalive`) |
//! | [`body`] | finding the model in a JSON body |
//! | [`upstream`] | how replicas are reached: hyper's HTTP/1.1 client connections, and the one retry loop |
//! | [`idle`] | idle upstream connections, kept between requests |
//! | [`conn`] | the HTTP/1.1 and HTTP/2 adapter: hyper's server connections |
//! | [`listener`] | the TCP listeners and their accept loop, TLS and the connection cap |
//!
//! HTTP/3 has its own adapter in [`crate::h3`], over the same engine.

pub mod admit;
pub mod body;
pub mod conn;
pub mod engine;
pub mod headers;
pub mod idle;
pub mod keepalive;
pub mod listener;
pub mod policy;
pub mod request;
pub mod upstream;
