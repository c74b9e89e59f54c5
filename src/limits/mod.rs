//! Limits: the model, loading and validating Limitador-format YAML, CEL matching, and the
//! per-namespace index the limiter reads.

mod asm;
mod expression;
mod file;
mod index;
mod native;
mod ratelimit;
mod source;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use cel::Value;

use crate::algorithm::{Algorithm, Calendar, Concurrency, FixedWindow, SlidingWindow, TokenBucket};
use crate::request::Descriptor;
pub use crate::storage::LimitId;
use index::LimitIndex;
use serde::Serialize;

pub use asm::{AsmConfigError, RATE_LIMIT_CONFIG, parse_rate_limit_config};
pub use expression::{EvalError, Expression, Input};
pub use file::{LimitsError, digest, load_bytes, load_file, parse_limits};
pub use ratelimit::{Domain, Found, RatelimitSettings, Rule, UNITS, tree_limit};
pub use source::{Source, load_path, load_source, read_source};

/// The values of a limit's variables for one request; most limits have one or two.
pub type KeyValues<'a> = smallvec::SmallVec<[Cow<'a, str>; 4]>;

/// One limit, ready to evaluate.
pub struct Limit {
    pub id: Option<String>,
    pub name: Option<String>,
    pub namespace: String,
    pub max_value: u64,
    pub seconds: u64,
    pub conditions: Vec<Expression>,
    pub variables: Vec<Expression>,
    /// What the YAML asked for, and the arithmetic built from it.
    pub kind: AlgorithmKind,
    pub algorithm: Algorithm,
    /// What a charge of usage costs on this limit's counters (`cost:`), when not the call's
    /// own cost.
    pub cost: Option<Expression>,
    /// Stable fingerprint of the limit's identity; part of every counter key.
    pub key: LimitId,
    /// The CEL value `limit`, built once; `None` when no expression reads it.
    cel_self: Option<Value>,
}

impl Limit {
    /// Does this limit apply to the request in `input`? When it does, `values` holds the
    /// variables' values that name its counter (it is cleared first); `Ok(false)` means it
    /// does not apply (a condition is false or reads a key the request lacks).
    pub fn applies<'a>(
        &self,
        input: &Input<'a>,
        values: &mut KeyValues<'a>,
    ) -> Result<bool, EvalError> {
        match self.evaluate(input, values) {
            Ok(()) => Ok(true),
            Err(Mismatch::Failed { error, .. }) => Err(error),
            Err(Mismatch::ConditionFalse { .. } | Mismatch::Missing { .. }) => Ok(false),
        }
    }

    /// The rule of when a limit applies, with the reason when it does not: every condition,
    /// in order, must be true and every variable must resolve. The first expression that
    /// does not is the reason ([`Limit::applies`] is this without the reason). `values` holds
    /// the variables' values when it applies (it is cleared first).
    pub fn evaluate<'a, 'l>(
        &'l self,
        input: &Input<'a>,
        values: &mut KeyValues<'a>,
    ) -> Result<(), Mismatch<'l>> {
        values.clear();
        let limit = self.cel_self.as_ref();
        for condition in &self.conditions {
            let role = Role::Condition;
            match condition.is_true(input, limit) {
                Ok(true) => {}
                Ok(false) => return Err(Mismatch::ConditionFalse { condition }),
                Err(EvalError::Missing) => {
                    return Err(Mismatch::Missing {
                        role,
                        expression: condition,
                    });
                }
                Err(error) => {
                    return Err(Mismatch::Failed {
                        role,
                        expression: condition,
                        error,
                    });
                }
            }
        }
        for variable in &self.variables {
            let role = Role::Variable;
            match variable.to_key_part(input, limit) {
                Ok(v) => values.push(v),
                Err(EvalError::Missing) => {
                    return Err(Mismatch::Missing {
                        role,
                        expression: variable,
                    });
                }
                Err(error) => {
                    return Err(Mismatch::Failed {
                        role,
                        expression: variable,
                        error,
                    });
                }
            }
        }
        Ok(())
    }

    /// What a charge of `hits` costs on this limit's counters, for the request in `input`:
    /// `hits` without a `cost:` expression; the expression's value with one, or, when it
    /// fails, `hits` and the reason (a charge is never lost).
    pub fn cost_of(&self, input: &Input<'_>, hits: u64) -> (u64, Option<String>) {
        match &self.cost {
            None => (hits, None),
            Some(cost) => match cost.cost(input, self.cel_self.as_ref(), hits) {
                Ok(cost) => (cost, None),
                Err(why) => (hits, Some(why)),
            },
        }
    }

    /// Sets the cost expression (not part of the identity: repricing keeps the counters).
    pub(crate) fn with_cost(mut self, cost: Option<Expression>) -> Self {
        if cost.as_ref().is_some_and(Expression::reads_limit) && self.cel_self.is_none() {
            self.cel_self = Some(expression::limit_value(
                self.name.as_deref(),
                self.id.as_deref(),
            ));
        }
        self.cost = cost;
        self
    }

    /// The shape Limitador's HTTP API and `--validate` show.
    pub fn view(&self) -> LimitView<'_> {
        let (algorithm, refill_tokens) = match self.kind {
            AlgorithmKind::FixedWindow | AlgorithmKind::Calendar(_) => (None, None),
            AlgorithmKind::TokenBucket { refill_tokens } => (Some("token_bucket"), refill_tokens),
            AlgorithmKind::SlidingWindow => (Some("sliding_window"), None),
            AlgorithmKind::Concurrency => (Some("concurrency"), None),
        };
        LimitView {
            algorithm,
            refill_tokens,
            id: self.id.as_deref(),
            namespace: &self.namespace,
            max_value: self.max_value,
            seconds: self.seconds,
            name: self.name.as_deref(),
            conditions: self.conditions.iter().map(Expression::source).collect(),
            variables: self.variables.iter().map(Expression::source).collect(),
            calendar: self.calendar().map(|c| c.period.name()),
            timezone: self.calendar().map(|c| c.zone.name()),
            cost: self.cost.as_ref().map(Expression::source),
        }
    }

    /// The calendar period of a calendar quota.
    pub fn calendar(&self) -> Option<Calendar> {
        match self.kind {
            AlgorithmKind::Calendar(calendar) => Some(calendar),
            _ => None,
        }
    }
}

/// Which list of a limit an expression is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Condition,
    Variable,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Condition => "condition",
            Role::Variable => "variable",
        }
    }
}

/// Why a limit does not apply to a request ([`Limit::evaluate`]).
pub enum Mismatch<'l> {
    /// A condition is false.
    ConditionFalse { condition: &'l Expression },
    /// An expression reads a key or an index the request does not have.
    Missing {
        role: Role,
        expression: &'l Expression,
    },
    /// An expression failed (wrong type, no such function...): the limit is skipped, and the
    /// failure logged and counted.
    Failed {
        role: Role,
        expression: &'l Expression,
        error: EvalError,
    },
}

impl Mismatch<'_> {
    /// A short name for the reason: `condition_false`, `missing` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Mismatch::ConditionFalse { .. } => "condition_false",
            Mismatch::Missing { .. } => "missing",
            Mismatch::Failed { .. } => "failed",
        }
    }

    /// The expression that decided it.
    pub fn expression(&self) -> &Expression {
        match self {
            Mismatch::ConditionFalse { condition } => condition,
            Mismatch::Missing { expression, .. } | Mismatch::Failed { expression, .. } => {
                expression
            }
        }
    }

    /// The reason in a sentence.
    pub fn message(&self) -> String {
        match self {
            Mismatch::ConditionFalse { condition } => {
                format!("condition `{}` is false", condition.source())
            }
            Mismatch::Missing { role, expression } => format!(
                "{} `{}` reads a key or index this request does not have",
                role.name(),
                expression.source()
            ),
            Mismatch::Failed {
                role,
                expression,
                error,
            } => {
                let why = match error {
                    EvalError::Missing => "a missing key".to_string(),
                    EvalError::Failed(why) => why.clone(),
                };
                format!("{} `{}` failed: {why}", role.name(), expression.source())
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LimitView<'a> {
    pub id: Option<&'a str>,
    pub namespace: &'a str,
    pub max_value: u64,
    pub seconds: u64,
    pub name: Option<&'a str>,
    pub conditions: Vec<&'a str>,
    pub variables: Vec<&'a str>,
    /// Absent for the default, Limitador's fixed window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill_tokens: Option<u64>,
    /// A calendar quota's period and time zone (`seconds` is then its nominal length).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calendar: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<&'a str>,
}

/// The algorithm a limit asks for in its YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlgorithmKind {
    FixedWindow,
    /// Refilled continuously, or with `refill_tokens` every `seconds` when given.
    TokenBucket {
        refill_tokens: Option<u64>,
    },
    SlidingWindow,
    /// A fixed window that lasts a calendar period (`calendar:`, `timezone:`).
    Calendar(Calendar),
    /// In-flight requests: `max_value` slots, each living at most `seconds`.
    Concurrency,
}

impl AlgorithmKind {
    pub fn build(self, max_value: u64, period_ms: u64) -> Algorithm {
        match self {
            AlgorithmKind::FixedWindow => {
                Algorithm::FixedWindow(FixedWindow::new(max_value, period_ms))
            }
            AlgorithmKind::TokenBucket {
                refill_tokens: None,
            } => Algorithm::TokenBucket(TokenBucket::continuous(max_value, period_ms)),
            AlgorithmKind::TokenBucket {
                refill_tokens: Some(tokens),
            } => Algorithm::TokenBucket(TokenBucket::stepped(max_value, tokens, period_ms)),
            AlgorithmKind::SlidingWindow => {
                Algorithm::SlidingWindow(SlidingWindow::new(max_value, period_ms))
            }
            AlgorithmKind::Calendar(calendar) => {
                Algorithm::FixedWindow(FixedWindow::calendar(max_value, calendar))
            }
            AlgorithmKind::Concurrency => {
                Algorithm::Concurrency(Concurrency::new(max_value, period_ms))
            }
        }
    }

    /// Part of a limit's identity, so changing the algorithm starts new counters. Empty for
    /// fixed windows, so their counters keep the identity they have always had.
    pub(crate) fn identity(self) -> String {
        match self {
            AlgorithmKind::FixedWindow => String::new(),
            AlgorithmKind::TokenBucket { refill_tokens } => {
                format!("token_bucket/{}", refill_tokens.unwrap_or(0))
            }
            AlgorithmKind::SlidingWindow => "sliding_window".to_string(),
            AlgorithmKind::Calendar(calendar) => format!(
                "calendar/{}/{}",
                calendar.period.name(),
                calendar.zone.name()
            ),
            AlgorithmKind::Concurrency => "concurrency".to_string(),
        }
    }
}

/// The loaded limits, indexed by namespace and by identity. Immutable: a reload builds a new one.
#[derive(Default)]
pub struct LimitSet {
    by_namespace: HashMap<String, Namespace>,
    by_key: HashMap<LimitId, Arc<Limit>>,
    /// Digest of the file content the limits were read from ([`file::digest`]).
    content_digest: Option<u64>,
    /// Limits from elsewhere than the file, kept when the file is reloaded.
    fixed: Option<Arc<FixedLimits>>,
    /// The settings envoyproxy/ratelimit-format files were read with, kept across reloads.
    ratelimit_settings: RatelimitSettings,
}

/// Limits that do not come from the limits file (ASM's `RATE_LIMIT_CONFIG`): they stay in
/// force when the file is reloaded, and own their namespace: the file may have no limits in it.
pub struct FixedLimits {
    /// What they come from, for errors ("RATE_LIMIT_CONFIG").
    pub source: String,
    pub namespace: String,
    limits: Vec<Arc<Limit>>,
}

impl FixedLimits {
    /// `limits` (all in `namespace`) from `source`.
    pub fn new(
        source: impl Into<String>,
        namespace: impl Into<String>,
        limits: Vec<Limit>,
    ) -> Self {
        Self {
            source: source.into(),
            namespace: namespace.into(),
            limits: limits.into_iter().map(Arc::new).collect(),
        }
    }
}

/// The limits of one namespace, in file order, indexed by what they require.
#[derive(Default)]
pub struct Namespace {
    limits: Vec<Arc<Limit>>,
    index: LimitIndex,
    /// An envoyproxy/ratelimit-format domain: its descriptor tree decides which limit applies
    /// (the limits above are the tree's, and have no conditions).
    tree: Option<Arc<Domain>>,
}

impl Namespace {
    /// The descriptor tree, for a domain of the envoyproxy/ratelimit format.
    pub fn tree(&self) -> Option<&Arc<Domain>> {
        self.tree.as_ref()
    }

    /// The limits that may apply to `descriptors` (the others certainly do not), in file
    /// order.
    pub fn candidates<'a>(
        &'a self,
        descriptors: &[Descriptor],
    ) -> impl Iterator<Item = &'a Arc<Limit>> + 'a {
        let positions = self.index.candidates(descriptors);
        positions.into_iter().map(|i| &self.limits[i])
    }
}

impl LimitSet {
    pub fn new(limits: Vec<Limit>) -> Self {
        Self::of(limits.into_iter().map(Arc::new))
    }

    fn of(limits: impl IntoIterator<Item = Arc<Limit>>) -> Self {
        let mut set = Self::default();
        for limit in limits {
            set.by_key.insert(limit.key, limit.clone());
            set.by_namespace
                .entry(limit.namespace.clone())
                .or_default()
                .limits
                .push(limit);
        }
        for namespace in set.by_namespace.values_mut() {
            namespace.index = LimitIndex::new(namespace.limits.iter().map(|l| &**l));
        }
        set
    }

    /// Adds envoyproxy/ratelimit-format domains (each a namespace the Limitador-format limits
    /// do not use; the loader checks that), read with `settings`.
    pub fn with_domains(mut self, domains: Vec<Domain>, settings: RatelimitSettings) -> Self {
        self.ratelimit_settings = settings;
        for domain in domains {
            let domain = Arc::new(domain);
            let limits = domain.limits().to_vec();
            for limit in &limits {
                self.by_key.insert(limit.key, limit.clone());
            }
            let namespace = self.by_namespace.entry(domain.name.clone()).or_default();
            namespace.limits.extend(limits);
            namespace.tree = Some(domain);
        }
        self
    }

    /// The settings envoyproxy/ratelimit-format files are read with.
    pub fn ratelimit_settings(&self) -> RatelimitSettings {
        self.ratelimit_settings
    }

    /// Records the digest of the file content these limits came from.
    pub fn from_content(mut self, digest: u64) -> Self {
        self.content_digest = Some(digest);
        self
    }

    pub fn content_digest(&self) -> Option<u64> {
        self.content_digest
    }

    /// These limits, read from `file`, with `fixed` added to them; an error naming both
    /// sources when the file has limits in `fixed`'s namespace.
    pub fn with_fixed(self, file: &str, fixed: Option<Arc<FixedLimits>>) -> Result<Self, String> {
        let Some(fixed) = fixed else {
            return Ok(self);
        };
        if self.by_namespace.contains_key(&fixed.namespace) {
            return Err(format!(
                "namespace {:?} has limits both in the limits file {file} and in {}; each \
                 namespace takes its limits from one source: remove them from the file, or \
                 leave {} unset",
                fixed.namespace, fixed.source, fixed.source
            ));
        }
        let limits: Vec<Arc<Limit>> = (self.by_namespace.values())
            .filter(|n| n.tree.is_none())
            .flat_map(|n| n.limits.iter())
            .chain(&fixed.limits)
            .cloned()
            .collect();
        let mut set = Self::of(limits);
        set.content_digest = self.content_digest;
        set.fixed = Some(fixed);
        set.ratelimit_settings = self.ratelimit_settings;
        for (name, namespace) in self.by_namespace {
            if namespace.tree.is_some() {
                for limit in &namespace.limits {
                    set.by_key.insert(limit.key, limit.clone());
                }
                set.by_namespace.insert(name, namespace);
            }
        }
        Ok(set)
    }

    /// The limits kept across reloads of the file, if any.
    pub fn fixed(&self) -> Option<&Arc<FixedLimits>> {
        self.fixed.as_ref()
    }

    pub fn namespace(&self, namespace: &str) -> &[Arc<Limit>] {
        self.by_namespace
            .get(namespace)
            .map(|n| n.limits.as_slice())
            .unwrap_or_default()
    }

    /// The namespace's limits and index; `None` when it has no limits.
    pub fn namespace_entry(&self, namespace: &str) -> Option<&Namespace> {
        self.by_namespace.get(namespace)
    }

    pub fn by_key(&self, key: LimitId) -> Option<&Arc<Limit>> {
        self.by_key.get(&key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Every limit, sorted by namespace then file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Limit>> {
        let mut namespaces: Vec<_> = self.by_namespace.iter().collect();
        namespaces.sort_by(|a, b| a.0.cmp(b.0));
        namespaces.into_iter().flat_map(|(_, n)| n.limits.iter())
    }
}

/// FNV-1a: a fingerprint that is the same in every process and every release, so counter keys
/// stay valid across restarts and between replicas.
pub(crate) fn fingerprint<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// A limit's plain fields, as read from its YAML entry.
pub(crate) struct LimitFields {
    pub namespace: String,
    pub max_value: u64,
    pub seconds: u64,
    pub name: Option<String>,
    pub id: Option<String>,
    pub kind: AlgorithmKind,
}

impl Limit {
    pub(crate) fn new(
        fields: LimitFields,
        conditions: Vec<Expression>,
        variables: Vec<Expression>,
    ) -> Self {
        let LimitFields {
            namespace,
            max_value,
            seconds,
            name,
            id,
            kind,
        } = fields;
        let seconds_text = seconds.to_string();
        let kind_text = kind.identity();
        // A continuous bucket keeps its level in units of 1/`seconds` token: with another
        // period the same level would mean another number of tokens, so a limit that keeps its
        // `id` but changes `seconds` starts new buckets instead of rescaling the old ones.
        // (Without `id`, `seconds` is part of the identity anyway.)
        let period_text = matches!(
            kind,
            AlgorithmKind::TokenBucket {
                refill_tokens: None
            }
        )
        .then(|| format!("period/{seconds}"));
        let key = match &id {
            Some(id) => fingerprint(
                ["id", namespace.as_str(), id.as_str()]
                    .into_iter()
                    .chain((!kind_text.is_empty()).then_some(kind_text.as_str()))
                    .chain(period_text.as_deref()),
            ),
            None => {
                let mut sorted: Vec<&str> = conditions.iter().map(Expression::source).collect();
                sorted.sort_unstable();
                let parts = ["limit", namespace.as_str(), seconds_text.as_str()]
                    .into_iter()
                    .chain(sorted)
                    .chain(["|"])
                    .chain(variables.iter().map(Expression::source))
                    .chain((!kind_text.is_empty()).then_some(kind_text.as_str()));
                fingerprint(parts)
            }
        };
        let uses_limit = conditions.iter().chain(&variables).any(|e| e.reads_limit());
        let cel_self = uses_limit.then(|| expression::limit_value(name.as_deref(), id.as_deref()));
        Self {
            id,
            name,
            namespace,
            max_value,
            seconds,
            conditions,
            variables,
            kind,
            algorithm: kind.build(max_value, seconds.saturating_mul(1000)),
            cost: None,
            key,
            cel_self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `limit` is the evaluated limit's own `{name, id}`, beside `descriptors`.
    #[test]
    fn expressions_read_the_limit_they_belong_to() {
        let limits = file::parse_limits(
            "test",
            r#"
- {name: gold, namespace: n, max_value: 1, seconds: 1, conditions: ["limit.name == 'gold'"], variables: ["descriptors[0].user"]}
- {name: free, namespace: n, max_value: 1, seconds: 1, conditions: ["limit.name == 'gold'"], variables: []}
- {id: fixed, namespace: n, max_value: 1, seconds: 1, conditions: [], variables: ["limit.id", "limit.name"]}
"#,
        )
        .unwrap();
        let descriptors = [Descriptor::of(&[("user", "alice")])];
        let input = Input::new(&descriptors);
        let mut values = KeyValues::new();
        assert_eq!(limits[0].applies(&input, &mut values), Ok(true));
        assert_eq!(values.as_slice(), ["alice"]);
        assert_eq!(limits[1].applies(&input, &mut values), Ok(false));
        assert_eq!(limits[2].applies(&input, &mut values), Ok(true));
        assert_eq!(values.as_slice(), ["fixed", "null"]);
    }

    /// `evaluate` names the expression that decided, and `applies` agrees with it.
    #[test]
    fn evaluate_says_which_expression_keeps_a_limit_from_applying() {
        let limits = file::parse_limits(
            "test",
            r#"
- {name: a, namespace: n, max_value: 1, seconds: 1, conditions: ["descriptors[0].tier == 'gold'"], variables: ["descriptors[0].user"]}
- {name: b, namespace: n, max_value: 1, seconds: 1, conditions: ["descriptors[0].n > 3"]}
"#,
        )
        .unwrap();
        let reason = |entries: &[(&str, &str)], limit: &Limit| {
            let descriptors = [Descriptor::of(entries)];
            let input = Input::new(&descriptors);
            let mut values = KeyValues::new();
            let applies = limit.applies(&input, &mut values);
            match limit.evaluate(&input, &mut values) {
                Ok(()) => {
                    assert_eq!(applies, Ok(true));
                    "applies".to_string()
                }
                Err(mismatch) => {
                    let expected = match &mismatch {
                        Mismatch::Failed { error, .. } => Err(error.clone()),
                        _ => Ok(false),
                    };
                    assert_eq!(applies, expected);
                    mismatch.message()
                }
            }
        };
        let a = &limits[0];
        assert_eq!(reason(&[("tier", "gold"), ("user", "u")], a), "applies");
        assert_eq!(
            reason(&[("tier", "free"), ("user", "u")], a),
            "condition `descriptors[0].tier == 'gold'` is false"
        );
        assert_eq!(
            reason(&[("user", "u")], a),
            "condition `descriptors[0].tier == 'gold'` reads a key or index this request does not have"
        );
        assert_eq!(
            reason(&[("tier", "gold")], a),
            "variable `descriptors[0].user` reads a key or index this request does not have"
        );
        let failed = reason(&[("n", "7")], &limits[1]);
        assert!(
            failed.starts_with("condition `descriptors[0].n > 3` failed: "),
            "{failed}"
        );
    }

    fn asm_rules() -> Option<Arc<FixedLimits>> {
        let json = r#"[{"rate_limit_key_regex": "k", "max_tokens": 5, "tokens_per_fill": 1,
            "fill_interval_second": 1, "redis_expired_seconds": 1}]"#;
        let rules = parse_rate_limit_config(json, "asm").unwrap();
        Some(Arc::new(FixedLimits::new(RATE_LIMIT_CONFIG, "asm", rules)))
    }

    #[test]
    fn fixed_limits_join_the_files_and_own_their_namespace() {
        let file = LimitSet::new(
            file::parse_limits("f.yaml", "- {namespace: other, max_value: 1, seconds: 1}").unwrap(),
        )
        .from_content(7);
        let set = file.with_fixed("f.yaml", asm_rules()).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.namespace("asm")[0].max_value, 5);
        assert_eq!(set.content_digest(), Some(7));
        assert_eq!(set.fixed().map(|f| f.namespace.as_str()), Some("asm"));

        // The file may not have limits in the namespace of the fixed ones.
        let clashing = LimitSet::new(
            file::parse_limits("f.yaml", "- {namespace: asm, max_value: 1, seconds: 1}").unwrap(),
        );
        let e = clashing.with_fixed("f.yaml", asm_rules()).err().unwrap();
        assert!(
            e.contains("\"asm\"") && e.contains("f.yaml") && e.contains(RATE_LIMIT_CONFIG),
            "{e}"
        );
        // An empty list of rules still owns its namespace.
        let none = Some(Arc::new(FixedLimits::new(RATE_LIMIT_CONFIG, "asm", vec![])));
        let clashing = LimitSet::new(
            file::parse_limits("f.yaml", "- {namespace: asm, max_value: 1, seconds: 1}").unwrap(),
        );
        assert!(clashing.with_fixed("f.yaml", none).is_err());
    }
}
