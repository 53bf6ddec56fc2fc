//! shiftgate: a rate-shaping reverse proxy for the Genesys Cloud Platform API.
//!
//! # Layout
//! From the edge inwards; each module imports only those below it (no import circle).
//!
//! **Running it**
//! - [`server`]: wiring: Pingora services, signals (drain, upgrade, reload), the early exit;
//!   [`notify`]: systemd's readiness message; [`health`]: `shiftgate health`, the probe of
//!   `/readyz` that containers run.
//! - [`edge`]: every client connection before Pingora's HTTP handling, in a task of its own:
//!   the connection cap, the request head and keep-alive idle timers, and a paced request's
//!   wait for its slot, before Pingora builds its per-request state.
//! - [`admin`]: the admin listener (`/metrics`, `/healthz`, `/readyz`, `/status`, reload);
//!   [`status_page`]: the page and JSON it shows; [`reload`]: all-or-nothing config reload.
//! - [`proxy`]: the Pingora `ProxyHttp` implementation, the only module that knows `Session`:
//!   each hook translates between the session and the plain types below.
//! - [`bulk`]: coalescing at run time: a task per token waits for the bulk route's slot, makes
//!   the bulk call (its own HTTP client) and hands each update its own answer.
//! - [`state`]: the running proxy's state (config in force, pacer, metrics, lifecycle), fields
//!   private behind one method per change; [`resolve`]: upstream names resolved off the request
//!   path.
//!
//! **Deciding** (pure: no Pingora, no sockets; tested on paused time)
//! - [`pacer`]: the queue; a request waits until every bucket of its route grants a slot.
//!   [`pacer::queue`] decides from (state, now) whom to admit and release, and which keys of a
//!   keyed budget to forget (at most `max_keys`, idle ones first); the handle reads the clock,
//!   delivers grants and, in cluster mode, leases slots.
//! - [`coalesce`]: single updates grouped per token into batches for bulk calls, never two of
//!   one user in a batch, each user's updates in order.
//! - [`throttle`]: what an upstream 429 means: pause, probe, learn the limit, retry delay.
//! - [`retry`]: the retry policy for upstream 429s, 5xx and connect failures.
//! - [`budget`]: the pacing algorithm of one bucket (GCRA over integer nanoseconds).
//! - [`shared_budget`]: the seam to the budget state replicas share (Redis, or in memory).
//! - [`admission`]: what a request is charged to (its route's buckets), from Pingora's parsed
//!   head or, at the edge, from the raw one; [`access`]: the access line.
//! - [`route`]: path templates, first-match routing, the upstream path and header rewrite;
//!   [`hygiene`]: what a request head must be before it is routed (a bounded size);
//!   [`forwarded`]: the client's address behind `trusted_proxies` (X-Forwarded-For).
//! - [`config`]: config.yaml, parsed strictly and validated into [`config::Config`].
//! - [`tls`]: the HTTPS listener's certificate pair (PEM, key checked against the chain) and the
//!   resolver that swaps it on reload; the config loads the pair, so a bad one is a config error.
//!
//! **Speaking Genesys**
//! - [`local_response`]: the answers the proxy makes itself (`shiftgate.*` codes).
//! - [`genesys`]: the Genesys error body and `Retry-After` as the proxy and the emulator write
//!   them; [`digest`]: SHA-256 as hex and as bucket keys; [`metrics`]: every metric, in one place.
//!
//! **Around it**
//! - [`emulator`]: a stand-in for the Genesys API, for tests, load tests and the demo.
//! - [`loadtest`]: the shift-change load generator and its HTTP client (http and https), also
//!   the client of the tests.
//! - [`discover`]: measures a real org's limits for one endpoint (per token and org-wide) and
//!   writes a config; uses [`loadtest`]'s client, never the proxy.
//! - [`demo`]: one shift change straight at the emulator and through the proxy, side by side.
//! - [`harness`]: the emulator on a thread of its own and the real binary as a child process,
//!   on reserved loopback ports: what the demo and the end-to-end tests start.

pub mod access;
pub mod admin;
pub mod admission;
pub mod budget;
pub mod bulk;
pub mod coalesce;
pub mod config;
pub mod demo;
pub mod digest;
pub mod discover;
pub mod edge;
pub mod emulator;
pub mod forwarded;
pub mod genesys;
pub mod harness;
pub mod health;
pub mod hygiene;
pub mod loadtest;
pub mod local_response;
pub mod metrics;
pub mod notify;
pub mod pacer;
pub mod proxy;
pub mod reload;
pub mod resolve;
pub mod retry;
pub mod route;
pub mod server;
pub mod shared_budget;
pub mod state;
pub mod status_page;
pub mod throttle;
pub mod tls;
