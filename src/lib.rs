//! shiftgate: a rate-shaping reverse proxy for the Genesys Cloud Platform API.
//!
//! # Layout
//! - [`config`]: config.yaml, parsed strictly and validated into [`config::Config`].
//! - [`route`]: path templates, first-match routing, the upstream path rewrite.
//! - [`budget`]: the pacing algorithm of one bucket (GCRA, pause, adaptive rate): pure.
//! - [`pacer`]: the queue; requests wait until every bucket of their route grants a slot.
//! - [`retry`]: the retry policy for upstream 429s, 5xx and connect failures: pure.
//! - [`proxy`]: the Pingora `ProxyHttp` implementation; the only module that knows `Session`.
//! - [`answers`]: the JSON answers the proxy makes itself.
//! - [`metrics`], [`status_page`], [`admin`]: what ops see.
//! - [`server`]: wiring: services, signals, reload.
//! - [`emulator`]: a stand-in for the Genesys API, for tests and load tests.
//! - [`loadtest`]: the shift-change load generator and HTTP client of the tests.

pub mod budget;
pub mod config;
pub mod pacer;
pub mod route;

/// Whether this build can share budgets through Redis (`cluster` in the config).
pub const CLUSTER_SUPPORTED: bool = false;
