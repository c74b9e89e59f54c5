//! The engine: (namespace, descriptors, hits, call) → the limits that apply → counter keys →
//! one storage call → a decision with, per descriptor, the most restrictive limit.
//!
//! How a request is split into groups and what each costs is decided here and nowhere else
//! (DESIGN.md "Hits"); the admission arithmetic itself is in [`crate::algorithm`].

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use smallvec::SmallVec;

use crate::algorithm::{CounterOutcome, Group, Policy};
use crate::clock::Clock;
use crate::limits::{Input, KeyValues, Limit, LimitSet};
use crate::metrics::{self, Metrics};
pub use crate::request::{Descriptor, Request};
use crate::storage::{Batch, CounterKey, CounterRequest, CounterSnapshot, Storage, StorageError};

/// Which RPC is asking; it decides what the cost does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Envoy's ShouldRateLimit (and Limitador's HTTP `check_and_report`).
    ShouldRateLimit,
    /// Kuadrant's CheckRateLimit (and HTTP `check`): read-only.
    CheckRateLimit,
    /// Kuadrant's Report (and HTTP `report`): usage that happened, always counted.
    Report,
}

impl Call {
    pub const ALL: [Call; 3] = [Call::ShouldRateLimit, Call::CheckRateLimit, Call::Report];

    /// The gRPC method's name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Call::ShouldRateLimit => "ShouldRateLimit",
            Call::CheckRateLimit => "CheckRateLimit",
            Call::Report => "Report",
        }
    }
}

/// What a call gets when the storage fails (`--on-storage-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStorageError {
    /// The storage's error itself (gRPC UNAVAILABLE or RESOURCE_EXHAUSTED, HTTP 500).
    #[default]
    Error,
    /// OK, without limits.
    Allow,
    /// OVER_LIMIT, without limits.
    Deny,
}

impl std::str::FromStr for OnStorageError {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "error" => Ok(Self::Error),
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(format!(
                "unknown storage error mode {other:?} (error, allow or deny)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    OverLimit,
    /// The request cannot be judged (an empty namespace).
    Unknown,
}

/// One limit's state after this call.
#[derive(Clone)]
pub struct LimitStatus {
    pub limit: Arc<Limit>,
    pub outcome: CounterOutcome,
}

/// The answer for one request descriptor.
#[derive(Clone, Default)]
pub struct DescriptorStatus {
    pub over: bool,
    /// The most restrictive limit that applied to it, if any did.
    pub limit: Option<LimitStatus>,
}

pub struct Decision {
    /// `OverLimit` when a call was refused or a charge went past a limit.
    pub code: Code,
    /// A check or an all-or-nothing call was refused (as opposed to a charge for usage that
    /// already happened going past the limit: that usage was served).
    pub refused: bool,
    /// One per request descriptor, in order.
    pub statuses: Vec<DescriptorStatus>,
    /// Every limit the call touched, most restrictive first.
    pub limits: Vec<LimitStatus>,
}

impl Decision {
    /// The limit that refused the call or was charged past, the most restrictive first.
    pub fn limiting(&self) -> Option<&LimitStatus> {
        self.limits.iter().find(|l| l.outcome.over)
    }

    /// Milliseconds until this call's cost would be admitted: the longest wait among the limits
    /// that refused it. `None` when it is admitted now or never would be.
    pub fn retry_after_ms(&self) -> Option<u64> {
        let refusing = self.limits.iter().filter(|l| l.outcome.over);
        let mut longest = None;
        for status in refusing {
            let wait = status.outcome.retry_after_ms?;
            longest = Some(longest.unwrap_or(0).max(wait));
        }
        longest
    }
}

pub struct Limiter {
    limits: ArcSwap<LimitSet>,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    on_storage_error: OnStorageError,
    evaluation_errors: AtomicU64,
}

/// Orders limit statuses most restrictive first: over before not over, then least remaining.
fn most_restrictive_first(a: &LimitStatus, b: &LimitStatus) -> std::cmp::Ordering {
    b.outcome
        .over
        .cmp(&a.outcome.over)
        .then(a.outcome.remaining.cmp(&b.outcome.remaining))
}

impl Limiter {
    pub fn new(limits: LimitSet, storage: Arc<dyn Storage>, clock: Arc<dyn Clock>) -> Self {
        Self {
            limits: ArcSwap::from_pointee(limits),
            storage,
            clock,
            metrics: Metrics::default(),
            on_storage_error: OnStorageError::Error,
            evaluation_errors: AtomicU64::new(0),
        }
    }

    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// What a call gets when the storage fails: an error, or a fixed answer.
    pub fn on_storage_error(mut self, mode: OnStorageError) -> Self {
        self.on_storage_error = mode;
        self
    }

    pub fn limits(&self) -> Arc<LimitSet> {
        self.limits.load_full()
    }

    pub fn replace_limits(&self, limits: LimitSet) {
        self.limits.store(Arc::new(limits));
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// CEL evaluations that failed (other than a missing key) since start.
    pub fn evaluation_errors(&self) -> u64 {
        self.evaluation_errors.load(Ordering::Relaxed)
    }

    pub async fn decide(&self, request: &Request, call: Call) -> Result<Decision, StorageError> {
        if request.namespace.is_empty() {
            return Ok(Decision {
                code: Code::Unknown,
                refused: false,
                statuses: vec![DescriptorStatus::default(); request.descriptors.len()],
                limits: Vec::new(),
            });
        }
        let limits = self.limits.load();
        let (namespace, namespace_metrics) = limits.namespace_and_metrics(&request.namespace);
        let contexts = contexts(request, call);

        let mut batch = Batch {
            namespace: &request.namespace,
            counters: Vec::new(),
            groups: Vec::with_capacity(contexts.len()),
        };
        // Within one group every limit has its own counter; only several groups (Envoy's
        // per-descriptor costs) can name the same counter twice, and then it is one counter.
        let mut shared: Option<HashMap<CounterKey, usize>> =
            (contexts.len() > 1).then(HashMap::new);
        // The limit of each group's counter, group after group.
        let mut applied: SmallVec<[Arc<Limit>; 4]> = SmallVec::new();
        let mut values = KeyValues::new();
        for context in &contexts {
            let mut group = Group {
                policy: context.policy,
                cost: context.cost,
                counters: Vec::new(),
            };
            if let Some(namespace) = namespace {
                let descriptors = &request.descriptors[context.descriptors.clone()];
                let input = Input::new(descriptors);
                for limit in namespace.candidates(descriptors) {
                    if !self.evaluate(limit, &request.namespace, &input, &mut values) {
                        continue;
                    }
                    let key = CounterKey::new(limit.key, &values);
                    let counter = |key| CounterRequest {
                        key,
                        algorithm: limit.algorithm,
                    };
                    let index = match shared.as_mut() {
                        Some(shared) => match shared.get(&key) {
                            Some(&index) => index,
                            None => {
                                batch.counters.push(counter(key.clone()));
                                shared.insert(key, batch.counters.len() - 1);
                                batch.counters.len() - 1
                            }
                        },
                        None => {
                            batch.counters.push(counter(key));
                            batch.counters.len() - 1
                        }
                    };
                    group.counters.push(index);
                    applied.push(limit.clone());
                }
            }
            batch.groups.push(group);
        }

        let outcomes = if batch.counters.is_empty() {
            // Nothing applies: every group is admitted without asking the storage.
            batch
                .groups
                .iter()
                .map(|_| crate::algorithm::GroupOutcome {
                    admitted: true,
                    counters: Vec::new(),
                })
                .collect()
        } else {
            let started = Instant::now();
            let result = self.storage.apply(&batch, self.clock.now_ms()).await;
            metrics::datastore_latency(started.elapsed());
            match result {
                Ok(outcomes) => outcomes,
                Err(error) => return self.storage_failed(request, error),
            }
        };

        let mut statuses = vec![DescriptorStatus::default(); request.descriptors.len()];
        let mut all_limits = Vec::new();
        let mut over_limit = false;
        let mut refused = false;
        let mut applied = applied.into_iter();
        for ((context, outcome), group) in contexts.iter().zip(outcomes).zip(&batch.groups) {
            let mut group_statuses: SmallVec<[LimitStatus; 4]> = applied
                .by_ref()
                .take(group.counters.len())
                .zip(outcome.counters)
                .map(|(limit, outcome)| LimitStatus { limit, outcome })
                .collect();
            group_statuses.sort_by(most_restrictive_first);
            over_limit |= !outcome.admitted;
            refused |= !outcome.admitted && context.policy != Policy::Charge;
            for i in context.descriptors.clone() {
                statuses[i] = DescriptorStatus {
                    over: !outcome.admitted,
                    limit: group_statuses.first().cloned(),
                };
            }
            all_limits.extend(group_statuses);
        }
        all_limits.sort_by(most_restrictive_first);
        let decision = Decision {
            code: if over_limit {
                Code::OverLimit
            } else {
                Code::Ok
            },
            refused,
            statuses,
            limits: all_limits,
        };
        let cost = contexts
            .iter()
            .fold(0u64, |sum, context| sum.saturating_add(context.cost));
        self.metrics
            .decision(namespace_metrics, call, cost, &decision);
        Ok(decision)
    }

    /// Applies `--on-storage-error`: the error itself, or a fixed answer without limits.
    fn storage_failed(
        &self,
        request: &Request,
        error: StorageError,
    ) -> Result<Decision, StorageError> {
        metrics::storage_error(error.kind());
        let over = match self.on_storage_error {
            OnStorageError::Error => return Err(error),
            OnStorageError::Allow => false,
            OnStorageError::Deny => true,
        };
        tracing::warn!(%error, mode = ?self.on_storage_error, "storage failed; answering without it");
        Ok(Decision {
            code: if over { Code::OverLimit } else { Code::Ok },
            refused: over,
            statuses: vec![DescriptorStatus { over, limit: None }; request.descriptors.len()],
            limits: Vec::new(),
        })
    }

    /// The live counters of a namespace, with their limits.
    pub async fn counters(
        &self,
        namespace: &str,
    ) -> Result<Vec<(Arc<Limit>, CounterSnapshot)>, StorageError> {
        let limits = self.limits.load_full();
        let keys: Vec<_> = limits.namespace(namespace).iter().map(|l| l.key).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let snapshots = self
            .storage
            .counters(namespace, &keys, self.clock.now_ms())
            .await?;
        Ok(snapshots
            .into_iter()
            .filter_map(|s| limits.by_key(s.key.limit).map(|l| (l.clone(), s)))
            .collect())
    }

    /// Whether `limit` applies, its counter's values in `values`; a failed evaluation is
    /// logged and counted, and the limit skipped.
    fn evaluate<'a>(
        &self,
        limit: &Limit,
        namespace: &str,
        input: &Input<'a>,
        values: &mut KeyValues<'a>,
    ) -> bool {
        match limit.applies(input, values) {
            Ok(applies) => applies,
            Err(error) => {
                self.evaluation_errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.cel_error(limit);
                tracing::warn!(
                    namespace,
                    limit = limit.name.as_deref().unwrap_or(""),
                    ?error,
                    "limit skipped: its CEL expression failed on this request"
                );
                false
            }
        }
    }
}

/// One evaluation context: the descriptors CEL sees as `descriptors`, and its cost and policy.
struct Context {
    descriptors: Range<usize>,
    cost: u64,
    policy: Policy,
}

/// Splits a request into contexts (DESIGN.md "Hits"). When no descriptor carries its own cost,
/// the whole request is one context (Limitador); otherwise each descriptor is its own (Envoy).
fn contexts(request: &Request, call: Call) -> SmallVec<[Context; 1]> {
    let request_cost = request.hits.max(1);
    let per_descriptor = request.descriptors.iter().any(|d| d.hits.is_some());
    if !per_descriptor {
        let policy = match call {
            Call::ShouldRateLimit => Policy::AllOrNothing,
            Call::CheckRateLimit => Policy::CheckOnly,
            Call::Report => Policy::Charge,
        };
        return smallvec::smallvec![Context {
            descriptors: 0..request.descriptors.len(),
            cost: request_cost,
            policy,
        }];
    }
    request
        .descriptors
        .iter()
        .enumerate()
        .map(|(i, descriptor)| {
            let cost = descriptor.hits.unwrap_or(request_cost);
            let (policy, cost) = match call {
                // Envoy: a present 0 is a pure check; any other cost is usage to count.
                Call::ShouldRateLimit if cost == 0 => (Policy::CheckOnly, 0),
                Call::ShouldRateLimit => (Policy::Charge, cost),
                Call::CheckRateLimit => (Policy::CheckOnly, cost),
                Call::Report => (Policy::Charge, cost.max(1)),
            };
            Context {
                descriptors: i..i + 1,
                cost,
                policy,
            }
        })
        .collect()
}
