//! Step one of a decision, pure: which limits apply to a request, which counters that means,
//! and what each evaluation context costs. No clock, no storage: testable on its own.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::algorithm::{Group, MAX_COUNT, Policy};
use crate::call::{Call, Context};
use crate::limits::{EvalError, Input, KeyValues, Limit, LimitSet};
use crate::request::Request;
use crate::storage::{Batch, CounterKey, CounterRequest};

/// What a request asks of the storage, and what is needed to read the answer.
pub struct Plan<'r> {
    /// The storage's one call: every counter once, and one group per context.
    pub batch: Batch<'r>,
    /// One per group of `batch`, in the same order.
    pub contexts: SmallVec<[PlannedContext; 1]>,
    /// Limits skipped because an expression failed on this request.
    pub failed: SmallVec<[(Arc<Limit>, EvalError); 1]>,
    /// Limits whose cost expression failed on this request (their counters were charged the
    /// call's own cost), with the reason.
    pub cost_failed: SmallVec<[(Arc<Limit>, String); 1]>,
    /// Whether the namespace has limits at all.
    pub namespace_has_limits: bool,
    /// What the call costs, summed over its contexts, saturating at [`MAX_COUNT`].
    pub cost: u64,
    /// A domain of the envoyproxy/ratelimit format: how its answer is read
    /// ([`super::ratelimit`]).
    pub ratelimit: Option<super::ratelimit::Answer>,
}

impl<'r> Plan<'r> {
    /// The empty group of one context: its policy and cost (added to what the call costs,
    /// which saturates where counters do).
    pub(super) fn open_group(&mut self, call: Call, context: Context) -> Group {
        let (policy, cost) = call.policy(context);
        self.cost = self.cost.saturating_add(cost).min(MAX_COUNT);
        Group {
            policy,
            cost,
            counters: Vec::new(),
            costs: Vec::new(),
        }
    }

    /// A plan with nothing in it yet, for `groups` contexts.
    pub(super) fn empty(namespace: &'r str, groups: usize, namespace_has_limits: bool) -> Self {
        Plan {
            batch: Batch {
                namespace,
                hold: None,
                counters: Vec::new(),
                groups: Vec::with_capacity(groups),
            },
            contexts: SmallVec::with_capacity(groups),
            failed: SmallVec::new(),
            cost_failed: SmallVec::new(),
            namespace_has_limits,
            cost: 0,
            ratelimit: None,
        }
    }
}

/// One evaluation context: the descriptors it answers for and, for each counter of its group
/// (in the group's order), the limit that counter belongs to.
pub struct PlannedContext {
    pub descriptors: Range<usize>,
    pub limits: SmallVec<[Arc<Limit>; 4]>,
    /// envoyproxy/ratelimit format: for each counter, the descriptor it answers for (empty
    /// for the Limitador format, where every counter answers for the whole context).
    pub owners: SmallVec<[usize; 4]>,
}

/// Whether some descriptor carries its own cost or is a refund (Envoy's per-descriptor path).
pub(super) fn own_costs(request: &Request) -> bool {
    (request.descriptors.iter()).any(|d| d.hits.is_some() || d.refund)
}

/// Splits a request into contexts (DESIGN.md "Hits"): the whole request as one context
/// (Limitador), or each descriptor as its own (Envoy).
pub(super) fn contexts(request: &Request, whole: bool) -> SmallVec<[(Range<usize>, Context); 1]> {
    if whole {
        let whole = Context::Request { hits: request.hits };
        return smallvec::smallvec![(0..request.descriptors.len(), whole)];
    }
    request
        .descriptors
        .iter()
        .enumerate()
        .map(|(i, descriptor)| {
            let own = Context::Descriptor {
                hits: descriptor.hits,
                request_hits: request.hits,
                refund: descriptor.refund,
            };
            (i..i + 1, own)
        })
        .collect()
}

/// Whether a group's charge is weighed by its limits' `cost:`: charges of usage only (checks,
/// holds and refunds use the amount they carry; a cost of 0 charges nothing).
pub(super) fn weighs(policy: Policy, cost: u64) -> bool {
    cost > 0
        && matches!(
            policy,
            Policy::Charge | Policy::Commit | Policy::AllOrNothing
        )
}

/// Adds counter `index` of `limit` to `group`; with `weigh_on` (the request, when the group
/// [`weighs`]) and a `cost:` expression, at the cost the expression gives (a failure charges
/// the group's cost and is recorded in the plan).
pub(super) fn add_counter(
    group: &mut Group,
    index: usize,
    limit: &Arc<Limit>,
    weigh_on: Option<&Input<'_>>,
    plan: &mut Plan<'_>,
) {
    let own = match (weigh_on, &limit.cost) {
        (Some(input), Some(_)) => {
            let (own, failure) = limit.cost_of(input, group.cost);
            if let Some(why) = failure {
                plan.cost_failed.push((limit.clone(), why));
            }
            // The counters before this one cost what the call carries.
            group.costs.resize(group.counters.len(), group.cost);
            Some(own.min(MAX_COUNT))
        }
        _ => None,
    };
    group.counters.push(index);
    if own.is_some() || !group.costs.is_empty() {
        group.costs.push(own.unwrap_or(group.cost));
    }
}

/// Plans `request` as `call` against `limits`.
pub fn plan<'r>(limits: &LimitSet, request: &'r Request, call: Call) -> Plan<'r> {
    let namespace = limits.namespace_entry(&request.namespace);
    if let Some(tree) = namespace.and_then(|n| n.tree()) {
        return super::ratelimit::plan(tree, request, call);
    }
    // The whole request is one context when no descriptor carries its own cost, or the call
    // is a reservation's.
    let contexts = contexts(request, call.whole_request() || !own_costs(request));
    let mut plan = Plan::empty(&request.namespace, contexts.len(), namespace.is_some());
    // Within one group every limit has its own counter; only several groups (Envoy's
    // per-descriptor costs) can name the same counter twice, and then it is one counter.
    let mut shared: Option<HashMap<CounterKey, usize>> = (contexts.len() > 1).then(HashMap::new);
    let mut values = KeyValues::new();
    for (descriptors, context) in contexts {
        let mut group = plan.open_group(call, context);
        let weighs = weighs(group.policy, group.cost);
        let mut applied = SmallVec::new();
        if let Some(namespace) = namespace {
            let descriptors = &request.descriptors[descriptors.clone()];
            let input = Input::new(descriptors);
            for limit in namespace.candidates(descriptors) {
                if !call.selects_slots() && limit.algorithm.slot_lifetime_ms().is_some() {
                    continue;
                }
                match limit.applies(&input, &mut values) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(error) => {
                        plan.failed.push((limit.clone(), error));
                        continue;
                    }
                }
                let key = CounterKey::new(limit.key, &values);
                let counters = &mut plan.batch.counters;
                let mut add = |key| {
                    counters.push(CounterRequest {
                        key,
                        algorithm: limit.algorithm,
                    });
                    counters.len() - 1
                };
                let index = match shared.as_mut() {
                    Some(shared) => match shared.get(&key) {
                        Some(&index) => index,
                        None => {
                            let index = add(key.clone());
                            shared.insert(key, index);
                            index
                        }
                    },
                    None => add(key),
                };
                add_counter(
                    &mut group,
                    index,
                    limit,
                    weighs.then_some(&input),
                    &mut plan,
                );
                applied.push(limit.clone());
            }
        }
        plan.batch.groups.push(group);
        plan.contexts.push(PlannedContext {
            descriptors,
            limits: applied,
            owners: SmallVec::new(),
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithm::Policy;
    use crate::limits::parse_limits;
    use crate::request::Descriptor;

    const LIMITS: &str = r#"
- {name: per-user, namespace: ns, max_value: 10, seconds: 60, variables: ["descriptors[0].user"]}
- {name: everyone, namespace: ns, max_value: 100, seconds: 60}
- {name: broken, namespace: ns, max_value: 1, seconds: 60, conditions: ["descriptors[0].n > 3"]}
"#;

    fn limits() -> LimitSet {
        LimitSet::new(parse_limits("test", LIMITS).expect("valid limits"))
    }

    #[test]
    fn a_limitador_request_is_one_group_with_every_applicable_counter() {
        let limits = limits();
        let request = Request {
            namespace: "ns".into(),
            descriptors: vec![Descriptor::of(&[("user", "alice")])],
            hits: 0,
        };
        let plan = plan(&limits, &request, Call::ShouldRateLimit);
        assert_eq!(plan.batch.groups.len(), 1);
        let group = &plan.batch.groups[0];
        assert_eq!((group.policy, group.cost), (Policy::AllOrNothing, 1));
        assert_eq!(group.counters, [0, 1]);
        let names: Vec<_> = plan.contexts[0]
            .limits
            .iter()
            .map(|l| l.name.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(names, ["per-user", "everyone"]);
        assert_eq!(plan.batch.counters[0].key.values(), ["alice"]);
        assert!(plan.failed.is_empty());
    }

    #[test]
    fn per_descriptor_groups_share_a_counter_they_both_name() {
        let limits = limits();
        let mut charge = Descriptor::of(&[("user", "alice")]);
        charge.hits = Some(40);
        let mut check = Descriptor::of(&[("user", "alice")]);
        check.hits = Some(0);
        let request = Request {
            namespace: "ns".into(),
            descriptors: vec![charge, check],
            hits: 0,
        };
        let plan = plan(&limits, &request, Call::ShouldRateLimit);
        assert_eq!(plan.batch.counters.len(), 2, "two limits, one counter each");
        assert_eq!(plan.batch.groups[0].counters, plan.batch.groups[1].counters);
        assert_eq!(plan.batch.groups[0].policy, Policy::Charge);
        assert_eq!(plan.batch.groups[1].policy, Policy::CheckOnly);
        assert_eq!(plan.contexts[1].descriptors, 1..2);
        assert_eq!(plan.cost, 40);
    }

    #[test]
    fn a_failing_expression_is_reported_and_its_limit_skipped() {
        let limits = limits();
        let request = Request {
            namespace: "ns".into(),
            descriptors: vec![Descriptor::of(&[("user", "bob"), ("n", "7")])],
            hits: 3,
        };
        let plan = plan(&limits, &request, Call::Report);
        assert_eq!(plan.failed.len(), 1);
        assert_eq!(plan.failed[0].0.name.as_deref(), Some("broken"));
        assert_eq!(plan.contexts[0].limits.len(), 2);
        assert_eq!(plan.batch.groups[0].cost, 3);
    }

    #[test]
    fn charges_of_usage_are_weighed_by_each_limits_cost() {
        let limits = LimitSet::new(
            parse_limits(
                "test",
                r#"
- {name: weighed, namespace: ns, max_value: 100, seconds: 61, cost: "uint(descriptors[0].input) + 4u * uint(descriptors[0].output)"}
- {name: plain, namespace: ns, max_value: 100, seconds: 60}
"#,
            )
            .expect("valid limits"),
        );
        let request = |entries: &[(&str, &str)], hits| Request {
            namespace: "ns".into(),
            descriptors: vec![Descriptor::of(entries)],
            hits,
        };
        let usage = request(&[("input", "10"), ("output", "5")], 3);
        for call in [Call::Report, Call::ShouldRateLimit, Call::Commit] {
            let planned = plan(&limits, &usage, call);
            let group = &planned.batch.groups[0];
            assert_eq!(group.costs, [30, 3], "{call:?}");
            assert!(planned.cost_failed.is_empty());
        }
        // Checks and holds use the amount they carry.
        for call in [Call::CheckRateLimit, Call::Reserve] {
            let planned = plan(&limits, &usage, call);
            assert!(planned.batch.groups[0].costs.is_empty(), "{call:?}");
        }
        // A commit of 0 charges nothing, whatever the expression says.
        let zero = request(&[("input", "10"), ("output", "5")], 0);
        let planned = plan(&limits, &zero, Call::Commit);
        assert!(planned.batch.groups[0].costs.is_empty());
        // A failing expression charges the call's own cost, and says why.
        let broken = request(&[("input", "10")], 3);
        let planned = plan(&limits, &broken, Call::Report);
        assert_eq!(planned.batch.groups[0].costs, [3, 3]);
        assert_eq!(planned.cost_failed.len(), 1);
        assert!(
            planned.cost_failed[0].1.contains("output"),
            "{}",
            planned.cost_failed[0].1
        );
    }

    #[test]
    fn a_namespace_without_limits_plans_no_counter() {
        let limits = limits();
        let request = Request {
            namespace: "elsewhere".into(),
            descriptors: vec![Descriptor::of(&[("user", "alice")])],
            hits: 0,
        };
        let plan = plan(&limits, &request, Call::CheckRateLimit);
        assert!(!plan.namespace_has_limits);
        assert!(plan.batch.counters.is_empty());
        assert_eq!(plan.batch.groups.len(), 1);
    }
}
