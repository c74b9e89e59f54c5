//! Prometheus metrics. Limitador's names and labels, so existing dashboards keep working
//! (`authorized_calls`, `authorized_hits`, `limited_calls`, `limitador_up`,
//! `datastore_partitioned`, `datastore_latency`), plus ratekeeper's own, prefixed
//! `ratekeeper_`. Per-limit metrics carry `limit_name` when `-l/--limit-name-in-labels` is set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

mod labels;

pub use labels::{
    LABELS_POLL, MAX_DEFAULT_LABELS, MAX_VALUES_PER_LABEL, MetricLabels, OTHER_VALUE, parse_labels,
    parse_labels_file, watch_labels_file,
};

use crate::call::Call;
use crate::limiter::{Decided, Observer};
use crate::limits::{EvalError, Limit};
use crate::status::RecentRefusals;
use crate::storage::StorageError;

pub const NAMESPACE: &str = "limitador_namespace";
pub const LIMIT_NAME: &str = "limit_name";

/// Latency buckets for the RPCs and the storage, in seconds: 50 µs to 1 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

const DESCRIPTIONS: [(&str, &str); 26] = [
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
        "ratekeeper_tokens_refunded",
        "Tokens given back by refunds (Envoy's is_negative_hits), by limit: what each refund carried (usage never goes below zero)",
    ),
    (
        "ratekeeper_tokens_overshoot",
        "Hits (tokens) charged beyond a limit, by limit",
    ),
    ("ratekeeper_active_counters", "Counters held by the storage"),
    ("ratekeeper_storage_errors", "Storage failures, by kind"),
    (
        "ratekeeper_storage_may_evict",
        "1 while the storage may evict live counters (Redis maxmemory-policy)",
    ),
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
        "ratekeeper_unknown_namespace_calls",
        "Calls to namespaces without limits (allowed), by namespace: the first 100 names, the rest `other`",
    ),
    (
        "ratekeeper_reservations",
        "Reserve calls by outcome (ok, over_limit, exhausted: a counter at its bound of holds)",
    ),
    (
        "ratekeeper_commits",
        "Commit calls, by whether they released a live hold (released: true, false)",
    ),
    (
        "ratekeeper_holds_expired",
        "Reservation holds found expired (never committed) and purged",
    ),
    (
        "ratekeeper_tokens_held",
        "Tokens on hold by reservations placed through this process, summed over counters, until committed or seen expired (sum over replicas)",
    ),
    (
        "ratekeeper_trace_spans_dropped",
        "Trace spans dropped because the export queue was full (--tracing-endpoint)",
    ),
    (
        "ratekeeper_cel_errors",
        "Limit expressions that failed on a request (the limit was skipped)",
    ),
    (
        "ratekeeper_cost_errors",
        "Cost expressions (`cost:`) that failed on a request (the call's own hits were charged)",
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

/// The engine's observer: Limitador's per-namespace and per-limit series, plus ratekeeper's
/// tokens charged and overshot. Series are resolved once per label set and kept here (the hot
/// path then only adds to atomics); namespaces that have no limits share the series labelled
/// `""`, so clients cannot create series. Calls to those are also counted by name, for the
/// first [`MAX_UNKNOWN_NAMESPACES`] names.
pub struct Prometheus {
    limit_name_in_labels: bool,
    namespaces: SeriesCache<NamespaceSeries>,
    unknown: UnknownNamespaces,
    /// Refusals per limit over the last minutes, for `/ui`.
    recent: Option<Arc<RecentRefusals>>,
    /// Custom labels on `authorized_calls`, `authorized_hits` and `limited_calls`.
    labels: Option<Arc<MetricLabels>>,
}

/// How many namespaces without limits get a series (and a warning) of their own.
pub const MAX_UNKNOWN_NAMESPACES: usize = 100;

/// The label value of the calls to namespaces without limits beyond the first
/// [`MAX_UNKNOWN_NAMESPACES`].
pub const OTHER_NAMESPACES: &str = "other";

/// Calls to namespaces without limits: allowed, but usually a misspelt namespace (Envoy's
/// `domain`) that disables limiting silently. The first [`MAX_UNKNOWN_NAMESPACES`] names each
/// get `ratekeeper_unknown_namespace_calls{namespace="<name>"}` and one warning; the others
/// share `{namespace="other"}`, and are not logged.
#[derive(Default)]
struct UnknownNamespaces {
    named: ArcSwap<HashMap<Box<str>, Counter>>,
    /// Taken only to add a name (at most [`MAX_UNKNOWN_NAMESPACES`] times).
    adding: Mutex<()>,
    other: OnceLock<Counter>,
}

impl UnknownNamespaces {
    fn called(&self, namespace: &str) {
        let named = self.named.load();
        if let Some(series) = named.get(namespace) {
            return series.increment(1);
        }
        if named.len() >= MAX_UNKNOWN_NAMESPACES {
            return self.other().increment(1);
        }
        drop(named);
        let _adding = self
            .adding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Another call may have added it, or filled the last place, meanwhile.
        let named = self.named.load();
        if let Some(series) = named.get(namespace) {
            return series.increment(1);
        }
        if named.len() >= MAX_UNKNOWN_NAMESPACES {
            return self.other().increment(1);
        }
        let series =
            counter!("ratekeeper_unknown_namespace_calls", "namespace" => namespace.to_string());
        series.increment(1);
        let mut map = HashMap::clone(&named);
        map.insert(namespace.into(), series);
        self.named.store(Arc::new(map));
        tracing::warn!(
            namespace,
            "a call to a namespace that has no limits was allowed: is it (Envoy's `domain`) \
             misspelt? Logged once per namespace (for the first {MAX_UNKNOWN_NAMESPACES}); \
             ratekeeper_unknown_namespace_calls counts every call"
        );
    }

    fn other(&self) -> &Counter {
        self.other.get_or_init(
            || counter!("ratekeeper_unknown_namespace_calls", "namespace" => OTHER_NAMESPACES),
        )
    }
}

impl Prometheus {
    /// Per-limit series carry `limit_name` when `limit_name_in_labels` (`-l`).
    pub fn new(limit_name_in_labels: bool) -> Self {
        Self {
            limit_name_in_labels,
            namespaces: SeriesCache::default(),
            unknown: UnknownNamespaces::default(),
            recent: None,
            labels: None,
        }
    }

    /// Adds the custom labels of `-L`/`--metric-labels-default` to Limitador's three call
    /// metrics.
    pub fn with_labels(mut self, labels: Option<Arc<MetricLabels>>) -> Self {
        self.labels = labels;
        self
    }

    /// Also records refusals per limit into `recent` (what `/ui` shows).
    pub fn recording_refusals(mut self, recent: Arc<RecentRefusals>) -> Self {
        self.recent = Some(recent);
        self
    }

    /// Runs `f` on the series of `limit` (in its namespace's cache).
    fn with_limit(&self, limit: &Limit, f: impl FnOnce(&LimitSeries)) {
        self.namespaces.with(
            &limit.namespace,
            || NamespaceSeries::new(&limit.namespace),
            |namespace| {
                let name = match (self.limit_name_in_labels, &limit.name) {
                    (true, Some(name)) => name.as_str(),
                    _ => "",
                };
                namespace.limits.with(
                    name,
                    || {
                        LimitSeries::new(
                            &limit.namespace,
                            self.limit_name_in_labels.then_some(name),
                        )
                    },
                    f,
                )
            },
        )
    }
}

/// Series resolved on first use, by one label value; reads take no lock.
struct SeriesCache<T> {
    map: ArcSwap<HashMap<Box<str>, Arc<T>>>,
}

impl<T> Default for SeriesCache<T> {
    fn default() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

impl<T> SeriesCache<T> {
    fn with(&self, key: &str, make: impl FnOnce() -> T, f: impl FnOnce(&T)) {
        if let Some(series) = self.map.load().get(key) {
            return f(series);
        }
        let made = Arc::new(make());
        self.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(key.into()).or_insert_with(|| made.clone());
            map
        });
        f(&made)
    }
}

/// A namespace's series, and its limits'.
struct NamespaceSeries {
    authorized_calls: Counter,
    authorized_hits: Counter,
    limited_calls: Counter,
    /// By limit name (`""` for all when names are not labels).
    limits: SeriesCache<LimitSeries>,
}

impl NamespaceSeries {
    fn new(namespace: &str) -> Self {
        let labels = [(NAMESPACE, namespace.to_string())];
        Self {
            authorized_calls: counter!("authorized_calls", &labels),
            authorized_hits: counter!("authorized_hits", &labels),
            limited_calls: counter!("limited_calls", &labels),
            limits: SeriesCache::default(),
        }
    }

    fn of(&self, which: CallSeries) -> &Counter {
        match which {
            CallSeries::AuthorizedCalls => &self.authorized_calls,
            CallSeries::AuthorizedHits => &self.authorized_hits,
            CallSeries::LimitedCalls => &self.limited_calls,
        }
    }
}

/// Limitador's three per-namespace call metrics.
#[derive(Debug, Clone, Copy)]
enum CallSeries {
    AuthorizedCalls,
    AuthorizedHits,
    LimitedCalls,
}

impl CallSeries {
    fn name(self) -> &'static str {
        match self {
            CallSeries::AuthorizedCalls => "authorized_calls",
            CallSeries::AuthorizedHits => "authorized_hits",
            CallSeries::LimitedCalls => "limited_calls",
        }
    }
}

/// A limit's series.
struct LimitSeries {
    charged: Counter,
    refunded: Counter,
    overshoot: Counter,
    limited_calls: Counter,
    cel_errors: Counter,
    cost_errors: Counter,
}

impl LimitSeries {
    fn new(namespace: &str, name: Option<&str>) -> Self {
        let mut labels = vec![(NAMESPACE, namespace.to_string())];
        if let Some(name) = name {
            labels.push((LIMIT_NAME, name.to_string()));
        }
        Self {
            charged: counter!("ratekeeper_tokens_charged", &labels),
            refunded: counter!("ratekeeper_tokens_refunded", &labels),
            overshoot: counter!("ratekeeper_tokens_overshoot", &labels),
            limited_calls: counter!("limited_calls", &labels),
            cel_errors: counter!("ratekeeper_cel_errors", &labels),
            cost_errors: counter!("ratekeeper_cost_errors", &labels),
        }
    }
}

impl Observer for Prometheus {
    /// Records a decision the way Limitador does (calls and hits per namespace, refusals per
    /// limit) and the tokens charged and overshot per limit. A charge for usage that already
    /// happened counts as authorized even when it goes past the limit (its excess is
    /// `ratekeeper_tokens_overshoot`); only refused calls are `limited_calls`.
    fn decided(&self, decided: &Decided<'_>) {
        let decision = decided.decision;
        let (mut placed, mut released, mut expired, mut expired_holds) = (0u64, 0u64, 0u64, 0u64);
        for status in &decision.limits {
            let holds = &status.outcome.holds;
            placed = placed.saturating_add(holds.placed);
            released = released.saturating_add(holds.released);
            expired = expired.saturating_add(holds.expired);
            expired_holds = expired_holds.saturating_add(holds.expired_holds);
        }
        if placed > 0 {
            gauge!("ratekeeper_tokens_held").increment(placed as f64);
        }
        if released.saturating_add(expired) > 0 {
            gauge!("ratekeeper_tokens_held").decrement(released.saturating_add(expired) as f64);
        }
        if expired_holds > 0 {
            counter!("ratekeeper_holds_expired").increment(expired_holds);
        }
        match decision.call {
            Call::Reserve => {
                let outcome = if decision.holds_full {
                    "exhausted"
                } else if decision.refused() {
                    "over_limit"
                } else {
                    "ok"
                };
                counter!("ratekeeper_reservations", "outcome" => outcome).increment(1);
                if decision.holds_full {
                    // Not a limit's refusal: not in `limited_calls`.
                    return;
                }
            }
            Call::Commit => {
                let released = if decision.released { "true" } else { "false" };
                counter!("ratekeeper_commits", "released" => released).increment(1);
            }
            _ => {}
        }
        for status in &decision.limits {
            let outcome = &status.outcome;
            if outcome.charged > 0 || outcome.overshoot > 0 {
                self.with_limit(&status.limit, |series| {
                    series.charged.increment(outcome.charged);
                    series.overshoot.increment(outcome.overshoot);
                });
            }
        }
        let call = decision.call;
        let custom = match &self.labels {
            Some(labels) => labels.of(decided.descriptors),
            None => Vec::new(),
        };
        if call.asks_admission()
            && decision.refused()
            && let Some(limiting) = decision.limiting()
        {
            if custom.is_empty() {
                self.with_limit(&limiting.limit, |series| series.limited_calls.increment(1));
            } else {
                let mut labels = vec![(NAMESPACE.to_string(), limiting.limit.namespace.clone())];
                if self.limit_name_in_labels {
                    let name = limiting.limit.name.clone().unwrap_or_default();
                    labels.push((LIMIT_NAME.to_string(), name));
                }
                labels.extend(custom);
                counter!("limited_calls", &labels).increment(1);
            }
            if let Some(recent) = &self.recent {
                recent.record(limiting.limit.key);
            }
            return;
        }
        // The others are counted per namespace.
        let namespace = if decided.namespace_has_limits {
            decided.namespace
        } else {
            self.unknown.called(decided.namespace);
            ""
        };
        // Which of Limitador's three series this call adds to, and how much.
        use CallSeries::{AuthorizedCalls, AuthorizedHits, LimitedCalls};
        let counts: &[(CallSeries, u64)] = if !call.asks_admission() {
            &[(AuthorizedHits, decision.cost)]
        } else if decision.refused() {
            &[(LimitedCalls, 1)]
        } else if call.charges() {
            &[(AuthorizedCalls, 1), (AuthorizedHits, decision.cost)]
        } else {
            &[(AuthorizedCalls, 1)]
        };
        if custom.is_empty() {
            let record = |series: &NamespaceSeries| {
                for &(which, amount) in counts {
                    series.of(which).increment(amount);
                }
            };
            self.namespaces
                .with(namespace, || NamespaceSeries::new(namespace), record);
        } else {
            let mut labels = vec![(NAMESPACE.to_string(), namespace.to_string())];
            labels.extend(custom);
            for &(which, amount) in counts {
                counter!(which.name(), &labels).increment(amount);
            }
        }
    }

    fn refunded(&self, limit: &Limit, amount: u64) {
        self.with_limit(limit, |series| series.refunded.increment(amount));
    }

    fn evaluation_failed(&self, _namespace: &str, limit: &Limit, _error: &EvalError) {
        self.with_limit(limit, |series| series.cel_errors.increment(1));
    }

    fn cost_failed(&self, _namespace: &str, limit: &Limit, _why: &str) {
        self.with_limit(limit, |series| series.cost_errors.increment(1));
    }

    fn storage_called(&self, elapsed: Duration) {
        if let Some(metrics) = RPC.get() {
            metrics.datastore_latency.record(elapsed.as_secs_f64());
        }
    }

    fn storage_failed(&self, error: &StorageError) {
        counter!("ratekeeper_storage_errors", "kind" => error.kind()).increment(1);
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

    pub fn name(self) -> &'static str {
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

/// 1 while the storage may evict live counters (Redis's `maxmemory-policy`).
pub fn storage_may_evict(evicts: bool) {
    gauge!("ratekeeper_storage_may_evict").set(if evicts { 1.0 } else { 0.0 });
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
