//! The engine: (namespace, descriptors, hits, call) → the limits that apply → counter keys →
//! one storage call → a decision with, per descriptor, the most restrictive limit.
//!
//! [`Limiter::decide`] is three steps: [`plan()`](plan::plan) (pure: which limits, which counters, which
//! costs), one [`Storage::apply`], and [`decision::assemble`] (pure). What a call means is in
//! [`crate::call`]; the admission arithmetic is in [`crate::algorithm`]. The limiter reports
//! what happened to an [`Observer`] it is given (Prometheus is one, in [`crate::metrics`]).

mod decision;
mod plan;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::algorithm::GroupOutcome;
pub use crate::call::{Call, Code, Verdict};
use crate::clock::Clock;
use crate::limits::{EvalError, Limit, LimitId, LimitSet};
pub use crate::request::{Descriptor, Request};
use crate::storage::{CounterSnapshot, ListError, Page, PageRequest, Storage, StorageError};
use crate::throttle::{LOG_EVERY, Throttle};
pub use decision::{Decision, DescriptorStatus, LimitStatus};
use plan::plan;

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

impl FromStr for OnStorageError {
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

/// A decision as the observer sees it.
pub struct Decided<'a> {
    pub namespace: &'a str,
    /// Whether the namespace has limits (observers may pool the others).
    pub namespace_has_limits: bool,
    pub decision: &'a Decision,
}

/// What the engine reports as it works. Every method defaults to doing nothing.
pub trait Observer: Send + Sync {
    /// A decision was made with the storage's answer (not for unknown namespaces or when the
    /// storage failed).
    fn decided(&self, _decided: &Decided<'_>) {}
    /// A limit was skipped because one of its expressions failed on a request.
    fn evaluation_failed(&self, _namespace: &str, _limit: &Limit, _error: &EvalError) {}
    /// The storage answered (or failed) after `elapsed`.
    fn storage_called(&self, _elapsed: Duration) {}
    /// The storage failed.
    fn storage_failed(&self, _error: &StorageError) {}
}

/// An observer that ignores everything.
pub struct Unobserved;

impl Observer for Unobserved {}

pub struct Limiter {
    limits: ArcSwap<LimitSet>,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn Observer>,
    on_storage_error: OnStorageError,
    throttled: Throttled,
}

/// The limiter's log lines that a client can cause on every call.
struct Throttled {
    evaluation_failed: Throttle,
    storage_failed: Throttle,
}

impl Limiter {
    pub fn new(limits: LimitSet, storage: Arc<dyn Storage>, clock: Arc<dyn Clock>) -> Self {
        Self {
            limits: ArcSwap::from_pointee(limits),
            storage,
            clock,
            observer: Arc::new(Unobserved),
            on_storage_error: OnStorageError::Error,
            throttled: Throttled {
                evaluation_failed: Throttle::new(LOG_EVERY),
                storage_failed: Throttle::new(LOG_EVERY),
            },
        }
    }

    /// Reports what the engine does to `observer`.
    pub fn observed_by(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
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

    /// Puts `limits` in force. The counters of limits no longer loaded stay in the storage
    /// until [`Limiter::forget_unloaded`] frees them.
    pub fn replace_limits(&self, limits: LimitSet) {
        self.limits.store(Arc::new(limits));
    }

    /// Frees the counters of limits that are not in force (blocking: call it off the
    /// request path, after [`Limiter::replace_limits`]).
    pub fn forget_unloaded(&self) {
        let limits = self.limits.load();
        let loaded: HashSet<LimitId> = limits.iter().map(|limit| limit.key).collect();
        self.storage.forget_unloaded(&loaded);
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub async fn decide(&self, request: &Request, call: Call) -> Result<Decision, StorageError> {
        let descriptors = request.descriptors.len();
        if request.namespace.is_empty() {
            return Ok(Decision::unknown(call, descriptors));
        }
        let limits = self.limits.load();
        let plan = plan(&limits, request, call);
        for (limit, error) in &plan.failed {
            self.evaluation_failed(&request.namespace, limit, error);
        }

        let outcomes = if plan.batch.counters.is_empty() {
            // Nothing applies: every group is admitted without asking the storage.
            let admitted = GroupOutcome {
                admitted: true,
                counters: Vec::new(),
                holds_full: false,
            };
            vec![admitted; plan.batch.groups.len()]
        } else {
            let started = Instant::now();
            let result = self.storage.apply(&plan.batch, self.clock.now_ms()).await;
            self.observer.storage_called(started.elapsed());
            match result {
                Ok(outcomes) => outcomes,
                Err(error) => return self.storage_failed(call, plan.cost, descriptors, error),
            }
        };

        let namespace_has_limits = plan.namespace_has_limits;
        let decision = decision::assemble(call, descriptors, plan, outcomes);
        self.observer.decided(&Decided {
            namespace: &request.namespace,
            namespace_has_limits,
            decision: &decision,
        });
        Ok(decision)
    }

    /// Applies `--on-storage-error`: the error itself, or a fixed answer without limits.
    fn storage_failed(
        &self,
        call: Call,
        cost: u64,
        descriptors: usize,
        error: StorageError,
    ) -> Result<Decision, StorageError> {
        self.observer.storage_failed(&error);
        let verdict = match self.on_storage_error {
            OnStorageError::Error => return Err(error),
            OnStorageError::Allow => Verdict::Admitted,
            OnStorageError::Deny => Verdict::Refused,
        };
        if let Some(skipped) = self.throttled.storage_failed.admit() {
            tracing::warn!(%error, mode = ?self.on_storage_error, skipped,
                "storage failed; answering without it (similar lines are throttled)");
        }
        Ok(Decision::without_limits(call, verdict, cost, descriptors))
    }

    /// A limit skipped because an expression failed: reported, and logged.
    fn evaluation_failed(&self, namespace: &str, limit: &Limit, error: &EvalError) {
        self.observer.evaluation_failed(namespace, limit, error);
        let limit = limit.name.as_deref().unwrap_or("");
        match self.throttled.evaluation_failed.admit() {
            Some(skipped) => tracing::warn!(
                namespace,
                limit,
                ?error,
                skipped,
                "limit skipped: its CEL expression failed on this request (similar lines are throttled; ratekeeper_cel_errors counts them all)"
            ),
            None => tracing::debug!(
                namespace,
                limit,
                ?error,
                "limit skipped: its CEL expression failed on this request"
            ),
        }
    }

    /// One page of the live counters of a namespace, with their limits (see
    /// [`Page`]: bounded work, not atomic). The page's limit is taken within
    /// `1..=PageRequest::MAX_LIMIT`.
    pub async fn counters(
        &self,
        namespace: &str,
        page: PageRequest<'_>,
    ) -> Result<Page<(Arc<Limit>, CounterSnapshot)>, ListError> {
        let limits = self.limits.load_full();
        let keys: Vec<_> = limits.namespace(namespace).iter().map(|l| l.key).collect();
        if keys.is_empty() {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        }
        let page = PageRequest {
            limit: page.limit.clamp(1, PageRequest::MAX_LIMIT),
            ..page
        };
        let snapshots = self
            .storage
            .counters(namespace, &keys, page, self.clock.now_ms())
            .await?;
        Ok(Page {
            items: snapshots
                .items
                .into_iter()
                .filter_map(|s| limits.by_key(s.key.limit).map(|l| (l.clone(), s)))
                .collect(),
            next: snapshots.next,
        })
    }
}
