//! ratekeeper: a rate-limit service for LLM APIs.
//!
//! Data flows one way, each module one concept:
//!
//! - [`rls`] and [`http`] — adapters: Envoy's and Kuadrant's gRPC services, Limitador's and
//!   ASM's HTTP APIs. They translate requests into [`limiter`] calls and decisions into answers.
//! - [`request`] — what a client asks (namespace, descriptors, costs) and its bounds.
//! - [`limiter`] — the engine: which limits apply (CEL over descriptors), which counters that
//!   means, what each call costs, and one storage call per request.
//! - [`storage`] — where counters live ([`storage::memory`], [`storage::redis`] with its Lua
//!   twin of the arithmetic); each decides a whole request in one atomic step.
//! - [`algorithm`] — the arithmetic (fixed windows, token buckets, sliding windows), pure
//!   integer functions shared by every storage.
//! - [`limits`] — the limit model, YAML loading and validation, compiled CEL (with a native
//!   form for the common shapes) and a per-namespace index of what each limit requires.
//! - [`metrics`] holds the Prometheus series; [`server`] binds and runs the listeners;
//!   [`config`] is the CLI; [`clock`] is time behind a trait tests can drive; [`status`] feeds
//!   `/status`; [`proto`] is the generated gRPC code.

pub mod algorithm;
pub mod call;
pub mod clock;
pub mod config;
pub mod http;
pub mod limiter;
pub mod limits;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod request;
pub mod rls;
pub mod server;
pub mod status;
pub mod storage;
