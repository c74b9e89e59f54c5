//! Prometheus metrics. Limitador's names and labels, so existing dashboards keep working
//! (`authorized_calls`, `authorized_hits`, `limited_calls`, `limitador_up`,
//! `datastore_partitioned`, `datastore_latency`), plus ratekeeper's own, prefixed
//! `ratekeeper_`. Per-limit metrics carry `limit_name` when `-l/--limit-name-in-labels` is set.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::limiter::{Call, Decision};
use crate::limits::Limit;

pub const NAMESPACE: &str = "limitador_namespace";
pub const LIMIT_NAME: &str = "limit_name";

/// Latency buckets for the RPCs and the storage, in seconds: 50 µs to 1 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

const DESCRIPTIONS: [(&str, &str); 17] = [
    ("limitador_up", "Limitador is running"),
    (
        "datastore_partitioned",
        "1 while the counter storage cannot be reached",
    ),
    (
        "datastore_latency",
        "Latency of one storage decision, in seconds",
    ),
    (
        "authorized_calls",
        "Calls admitted (ShouldRateLimit, CheckRateLimit, HTTP check)",
    ),
    ("authorized_hits", "Hits admitted or reported"),
    ("limited_calls", "Calls refused because a limit was reached"),
    (
        "ratekeeper_rpc_duration_seconds",
        "Time to answer one call, by RPC",
    ),
    (
        "ratekeeper_rpc_calls",
        "Calls by RPC and outcome (ok, over_limit, unknown, invalid, error)",
    ),
    (
        "ratekeeper_tokens_charged",
        "Hits (tokens) added to counters, by limit",
    ),
    (
        "ratekeeper_tokens_overshoot",
        "Hits (tokens) charged beyond a limit, by limit",
    ),
    ("ratekeeper_active_counters", "Counters held by the storage"),
    ("ratekeeper_storage_errors", "Storage failures, by kind"),
    (
        "ratekeeper_limits_reloads",
        "Limits file reloads, by result (ok, failed)",
    ),
    (
        "ratekeeper_limits_config_version",
        "Version of the limits in force (0 at start, +1 per reload)",
    ),
    ("ratekeeper_limits_loaded", "Limits in force"),
    (
        "ratekeeper_limits_config_error",
        "1 while the limits file on disk could not be applied",
    ),
    (
        "ratekeeper_cel_errors",
        "Limit expressions that failed on a request (the limit was skipped)",
    ),
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&LATENCY_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            for (name, help) in DESCRIPTIONS {
                metrics::describe_counter!(name, help);
            }
            gauge!("limitador_up").set(1.0);
            gauge!("datastore_partitioned").set(0.0);
            let _ = RPC.set(RpcMetrics::new());
            Ok(handle)
        })
        .clone()
}

/// What the engine and adapters record; knows whether `limit_name` is a label.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    pub limit_name_in_labels: bool,
}

/// A namespace's series, resolved once (the hot path then only adds to atomics). Namespaces
/// that have no limits share the series labelled `""`, so clients cannot create series.
pub struct NamespaceMetrics {
    authorized_calls: Counter,
    authorized_hits: Counter,
    limited_calls: Counter,
}

impl NamespaceMetrics {
    pub fn new(namespace: &str) -> Self {
        let labels = [(NAMESPACE, namespace.to_string())];
        Self {
            authorized_calls: counter!("authorized_calls", &labels),
            authorized_hits: counter!("authorized_hits", &labels),
            limited_calls: counter!("limited_calls", &labels),
        }
    }
}

/// A limit's series, resolved once.
pub struct LimitMetrics {
    charged: Counter,
    overshoot: Counter,
    limited_calls: Counter,
    cel_errors: Counter,
}

impl LimitMetrics {
    pub fn new(limit: &Limit, limit_name_in_labels: bool) -> Self {
        let mut labels = vec![(NAMESPACE, limit.namespace.clone())];
        if limit_name_in_labels {
            labels.push((LIMIT_NAME, limit.name.clone().unwrap_or_default()));
        }
        Self {
            charged: counter!("ratekeeper_tokens_charged", &labels),
            overshoot: counter!("ratekeeper_tokens_overshoot", &labels),
            limited_calls: counter!("limited_calls", &labels),
            cel_errors: counter!("ratekeeper_cel_errors", &labels),
        }
    }
}

impl Metrics {
    fn of<'a>(&self, limit: &'a Limit) -> &'a LimitMetrics {
        limit.metrics(self.limit_name_in_labels)
    }

    /// Records a decision the way Limitador does (calls and hits per namespace, refusals per
    /// limit) and the tokens charged and overshot per limit. A charge for usage that already
    /// happened counts as authorized even when it goes past the limit (its excess is
    /// `ratekeeper_tokens_overshoot`); only refused checks are `limited_calls`.
    pub fn decision(
        &self,
        namespace: &NamespaceMetrics,
        call: Call,
        cost: u64,
        decision: &Decision,
    ) {
        for status in &decision.limits {
            let outcome = &status.outcome;
            if outcome.charged > 0 {
                self.of(&status.limit).charged.increment(outcome.charged);
            }
            if outcome.overshoot > 0 {
                self.of(&status.limit)
                    .overshoot
                    .increment(outcome.overshoot);
            }
        }
        if call == Call::Report {
            namespace.authorized_hits.increment(cost);
        } else if decision.refused {
            match decision.limiting() {
                Some(limiting) => self.of(&limiting.limit).limited_calls.increment(1),
                None => namespace.limited_calls.increment(1),
            }
        } else {
            namespace.authorized_calls.increment(1);
            if call == Call::ShouldRateLimit {
                namespace.authorized_hits.increment(cost);
            }
        }
    }

    pub fn cel_error(&self, limit: &Limit) {
        self.of(limit).cel_errors.increment(1);
    }
}

/// Folds recorded histogram samples into their buckets, so they do not pile up in memory
/// between scrapes (or forever, without a scraper). Called every second by the server.
pub fn upkeep() {
    if let Ok(handle) = install() {
        handle.run_upkeep();
    }
}

/// How a call was answered, as the `outcome` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    OverLimit,
    Unknown,
    Invalid,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::OverLimit,
        Outcome::Unknown,
        Outcome::Invalid,
        Outcome::Error,
    ];

    fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::OverLimit => "over_limit",
            Outcome::Unknown => "unknown",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

/// Per-RPC series, resolved when the recorder is installed; indexed by `Call` and `Outcome`
/// in the order of their `ALL`.
struct RpcMetrics {
    calls: [[Counter; Outcome::ALL.len()]; Call::ALL.len()],
    duration: [Histogram; Call::ALL.len()],
    datastore_latency: Histogram,
}

static RPC: OnceLock<RpcMetrics> = OnceLock::new();

impl RpcMetrics {
    fn new() -> Self {
        Self {
            calls: Call::ALL.map(|call| {
                Outcome::ALL.map(|outcome| {
                    counter!("ratekeeper_rpc_calls", "rpc" => call.name(), "outcome" => outcome.name())
                })
            }),
            duration: Call::ALL
                .map(|call| histogram!("ratekeeper_rpc_duration_seconds", "rpc" => call.name())),
            datastore_latency: histogram!("datastore_latency"),
        }
    }
}

/// Records one answered call.
pub fn rpc(call: Call, outcome: Outcome, elapsed: Duration) {
    let Some(metrics) = RPC.get() else { return };
    let c = call as usize;
    metrics.calls[c][outcome as usize].increment(1);
    metrics.duration[c].record(elapsed.as_secs_f64());
}

pub fn datastore_latency(elapsed: Duration) {
    if let Some(metrics) = RPC.get() {
        metrics.datastore_latency.record(elapsed.as_secs_f64());
    }
}

pub fn storage_error(kind: &'static str) {
    counter!("ratekeeper_storage_errors", "kind" => kind).increment(1);
}

pub fn storage_reachable(reachable: bool) {
    gauge!("datastore_partitioned").set(if reachable { 0.0 } else { 1.0 });
}

pub fn active_counters(count: usize) {
    gauge!("ratekeeper_active_counters").set(count as f64);
}

pub fn limits_applied(version: u64, loaded: usize) {
    gauge!("ratekeeper_limits_config_version").set(version as f64);
    gauge!("ratekeeper_limits_loaded").set(loaded as f64);
    gauge!("ratekeeper_limits_config_error").set(0.0);
}

pub fn limits_reload(ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!("ratekeeper_limits_reloads", "result" => result).increment(1);
    if !ok {
        gauge!("ratekeeper_limits_config_error").set(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_indexed_in_declaration_order() {
        for (i, call) in Call::ALL.into_iter().enumerate() {
            assert_eq!(call as usize, i, "{call:?}");
        }
        for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, i, "{outcome:?}");
        }
    }
}
