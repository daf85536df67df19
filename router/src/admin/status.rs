//! The status page served at `GET /` of the admin listener: one
//! self-contained HTML file (inline SVG world map, CSS and script, no
//! external assets) that polls `GET /state` and draws the network.

/// The page.
pub const PAGE: &str = include_str!("status_page.html");
