//! The engine: (namespace, descriptors, hits, call) → the limits that apply → counter keys →
//! one storage call → a decision with, per descriptor, the most restrictive limit.
//!
//! [`Limiter::decide`] is three steps: [`plan()`](plan::plan) (pure: which limits, which counters, which
//! costs), one [`Storage::apply`], and [`decision::assemble`] (pure). What a call means is in
//! [`crate::call`]; the admission arithmetic is in [`crate::algorithm`]. The limiter reports
//! what happened to an [`Observer`] it is given (Prometheus is one, in [`crate::metrics`]).

mod decision;
mod explain;
mod plan;
mod ratelimit;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::algorithm::{CounterState, GroupOutcome, HoldRequest, Policy};
pub use crate::call::{Call, Code, Verdict};
use crate::clock::Clock;
use crate::limits::{EvalError, Limit, LimitId, LimitSet};
pub use crate::request::{Descriptor, Request};
use crate::storage::{CounterSnapshot, ListError, Page, PageRequest, Storage, StorageError};
use crate::throttle::{LOG_EVERY, Throttle};
pub use decision::{Decision, DescriptorStatus, LimitStatus, StorageTime};
pub use explain::{Explanation, LimitExplanation, NotApplied};
use plan::{Plan, plan};

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
    /// The request's descriptors (for labels taken from them).
    pub descriptors: &'a [Descriptor],
}

/// What the engine reports as it works. Every method defaults to doing nothing.
pub trait Observer: Send + Sync {
    /// A decision was made with the storage's answer (not for unknown namespaces or when the
    /// storage failed).
    fn decided(&self, _decided: &Decided<'_>) {}
    /// A refund (Envoy's `is_negative_hits`) of `amount` was applied to a counter of `limit`
    /// (it gave back at most that: usage never goes below zero).
    fn refunded(&self, _limit: &Limit, _amount: u64) {}
    /// A limit was skipped because one of its expressions failed on a request.
    fn evaluation_failed(&self, _namespace: &str, _limit: &Limit, _error: &EvalError) {}
    /// A limit's cost expression (`cost:`) failed on a request: its counters were charged the
    /// call's own cost instead.
    fn cost_failed(&self, _namespace: &str, _limit: &Limit, _why: &str) {}
    /// The storage answered (or failed) after `elapsed`.
    fn storage_called(&self, _elapsed: Duration) {}
    /// The storage failed.
    fn storage_failed(&self, _error: &StorageError) {}
}

/// One line per decision, at debug (`-v`): the call, the namespace, the verdict and the most
/// restrictive limit (what `/explain` details).
fn log_decision(namespace: &str, namespace_has_limits: bool, decision: &Decision) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let (limit, remaining) = match decision.limits.first() {
        Some(status) => (
            status.limit.name.as_deref().unwrap_or(""),
            Some(status.outcome.remaining),
        ),
        None => ("", None),
    };
    tracing::debug!(
        call = decision.call.name(),
        namespace,
        namespace_has_limits,
        verdict = ?decision.verdict,
        cost = decision.cost,
        limits = decision.limits.len(),
        limit,
        remaining,
        "decision"
    );
}

/// An observer that ignores everything.
pub struct Unobserved;

impl Observer for Unobserved {}

/// How reservations work (`--max-reservation-fraction`, `--max-reservation-ttl`,
/// `--disable-reservations`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reservations {
    /// Reserve and Commit are answered (else UNIMPLEMENTED, HTTP 501).
    pub enabled: bool,
    /// The hold on a counter is at most this fraction of its limit's `max_value` (at least 1).
    pub max_fraction: f64,
    /// No hold lives longer than this.
    pub max_ttl: Duration,
}

impl Default for Reservations {
    fn default() -> Self {
        Self {
            enabled: true,
            max_fraction: 0.5,
            max_ttl: Duration::from_secs(60),
        }
    }
}

/// What a call does with holds, besides its policy.
enum Holding<'a> {
    None,
    Reserve { ttl: Option<Duration> },
    Commit { id: &'a str },
}

pub struct Limiter {
    limits: ArcSwap<LimitSet>,
    reservations: Reservations,
    storage: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    observer: Arc<dyn Observer>,
    on_storage_error: OnStorageError,
    throttled: Throttled,
}

/// The limiter's log lines that a client can cause on every call.
struct Throttled {
    evaluation_failed: Throttle,
    cost_failed: Throttle,
    storage_failed: Throttle,
}

impl Limiter {
    pub fn new(limits: LimitSet, storage: Arc<dyn Storage>, clock: Arc<dyn Clock>) -> Self {
        Self {
            limits: ArcSwap::from_pointee(limits),
            storage,
            clock,
            observer: Arc::new(Unobserved),
            reservations: Reservations::default(),
            on_storage_error: OnStorageError::Error,
            throttled: Throttled {
                evaluation_failed: Throttle::new(LOG_EVERY),
                cost_failed: Throttle::new(LOG_EVERY),
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

    /// How reservations work.
    pub fn with_reservations(mut self, reservations: Reservations) -> Self {
        self.reservations = reservations;
        self
    }

    pub fn reservations(&self) -> Reservations {
        self.reservations
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

    /// Decides `request` as `call` (ShouldRateLimit, CheckRateLimit, Report; see
    /// [`Limiter::reserve`] and [`Limiter::commit`] for the reservations).
    pub async fn decide(&self, request: &Request, call: Call) -> Result<Decision, StorageError> {
        self.decide_holding(request, call, Holding::None).await
    }

    /// Kuadrant's Reserve: admitted iff every counter the request's limits select can take
    /// the amount (`request.hits`, taken as is) on top of its usage and holds; then each gets a
    /// hold of min(amount, max_value × max_fraction) that expires at the earliest of now +
    /// `ttl` (none or zero: no ttl of its own), the end of the counter's fixed window and now
    /// + the maximum ttl. An admitted decision carries the new reservation's id.
    pub async fn reserve(
        &self,
        request: &Request,
        ttl: Option<Duration>,
    ) -> Result<Decision, StorageError> {
        self.decide_holding(request, Call::Reserve, Holding::Reserve { ttl })
            .await
    }

    /// Kuadrant's Commit: charges the actual amount (`request.hits`, 0 charging nothing) to
    /// the counters that hold reservation `id` and releases their holds, in one step; when no
    /// counter the request selects holds it, charges every one, as a report.
    pub async fn commit(&self, request: &Request, id: &str) -> Result<Decision, StorageError> {
        self.decide_holding(request, Call::Commit, Holding::Commit { id })
            .await
    }

    async fn decide_holding(
        &self,
        request: &Request,
        call: Call,
        holding: Holding<'_>,
    ) -> Result<Decision, StorageError> {
        let descriptors = request.descriptors.len();
        if request.namespace.is_empty() {
            return Ok(Decision::unknown(call, descriptors));
        }
        let limits = self.limits.load();
        let mut plan = plan(&limits, request, call);
        for (limit, error) in &plan.failed {
            self.evaluation_failed(&request.namespace, limit, error);
        }
        for (limit, why) in &plan.cost_failed {
            self.cost_failed(&request.namespace, limit, why);
        }
        let now_ms = self.clock.now_ms();
        let reservation_id = match holding {
            Holding::None => None,
            Holding::Reserve { ttl } => {
                let id = new_reservation_id()?;
                let max_ttl = self.reservations.max_ttl;
                let ttl = ttl
                    .filter(|t| !t.is_zero())
                    .map_or(max_ttl, |t| t.min(max_ttl));
                let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                let fraction = self.reservations.max_fraction;
                plan.batch.hold = Some(HoldRequest {
                    id: id.clone(),
                    expires_at_ms: now_ms.saturating_add(ttl_ms),
                    amounts: (plan.batch.counters.iter())
                        .map(|c| c.algorithm.hold_for(request.hits, fraction))
                        .collect(),
                });
                Some(id)
            }
            Holding::Commit { id } => {
                plan.batch.hold = Some(HoldRequest {
                    id: id.to_string(),
                    ..HoldRequest::default()
                });
                None
            }
        };

        let (outcomes, storage_time) = match self.outcomes(&plan, now_ms).await {
            Ok(answer) => answer,
            Err(error) => {
                // (`--on-storage-error allow`: a reservation admitted without holds.)
                let mut decision = self.storage_failed(call, plan.cost, descriptors, error)?;
                if decision.verdict == Verdict::Admitted {
                    decision.reservation_id = reservation_id;
                }
                return Ok(decision);
            }
        };

        let namespace_has_limits = plan.namespace_has_limits;
        let groups = plan.batch.groups.iter().zip(&plan.contexts);
        for (group, context) in groups.filter(|(group, _)| group.policy == Policy::Refund) {
            for limit in &context.limits {
                self.observer.refunded(limit, group.cost);
            }
        }
        let mut decision = decision::assemble(call, descriptors, plan, outcomes);
        decision.storage_time = storage_time;
        if decision.verdict == Verdict::Admitted {
            decision.reservation_id = reservation_id;
        }
        log_decision(&request.namespace, namespace_has_limits, &decision);
        self.observer.decided(&Decided {
            namespace: &request.namespace,
            namespace_has_limits,
            decision: &decision,
            descriptors: &request.descriptors,
        });
        Ok(decision)
    }

    /// Why `request` gets the answer it gets: every limit of its namespace, whether it
    /// applies (and why not), and what a read-only check with the request's cost answers now.
    /// Changes nothing and reports nothing to the observer (an explanation is not a call).
    pub async fn explain(&self, request: &Request) -> Explanation {
        let limits = self.limits.load_full();
        let call = Call::CheckRateLimit;
        let plan = plan(&limits, request, call);
        let descriptors = request.descriptors.len();
        let decision = match self.outcomes(&plan, self.clock.now_ms()).await {
            Ok((outcomes, _)) => Ok(decision::assemble(call, descriptors, plan, outcomes)),
            Err(error) => Err(error),
        };
        explain::explain(&limits, request, decision)
    }

    /// The storage's answer to a plan: one outcome per group (every group admitted without
    /// asking the storage when no counter applies).
    async fn outcomes(
        &self,
        plan: &Plan<'_>,
        now_ms: u64,
    ) -> Result<(Vec<GroupOutcome>, Option<StorageTime>), StorageError> {
        if plan.batch.counters.is_empty() {
            // Nothing applies: every group is admitted without asking the storage (a commit
            // finds no hold to release).
            let outcomes = (plan.batch.groups.iter()).map(|group| GroupOutcome {
                admitted: group.policy != Policy::Commit,
                counters: Vec::new(),
                holds_full: false,
            });
            return Ok((outcomes.collect(), None));
        }
        let started = Instant::now();
        let result = self.storage.apply(&plan.batch, now_ms).await;
        let elapsed = started.elapsed();
        self.observer.storage_called(elapsed);
        result.map(|outcomes| (outcomes, Some(StorageTime { started, elapsed })))
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

    /// A cost expression that failed: the call's own cost was charged; reported, and logged.
    fn cost_failed(&self, namespace: &str, limit: &Limit, why: &str) {
        self.observer.cost_failed(namespace, limit, why);
        let cost = limit.cost.as_ref().map_or("", |c| c.source());
        let limit = limit.name.as_deref().unwrap_or("");
        match self.throttled.cost_failed.admit() {
            Some(skipped) => tracing::warn!(
                namespace,
                limit,
                cost,
                why,
                skipped,
                "cost expression failed on this request; charged the call's own hits (similar lines are throttled; ratekeeper_cost_errors counts them all)"
            ),
            None => tracing::debug!(
                namespace,
                limit,
                cost,
                why,
                "cost expression failed on this request; charged the call's own hits"
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
                // Only holds, and not a concurrency limit's: a counter that has no state yet.
                .filter(|(l, s)| {
                    !matches!(s.state, CounterState::Slots(_))
                        || l.algorithm.slot_lifetime_ms().is_some()
                })
                .collect(),
            next: snapshots.next,
        })
    }
}

/// A new reservation id: 128 random bits from the operating system, in hex (unguessable, so
/// no client can commit or release another's reservation).
fn new_reservation_id() -> Result<String, StorageError> {
    let mut bits = [0u8; 16];
    getrandom::fill(&mut bits).map_err(|e| {
        StorageError::Unavailable(format!("no randomness for a reservation id: {e}"))
    })?;
    Ok(bits.iter().map(|b| format!("{b:02x}")).collect())
}
