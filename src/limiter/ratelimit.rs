//! A decision for a domain of the envoyproxy/ratelimit format: its own plan (each request
//! descriptor matched in the descriptor tree, at most one limit each) and its own reading of
//! the storage's answer (shadow mode, quota mode, unlimited, the overall code), as
//! envoyproxy/ratelimit answers. Storage and arithmetic are shared with the Limitador format.
//!
//! Counting, by default: each descriptor is charged on its own, even when another is over
//! (each is a group with [`crate::algorithm::Policy::Charge`]; per-descriptor `hits_addend`
//! rules are those of [`Call::policy`]). With `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`, a
//! ShouldRateLimit whose descriptors carry no cost of their own is one all-or-nothing group:
//! a refused request counts on none of its descriptors.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use smallvec::SmallVec;

use super::decision::{Decision, DescriptorStatus, LimitStatus, most_restrictive_first};
use super::plan::{Plan, PlannedContext, add_counter, contexts, own_costs, weighs};
use crate::algorithm::{GroupOutcome, MAX_COUNT, Policy};
use crate::call::{Call, Verdict};
use crate::limits::{
    AlgorithmKind, Domain, Input, KeyValues, Limit, RatelimitSettings, tree_limit,
};
use crate::request::Request;
use crate::storage::{CounterKey, CounterRequest};

/// What the answer of a planned request needs besides the storage's outcomes.
pub struct Answer {
    pub settings: RatelimitSettings,
    /// One per request descriptor.
    pub rules: Vec<DescriptorRule>,
    /// `RESPONSE_DYNAMIC_METADATA`: the request's part of it (domain, descriptors, hits).
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// How one descriptor's status is read.
#[derive(Default)]
pub struct DescriptorRule {
    pub unlimited: bool,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    /// The matched node's `metadata` (for `dynamic_metadata`, when the descriptor passes).
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A descriptor's limit and counter, once matched.
struct Matched<'r> {
    limit: Arc<Limit>,
    values: KeyValues<'r>,
    name: Option<&'r str>,
}

/// The limit a descriptor's own `limit` asks for: its own counter (per descriptor keys and
/// window), never in shadow or quota mode, as envoyproxy/ratelimit treats it.
fn override_limit(domain: &Domain, request: &Request, i: usize) -> Option<Arc<Limit>> {
    let descriptor = &request.descriptors[i];
    let wanted = descriptor.limit?;
    let keys: Vec<&str> = descriptor.entries.iter().map(|(k, _)| k.as_str()).collect();
    let path = format!("override:{}", keys.join("."));
    let max_value = wanted.max_value.min(MAX_COUNT);
    let kind = AlgorithmKind::FixedWindow;
    Some(Arc::new(tree_limit(
        &domain.name,
        &path,
        None,
        max_value,
        wanted.seconds,
        kind,
    )))
}

/// Plans `request` against a domain of the envoyproxy/ratelimit format.
pub fn plan<'r>(domain: &Arc<Domain>, request: &'r Request, call: Call) -> Plan<'r> {
    let settings = domain.settings;
    let count = request.descriptors.len();
    let mut rules: Vec<DescriptorRule> = (0..count).map(|_| DescriptorRule::default()).collect();
    let mut matched: Vec<Option<Matched<'_>>> = Vec::with_capacity(count);
    let mut replacing: HashSet<&str> = HashSet::new();
    for (i, descriptor) in request.descriptors.iter().enumerate() {
        if let Some(limit) = override_limit(domain, request, i) {
            let values = descriptor
                .entries
                .iter()
                .map(|(_, v)| v.as_str().into())
                .collect();
            matched.push(Some(Matched {
                limit,
                values,
                name: None,
            }));
            continue;
        }
        let Some(found) = domain.find(&descriptor.entries) else {
            matched.push(None);
            continue;
        };
        let rule = found.rule;
        replacing.extend(rule.replaces.iter().map(String::as_str));
        rules[i] = DescriptorRule {
            unlimited: rule.limit.is_none(),
            shadow_mode: rule.shadow_mode,
            quota_mode: rule.quota_mode,
            metadata: settings
                .dynamic_metadata
                .then(|| rule.metadata.clone())
                .flatten(),
        };
        matched.push(rule.limit.as_ref().map(|limit| Matched {
            limit: limit.clone(),
            values: found.values,
            name: rule.name.as_deref(),
        }));
    }
    // `replaces` removes the named limits from the whole request: their descriptors answer
    // as if nothing matched (no quota mode, no metadata).
    for (slot, rule) in matched.iter_mut().zip(&mut rules) {
        if slot
            .as_ref()
            .is_some_and(|m| m.name.is_some_and(|n| replacing.contains(n)))
        {
            *slot = None;
            *rule = DescriptorRule::default();
        }
    }

    let whole = call.whole_request()
        || (settings.stop_increment_when_over
            && call == Call::ShouldRateLimit
            && !own_costs(request));
    let contexts = contexts(request, whole);

    let mut plan = Plan::empty(&request.namespace, contexts.len(), true);
    let mut shared: HashMap<CounterKey, usize> = HashMap::new();
    for (descriptors, context) in contexts {
        let mut group = plan.open_group(call, context);
        let weighs = weighs(group.policy, group.cost);
        let mut planned = PlannedContext {
            descriptors: descriptors.clone(),
            limits: SmallVec::new(),
            owners: SmallVec::new(),
        };
        for i in descriptors {
            let Some(found) = &matched[i] else {
                continue;
            };
            // A Report is usage of a request that ended: it takes no in-flight slot.
            if !call.selects_slots() && found.limit.algorithm.slot_lifetime_ms().is_some() {
                continue;
            }
            let key = CounterKey::new(found.limit.key, &found.values);
            let index = *shared.entry(key.clone()).or_insert_with(|| {
                plan.batch.counters.push(CounterRequest {
                    key,
                    algorithm: found.limit.algorithm,
                });
                plan.batch.counters.len() - 1
            });
            // A `cost:` sees the descriptor that matched as `descriptors[0]`.
            let input = Input::new(&request.descriptors[i..i + 1]);
            add_counter(
                &mut group,
                index,
                &found.limit,
                weighs.then_some(&input),
                &mut plan,
            );
            planned.limits.push(found.limit.clone());
            planned.owners.push(i);
        }
        plan.batch.groups.push(group);
        plan.contexts.push(planned);
    }
    plan.ratelimit = Some(Answer {
        settings,
        rules,
        metadata: settings.dynamic_metadata.then(|| request_metadata(request)),
    });
    plan
}

/// The request's part of `dynamic_metadata`, as envoyproxy/ratelimit writes it.
fn request_metadata(request: &Request) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{Value, json};
    let descriptors: Vec<Value> = (request.descriptors.iter())
        .map(|d| {
            let entries: Vec<String> = d.entries.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let mut out = serde_json::Map::new();
            out.insert("entries".into(), json!(entries));
            if let Some(limit) = d.limit {
                let unit = crate::limits::UNITS
                    .iter()
                    .find(|(_, s)| *s == limit.seconds)
                    .map_or("UNKNOWN".to_string(), |(n, _)| n.to_uppercase());
                let text = format!("requests_per_unit:{} unit:{unit}", limit.max_value);
                out.insert("limit".into(), json!(text));
            }
            if let Some(hits) = d.hits {
                out.insert("hitsAddend".into(), json!(hits));
            }
            Value::Object(out)
        })
        .collect();
    let mut map = serde_json::Map::new();
    map.insert("domain".into(), json!(request.namespace));
    map.insert("descriptors".into(), Value::Array(descriptors));
    if request.hits != 0 {
        map.insert("hitsAddend".into(), json!(request.hits));
    }
    map
}

/// Merges `from` into `into`: keys already there stay (mappings are merged key by key).
fn merge(
    into: &mut serde_json::Map<String, serde_json::Value>,
    from: &serde_json::Map<String, serde_json::Value>,
) {
    for (key, value) in from {
        match (into.get_mut(key), value) {
            (Some(serde_json::Value::Object(a)), serde_json::Value::Object(b)) => merge(a, b),
            (Some(_), _) => {}
            (None, _) => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Reads the storage's outcomes into a decision, as envoyproxy/ratelimit answers: each
/// descriptor by its own counter; shadow mode answers OK; the request is refused when a
/// descriptor outside quota mode is over, or when every quota-mode descriptor is; the global
/// `SHADOW_MODE` answers OK whatever the descriptors say.
pub fn assemble(
    call: Call,
    descriptors: usize,
    mut plan: Plan<'_>,
    outcomes: Vec<GroupOutcome>,
) -> Decision {
    let answer = plan.ratelimit.take();
    let mut decision = Decision::without_limits(call, Verdict::Admitted, plan.cost, descriptors);
    let groups = plan.batch.groups.iter().zip(plan.contexts);
    for ((group, context), outcome) in groups.zip(outcomes) {
        decision.holds_full |= outcome.holds_full;
        decision.released |= group.policy == Policy::Commit && outcome.admitted;
        let counters = context.limits.into_iter().zip(outcome.counters);
        for ((limit, counter), owner) in counters.zip(context.owners) {
            let status = LimitStatus {
                limit,
                outcome: counter,
            };
            let verdict = if counter.over {
                Verdict::of(group.policy, false)
            } else {
                Verdict::Admitted
            };
            if let Some(slot) = decision.statuses.get_mut(owner) {
                *slot = DescriptorStatus {
                    verdict,
                    limit: Some(status.clone()),
                    unlimited: false,
                };
            }
            decision.limits.push(status);
        }
    }
    decision.limits.sort_by(most_restrictive_first);
    let Some(answer) = answer else {
        return decision;
    };
    let (mut over, mut quota_over, mut quota_total) = (Verdict::Admitted, 0, 0);
    let mut metadata = answer.metadata;
    let mut passed = serde_json::Map::new();
    for (status, rule) in decision.statuses.iter_mut().zip(&answer.rules) {
        if rule.unlimited {
            status.unlimited = true;
            status.verdict = Verdict::Admitted;
            continue;
        }
        if rule.shadow_mode {
            status.verdict = Verdict::Admitted;
        }
        let quota = answer.settings.quota_mode || rule.quota_mode;
        quota_total += usize::from(quota);
        if status.verdict == Verdict::Admitted {
            if let Some(own) = &rule.metadata {
                merge(&mut passed, own);
            }
        } else if quota {
            quota_over += 1;
        } else {
            over = over.max(status.verdict);
        }
    }
    if over == Verdict::Admitted && quota_total > 0 && quota_over == quota_total {
        over = (decision.statuses.iter().map(|s| s.verdict))
            .max()
            .unwrap_or(Verdict::Refused);
    }
    decision.verdict = if answer.settings.shadow_mode {
        Verdict::Admitted
    } else {
        over
    };
    if let Some(metadata) = &mut metadata
        && !passed.is_empty()
    {
        metadata.insert("metadata".into(), serde_json::Value::Object(passed));
    }
    decision.dynamic_metadata = metadata;
    decision
}
