//! Why a request gets the answer it gets, for `POST /explain`: every limit of the namespace,
//! whether it applies and, when not, which expression decided that ([`Limit::evaluate`], the
//! rule the decisions use), beside what a read-only check of the request would answer.

use std::sync::Arc;

use super::decision::Decision;
use crate::algorithm::CounterOutcome;
use crate::limits::{Input, KeyValues, Limit, LimitSet, Mismatch};
use crate::request::Request;
use crate::storage::StorageError;

pub struct Explanation {
    /// Whether the namespace has limits at all (without any, every call is allowed).
    pub namespace_has_limits: bool,
    /// Every limit of the namespace, in file order.
    pub limits: Vec<LimitExplanation>,
    /// What a read-only check (CheckRateLimit) with the request's cost answers now, or the
    /// storage's error.
    pub decision: Result<Decision, StorageError>,
}

pub struct LimitExplanation {
    pub limit: Arc<Limit>,
    /// The values of its variables (the counter's name) when it applies; why not otherwise.
    pub applies: Result<Vec<String>, NotApplied>,
    /// Its counter as the check saw it (when it applies and the storage answered).
    pub counter: Option<CounterOutcome>,
}

/// Why a limit does not apply ([`Mismatch`], owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotApplied {
    /// `condition_false`, `missing` or `failed`.
    pub kind: &'static str,
    /// `condition` or `variable`.
    pub role: &'static str,
    pub expression: String,
    pub message: String,
}

impl From<Mismatch<'_>> for NotApplied {
    fn from(mismatch: Mismatch<'_>) -> Self {
        let role = match &mismatch {
            Mismatch::ConditionFalse { .. } => "condition",
            Mismatch::Missing { role, .. } | Mismatch::Failed { role, .. } => role.name(),
        };
        Self {
            kind: mismatch.kind(),
            role,
            expression: mismatch.expression().source().to_string(),
            message: mismatch.message(),
        }
    }
}

/// Pure: the explanation of `request` (its descriptors as one evaluation context, as the HTTP
/// API sends them) against `limits`, given the check's `decision`.
pub fn explain(
    limits: &LimitSet,
    request: &Request,
    decision: Result<Decision, StorageError>,
) -> Explanation {
    let input = Input::new(&request.descriptors);
    let mut values = KeyValues::new();
    let namespace = limits.namespace(&request.namespace);
    // An envoyproxy/ratelimit-format domain: its tree, not expressions, decides; a limit
    // applies when the check reached it.
    let tree = (limits.namespace_entry(&request.namespace)).is_some_and(|n| n.tree().is_some());
    let reached = |limit: &Limit| {
        (decision.as_ref().ok()).is_some_and(|d| d.limits.iter().any(|s| s.limit.key == limit.key))
    };
    let explained = namespace
        .iter()
        .map(|limit| {
            let applies = match limit.evaluate(&input, &mut values) {
                _ if tree && !reached(limit) => Err(NotApplied {
                    kind: "no_match",
                    role: "descriptor",
                    expression: String::new(),
                    message: "no descriptor of the request reaches this limit in the \
                              descriptor tree"
                        .to_string(),
                }),
                Ok(()) => Ok(values.iter().map(|v| v.to_string()).collect()),
                Err(mismatch) => Err(NotApplied::from(mismatch)),
            };
            let counter = match (&applies, &decision) {
                (Ok(_), Ok(decision)) => decision
                    .limits
                    .iter()
                    .find(|status| status.limit.key == limit.key)
                    .map(|status| status.outcome),
                _ => None,
            };
            LimitExplanation {
                limit: limit.clone(),
                applies,
                counter,
            }
        })
        .collect();
    Explanation {
        namespace_has_limits: !namespace.is_empty(),
        limits: explained,
        decision,
    }
}
