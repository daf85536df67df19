//! The request path of HTTP/1.1 and HTTP/2, and what every protocol shares.
//!
//! | module | does |
//! | --- | --- |
//! | [`request`] | one request through the routing core, whatever the protocol: route, access, service, admission; metrics and the access log |
//! | [`admit`] | the admission shell: place, take a slot or hold, start wakes, wait |
//! | [`policy`] | the one response policy: ids, limits, forwarded and debug headers, the edge's own answers, upstream failures, retries |
//! | [`headers`] | header names and hop-by-hop rules |
//! | [`keepalive`] | held streams that say they are held (`hold_keepalive`) |
//! | [`body`] | finding the model in a JSON body |
//! | [`upstream`] | how replicas are reached |
//! | [`phases`] | the HTTP/1.1 and HTTP/2 adapter: pingora's proxy phases |
//! | [`listener`] | the TCP listeners, TLS and connection limits |
//!
//! HTTP/3 has its own adapter in [`crate::h3`], over the same modules.

pub mod admit;
pub mod body;
pub mod headers;
pub mod keepalive;
pub mod listener;
pub mod phases;
pub mod policy;
pub mod request;
pub mod upstream;
