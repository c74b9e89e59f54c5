//! ratekeeper: a rate-limit service for LLM APIs.
//!
//! Data flows one way — adapters → limiter → storage → algorithm — and each module is one
//! concept. The module graph has no cycles (each `use crate::…` points down this list):
//!
//! - [`rls`] and [`http`] — adapters: Envoy's and Kuadrant's gRPC services, Limitador's and
//!   ASM's HTTP APIs. They translate requests into [`limiter`] calls and decisions into answers,
//!   nothing else.
//! - [`call`] — what a call means: the policy of each evaluation context, the code a verdict
//!   is answered with, how it counts in the metrics. The one place that tells the calls apart.
//! - [`limiter`] — the engine. `decide` is three steps: plan (pure: which limits apply, which
//!   counters, which costs), one storage call, assemble (pure: one status per descriptor). It
//!   reports what it does to an [`limiter::Observer`]. `explain` runs the same steps read-only
//!   and tells, per limit, why it applies or not (`POST /explain`).
//! - [`limits`] — the limit model: YAML loading and validation, compiled CEL (with a native
//!   form for the common shapes) and a per-namespace index of what each limit requires. Nothing
//!   in it runs: [`reload`] wires a file watcher to a limiter, beside [`server`].
//! - [`storage`] — where counters live (memory, Redis with its Lua twin of the arithmetic),
//!   with their reservations' holds; each decides a whole request in one atomic step.
//! - [`algorithm`] — the arithmetic (fixed windows, token buckets, sliding windows, in-flight
//!   slots): pure integer functions shared by every storage.
//! - [`request`] — what a client asks (namespace, descriptors, costs) and its bounds;
//!   [`clock`] — time behind a trait tests can drive.
//! - [`metrics`] — the Prometheus observer and the adapters' per-RPC series; [`status`] feeds
//!   `/status`; [`proto`] is the generated gRPC code; [`telemetry`] is the OpenTelemetry
//!   spans of the gRPC calls (`--tracing-endpoint`), which [`rls`] fills in.
//! - [`server`] binds and runs the listeners (plain or TLS); [`reload`] is hot reload; [`xds`]
//!   takes envoyproxy/ratelimit's config from an xDS server and applies it as [`reload`] does;
//!   [`config`] is the CLI,
//!   imported only by the binary (`main.rs`), which parses it into the types above.
//!
//! The public surface is what the binary wires together and the black-box tests drive: the
//! modules above with their `pub` items. Internals (the CEL compiler and index, the plan and
//! assembly steps, the storages' modules) are private; their types are re-exported where a
//! caller needs them.

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
pub mod telemetry;
pub mod throttle;
pub mod xds;
