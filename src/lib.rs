//! shiftgate: a rate-shaping reverse proxy for the Genesys Cloud Platform API.
//!
//! # Layout
//! - [`config`]: config.yaml, parsed strictly and validated into [`config::Config`].
//! - [`route`]: path templates, first-match routing, the upstream path rewrite.
//! - [`budget`]: the pacing algorithm of one bucket (GCRA, pause, adaptive rate): pure.
//! - [`pacer`]: the queue; requests wait until every bucket of their route grants a slot.
//! - [`store`]: the seam to the budget state shared by replicas; [`cluster`]: its Redis side.
//! - [`retry`]: the retry policy for upstream 429s, 5xx and connect failures: pure.
//! - [`proxy`]: the Pingora `ProxyHttp` implementation; the only module that knows `Session`.
//! - [`answers`]: the JSON answers the proxy makes itself.
//! - [`shared`]: the state a running proxy shares (config in force, pacer, metrics, resolver).
//! - [`metrics`], [`status_page`], [`admin`]: what ops see.
//! - [`reload`]: all-or-nothing config reload.
//! - [`server`]: wiring: Pingora services, signals, drain.
//! - [`emulator`]: a stand-in for the Genesys API, for tests and load tests.
//! - [`loadtest`]: the shift-change load generator and the HTTP client of the tests.
//! - [`demo`]: the emulator in-process and the proxy as a child process: one shift change
//!   straight at the API and through the proxy, side by side.

pub mod admin;
pub mod answers;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod emulator;
pub mod harness;
pub mod loadtest;
pub mod metrics;
pub mod pacer;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod route;
pub mod server;
pub mod shared;
pub mod status_page;
pub mod store;
