//! Step three of a decision, pure: the storage's outcomes, read back through the plan, become
//! one status per request descriptor and the list of limits the call touched.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::plan::Plan;
use crate::algorithm::{CounterOutcome, GroupOutcome, Policy};
use crate::call::{Call, Code, Verdict};
use crate::limits::Limit;

/// One limit's state after this call.
#[derive(Clone)]
pub struct LimitStatus {
    pub limit: Arc<Limit>,
    pub outcome: CounterOutcome,
}

/// The answer for one request descriptor.
#[derive(Clone, Default)]
pub struct DescriptorStatus {
    pub verdict: Verdict,
    /// The most restrictive limit that applied to it, if any did.
    pub limit: Option<LimitStatus>,
    /// An `unlimited` rate limit applied (envoyproxy/ratelimit format): OK, nothing counted.
    pub unlimited: bool,
}

pub struct Decision {
    pub call: Call,
    /// The worst verdict of the call's contexts.
    pub verdict: Verdict,
    /// What the call cost, summed over its contexts.
    pub cost: u64,
    /// One per request descriptor, in order.
    pub statuses: Vec<DescriptorStatus>,
    /// Every limit the call touched, most restrictive first.
    pub limits: Vec<LimitStatus>,
    /// Reserve, admitted: the reservation's id (also when nothing was held, for an amount of 0).
    pub reservation_id: Option<String>,
    /// Reserve: a counter carries the most holds it may ([`crate::algorithm::MAX_HOLDS`]);
    /// nothing was held (a bound, not a spent budget).
    pub holds_full: bool,
    /// Commit: a live hold of the reservation was found and released.
    pub released: bool,
    /// envoyproxy/ratelimit's `RESPONSE_DYNAMIC_METADATA`: what the answer's
    /// `dynamic_metadata` carries.
    pub dynamic_metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// When the storage was asked and how long it took (none when it was not asked).
    pub storage_time: Option<StorageTime>,
}

/// One storage call's timing, for a trace's storage span.
#[derive(Debug, Clone, Copy)]
pub struct StorageTime {
    pub started: Instant,
    pub elapsed: Duration,
}

impl Decision {
    /// The answer to a request that cannot be judged (an empty namespace).
    pub fn unknown(call: Call, descriptors: usize) -> Self {
        Self::without_limits(call, Verdict::Unknown, 0, descriptors)
    }

    /// The same verdict for every descriptor, no limit (`--on-storage-error allow|deny`).
    pub fn without_limits(call: Call, verdict: Verdict, cost: u64, descriptors: usize) -> Self {
        let status = DescriptorStatus {
            verdict,
            limit: None,
            unlimited: false,
        };
        Self {
            call,
            verdict,
            cost,
            statuses: vec![status; descriptors],
            limits: Vec::new(),
            reservation_id: None,
            holds_full: false,
            released: false,
            dynamic_metadata: None,
            storage_time: None,
        }
    }

    /// What the client is told.
    pub fn code(&self) -> Code {
        self.call.code(self.verdict)
    }

    /// What the client is told about one descriptor.
    pub fn code_of(&self, status: &DescriptorStatus) -> Code {
        self.call.code(status.verdict)
    }

    /// The call was refused: nothing it asked for was granted.
    pub fn refused(&self) -> bool {
        self.verdict == Verdict::Refused
    }

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

/// Orders limit statuses most restrictive first: over before not over, then least remaining.
pub(super) fn most_restrictive_first(a: &LimitStatus, b: &LimitStatus) -> std::cmp::Ordering {
    b.outcome
        .over
        .cmp(&a.outcome.over)
        .then(a.outcome.remaining.cmp(&b.outcome.remaining))
}

/// Reads the storage's outcomes (one per group of the plan, in order) into a decision.
pub fn assemble(
    call: Call,
    descriptors: usize,
    plan: Plan<'_>,
    outcomes: Vec<GroupOutcome>,
) -> Decision {
    if plan.ratelimit.is_some() {
        return super::ratelimit::assemble(call, descriptors, plan, outcomes);
    }
    let mut decision = Decision::without_limits(call, Verdict::Admitted, plan.cost, descriptors);
    let groups = plan.batch.groups.iter().zip(plan.contexts);
    for ((group, context), outcome) in groups.zip(outcomes) {
        let verdict = Verdict::of(group.policy, outcome.admitted);
        decision.holds_full |= outcome.holds_full;
        decision.released |= group.policy == Policy::Commit && outcome.admitted;
        decision.verdict = decision.verdict.max(verdict);
        let mut statuses: SmallVec<[LimitStatus; 4]> = context
            .limits
            .into_iter()
            .zip(outcome.counters)
            .map(|(limit, outcome)| LimitStatus { limit, outcome })
            .collect();
        statuses.sort_by(most_restrictive_first);
        for i in context.descriptors {
            decision.statuses[i] = DescriptorStatus {
                verdict,
                limit: statuses.first().cloned(),
                unlimited: false,
            };
        }
        decision.limits.extend(statuses);
    }
    decision.limits.sort_by(most_restrictive_first);
    decision
}
