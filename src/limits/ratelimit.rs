//! envoyproxy/ratelimit's configuration format: a YAML document with a `domain` and a tree of
//! `descriptors`, read into a [`Domain`] the limiter matches request descriptors against
//! exactly as envoyproxy/ratelimit does (see docs/from-envoy-ratelimit.md).
//!
//! Matching, per request descriptor, entry by entry down the tree: at each level the entry's
//! `key_value` is looked up first, then the wildcard values of that level in file order, then
//! the bare `key` (a node without `value`, counting per distinct value). The descriptor gets
//! the rate limit of the node its last entry reaches, and none when it stops early or has
//! more entries than the tree is deep.
//!
//! Each `rate_limit` becomes a [`Limit`] of the domain (no conditions or variables: the tree
//! decides where it applies); its counters are named by the values of the descriptor's
//! entries. Without our extension fields it is a fixed window aligned to the clock.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde_yaml::{Mapping, Value};

use super::file::MAX_SECONDS;
use super::{AlgorithmKind, Expression, KeyValues, Limit, LimitFields, fingerprint};
use crate::algorithm::{Algorithm, Calendar, FixedWindow, MAX_COUNT, MAX_HOLDS, Period, calendar};

/// The settings of this format that envoyproxy/ratelimit reads from its environment
/// (`SHADOW_MODE`, `QUOTA_MODE`, `STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT`,
/// `MERGE_DOMAIN_CONFIG`, `RESPONSE_DYNAMIC_METADATA`). They apply to every domain of this
/// format, and are kept across reloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RatelimitSettings {
    /// Every refusal is answered OK (descriptor statuses still say OVER_LIMIT).
    pub shadow_mode: bool,
    /// Every descriptor is in quota mode.
    pub quota_mode: bool,
    /// A request refused by one of its descriptors counts on none of them.
    pub stop_increment_when_over: bool,
    /// Files that define the same domain are merged instead of refused.
    pub merge_domains: bool,
    /// Answers carry `dynamic_metadata` (domain, descriptors, hits and the `metadata` of the
    /// descriptors that passed).
    pub dynamic_metadata: bool,
}

/// What a matched node says about a descriptor.
pub struct Rule {
    /// The limit; `None` for `unlimited: true` (answered OK without counting).
    pub limit: Option<Arc<Limit>>,
    /// `rate_limit.name` (also for an unlimited one), what `replaces` refers to.
    pub name: Option<String>,
    /// Names of the limits this one removes from the same request.
    pub replaces: Vec<String>,
    pub shadow_mode: bool,
    pub quota_mode: bool,
    /// The node's `metadata`, as JSON, for `dynamic_metadata`.
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Default)]
struct Node {
    /// By `key_value`, or `key` for a node without value (as envoyproxy/ratelimit files them).
    children: HashMap<String, Node>,
    /// The children whose `key_value` has a `*`, in file order: (their name, split on `*`).
    wildcards: Vec<(String, Vec<String>)>,
    rule: Option<Rule>,
    /// `share_threshold`: every value this wildcard matches shares one counter, named by the
    /// wildcard value itself.
    shared_value: Option<String>,
}

/// One domain of this format: its descriptor tree, and the file(s) it came from.
pub struct Domain {
    pub name: String,
    pub files: Vec<String>,
    pub settings: RatelimitSettings,
    root: Node,
    limits: Vec<Arc<Limit>>,
}

/// A descriptor matched to a node with a rate limit (or `unlimited`).
pub struct Found<'a> {
    pub rule: &'a Rule,
    /// The values that name the descriptor's counter (one per entry).
    pub values: KeyValues<'a>,
}

impl Domain {
    /// Every limit of the domain, in file order.
    pub fn limits(&self) -> &[Arc<Limit>] {
        &self.limits
    }

    /// The rule for one request descriptor, as envoyproxy/ratelimit finds it.
    pub fn find<'a>(&'a self, entries: &'a [(String, String)]) -> Option<Found<'a>> {
        let mut node = &self.root;
        let mut values = KeyValues::new();
        let mut full = String::new();
        for (i, (key, value)) in entries.iter().enumerate() {
            full.clear();
            full.push_str(key);
            full.push('_');
            full.push_str(value);
            let next = match node.children.get(full.as_str()) {
                Some(exact) => Some((exact, None)),
                None => node
                    .wildcards
                    .iter()
                    .find(|(_, parts)| wildcard_matches(parts, &full))
                    .and_then(|(name, _)| node.children.get(name))
                    .map(|n| (n, n.shared_value.as_deref())),
            };
            let (next, shared) = match next {
                Some(found) => found,
                None => (node.children.get(key.as_str())?, None),
            };
            values.push(Cow::Borrowed(shared.unwrap_or(value)));
            if i + 1 == entries.len() {
                return next.rule.as_ref().map(|rule| Found { rule, values });
            }
            if next.children.is_empty() {
                return None;
            }
            node = next;
        }
        None
    }
}

/// Does `value` match the wildcard split on `*` into `parts` (each `*` any run of
/// characters, possibly empty)?
fn wildcard_matches(parts: &[String], value: &str) -> bool {
    let [first, middle @ .., last] = parts else {
        return parts.first().is_some_and(|p| p == value);
    };
    let fixed: usize = parts.iter().map(String::len).sum();
    if value.len() < fixed || !value.starts_with(first.as_str()) || !value.ends_with(last.as_str())
    {
        return false;
    }
    let Some(mut rest) = value.get(first.len()..value.len() - last.len()) else {
        return false;
    };
    for part in middle {
        match rest.find(part.as_str()) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether a YAML document is this format: a mapping with `domain` at the top.
pub fn is_ratelimit_document(document: &Value) -> bool {
    document
        .as_mapping()
        .is_some_and(|m| m.contains_key("domain"))
}

const DOCUMENT_FIELDS: [&str; 2] = ["domain", "descriptors"];
const DESCRIPTOR_FIELDS: [&str; 10] = [
    "key",
    "value",
    "rate_limit",
    "descriptors",
    "shadow_mode",
    "quota_mode",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
];
const RATE_LIMIT_FIELDS: [&str; 10] = [
    "unit",
    "requests_per_unit",
    "unlimited",
    "name",
    "replaces",
    "algorithm",
    "refill_tokens",
    "calendar",
    "timezone",
    "cost",
];

/// envoyproxy/ratelimit's units and their length (a month is 30 days, a year 365, as there).
pub const UNITS: [(&str, u64); 7] = [
    ("second", 1),
    ("minute", 60),
    ("hour", 3_600),
    ("day", 86_400),
    ("week", 604_800),
    ("month", 2_592_000),
    ("year", 31_536_000),
];

/// Reads one document of this format from `file` into `domains` (merging into a domain read
/// before when `settings.merge_domains`, else refusing it). Problems are returned, each a
/// sentence naming the domain, the descriptor path and the field.
pub fn read_document(
    file: &str,
    document: Value,
    settings: RatelimitSettings,
    domains: &mut Vec<Domain>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let Value::Mapping(mut mapping) = document else {
        return vec!["expected a mapping with `domain` and `descriptors`".into()];
    };
    unknown_fields(&mapping, &DOCUMENT_FIELDS, "", &mut problems);
    let name = match mapping.remove("domain") {
        Some(Value::String(name)) if !name.is_empty() => name,
        Some(Value::String(_)) | Some(Value::Null) | None => {
            problems.push("field `domain` must not be empty".into());
            return problems;
        }
        Some(other) => {
            problems.push(format!(
                "field `domain`: expected a text, found {}",
                describe(&other)
            ));
            return problems;
        }
    };
    let existing = domains.iter().position(|d| d.name == name);
    if let Some(at) = existing
        && !settings.merge_domains
    {
        problems.push(format!(
            "domain {name:?} is also defined in {}; each domain comes from one file (or set \
             MERGE_DOMAIN_CONFIG=true to merge them)",
            domains[at].files.join(", ")
        ));
        return problems;
    }
    let mut reader = Reader {
        domain: &name,
        problems: Vec::new(),
        limits: Vec::new(),
    };
    let mut root = match existing {
        Some(at) => std::mem::take(&mut domains[at].root),
        None => Node::default(),
    };
    if let Some(descriptors) = mapping.remove("descriptors") {
        reader.descriptors(&mut root, "", descriptors);
    }
    let Reader {
        problems: found,
        limits,
        ..
    } = reader;
    problems.extend(found.into_iter().map(|p| format!("domain {name:?}, {p}")));
    match existing {
        Some(at) => {
            let domain = &mut domains[at];
            domain.root = root;
            domain.files.push(file.to_string());
            domain.limits.extend(limits);
        }
        None => domains.push(Domain {
            name,
            files: vec![file.to_string()],
            settings,
            root,
            limits,
        }),
    }
    problems
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn unknown_fields(mapping: &Mapping, known: &[&str], prefix: &str, problems: &mut Vec<String>) {
    for key in mapping.keys() {
        match key.as_str() {
            Some(field) if known.contains(&field) => {}
            Some(field) => problems.push(format!(
                "unknown field `{prefix}{field}`, expected one of {}",
                known
                    .iter()
                    .map(|f| format!("`{prefix}{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => problems.push(format!("a key that is not a text: {}", describe(key))),
        }
    }
}

struct Reader<'d> {
    domain: &'d str,
    problems: Vec<String>,
    limits: Vec<Arc<Limit>>,
}

/// One `rate_limit` as read.
struct RawRateLimit {
    unit: Option<String>,
    requests_per_unit: Option<u64>,
    unlimited: bool,
    name: Option<String>,
    replaces: Vec<String>,
    algorithm: Option<String>,
    refill_tokens: Option<u64>,
    calendar: Option<String>,
    timezone: Option<String>,
    cost: Option<String>,
}

impl Reader<'_> {
    fn problem(&mut self, path: &str, text: String) {
        let at = if path.is_empty() {
            "top level".to_string()
        } else {
            format!("descriptor {path}")
        };
        self.problems.push(format!("{at}: {text}"));
    }

    fn descriptors(&mut self, parent: &mut Node, path: &str, value: Value) {
        let items = match value {
            Value::Null => return,
            Value::Sequence(items) => items,
            other => {
                let text = format!(
                    "field `descriptors`: expected a list of descriptors, found {}",
                    describe(&other)
                );
                self.problem(path, text);
                return;
            }
        };
        for (index, item) in items.into_iter().enumerate() {
            self.descriptor(parent, path, index, item);
        }
    }

    /// A text field; numbers and booleans are read as they are written (as YAML does for a
    /// text field).
    fn text(&mut self, path: &str, mapping: &mut Mapping, field: &str) -> Option<String> {
        match mapping.remove(field)? {
            Value::Null => None,
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            other => {
                let text = format!(
                    "field `{field}`: expected a text, found {}",
                    describe(&other)
                );
                self.problem(path, text);
                None
            }
        }
    }

    fn flag(&mut self, path: &str, mapping: &mut Mapping, field: &str) -> bool {
        match mapping.remove(field) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(other) => {
                let text = format!(
                    "field `{field}`: expected true or false, found {}",
                    describe(&other)
                );
                self.problem(path, text);
                false
            }
        }
    }

    fn count(&mut self, path: &str, mapping: &mut Mapping, field: &str) -> Option<u64> {
        let value = mapping.remove(field).filter(|v| !v.is_null())?;
        let count = value.as_u64();
        if count.is_none() {
            let text = format!(
                "field `{field}`: expected a whole number >= 0, found {}",
                describe(&value)
            );
            self.problem(path, text);
        }
        count
    }

    fn descriptor(&mut self, parent: &mut Node, parent_path: &str, index: usize, item: Value) {
        let here = |name: &str| {
            if parent_path.is_empty() {
                name.to_string()
            } else {
                format!("{parent_path}.{name}")
            }
        };
        let Value::Mapping(mut mapping) = item else {
            let text = format!(
                "descriptors[{index}]: expected a mapping with `key`, found {}",
                describe(&item)
            );
            self.problem(parent_path, text);
            return;
        };
        let anonymous = here(&format!("descriptors[{index}]"));
        let key = self
            .text(&anonymous, &mut mapping, "key")
            .unwrap_or_default();
        if key.is_empty() {
            self.problem(&anonymous, "field `key` must not be empty".into());
            return;
        }
        let value = self
            .text(&anonymous, &mut mapping, "value")
            .unwrap_or_default();
        let name = if value.is_empty() {
            key.clone()
        } else {
            format!("{key}_{value}")
        };
        let path = here(&name);
        let mut unknown = Vec::new();
        unknown_fields(&mapping, &DESCRIPTOR_FIELDS, "", &mut unknown);
        for text in unknown {
            self.problem(&path, text);
        }
        if parent.children.contains_key(&name) {
            self.problem(
                &path,
                "duplicate descriptor: the same key and value appear twice at this level".into(),
            );
            return;
        }
        let shadow_mode = self.flag(&path, &mut mapping, "shadow_mode");
        let quota_mode = self.flag(&path, &mut mapping, "quota_mode");
        // Metrics naming in envoyproxy/ratelimit: accepted, and without effect here.
        for field in ["detailed_metric", "value_to_metric"] {
            self.flag(&path, &mut mapping, field);
        }
        let share_threshold = self.flag(&path, &mut mapping, "share_threshold");
        if share_threshold && !name.contains('*') {
            self.problem(
                &path,
                "field `share_threshold` only applies to a wildcard value (one with `*`)".into(),
            );
        }
        let metadata = match mapping.remove("metadata") {
            None | Some(Value::Null) => None,
            Some(value @ Value::Mapping(_)) => match serde_json::to_value(&value) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                _ => {
                    let text = "field `metadata`: expected a mapping of plain values".into();
                    self.problem(&path, text);
                    None
                }
            },
            Some(other) => {
                let text = format!(
                    "field `metadata`: expected a mapping, found {}",
                    describe(&other)
                );
                self.problem(&path, text);
                None
            }
        };
        let mut node = Node {
            shared_value: share_threshold.then(|| value.clone()),
            ..Node::default()
        };
        if let Some(rate_limit) = mapping.remove("rate_limit").filter(|v| !v.is_null()) {
            node.rule = self.rule(&path, rate_limit, shadow_mode, quota_mode, metadata);
        }
        if let Some(children) = mapping.remove("descriptors") {
            self.descriptors(&mut node, &path, children);
        }
        if name.contains('*') {
            let parts = name.split('*').map(str::to_string).collect();
            parent.wildcards.push((name.clone(), parts));
        }
        parent.children.insert(name, node);
    }

    fn rule(
        &mut self,
        path: &str,
        value: Value,
        shadow_mode: bool,
        quota_mode: bool,
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
    ) -> Option<Rule> {
        let Value::Mapping(mut mapping) = value else {
            let text = format!(
                "field `rate_limit`: expected a mapping, found {}",
                describe(&value)
            );
            self.problem(path, text);
            return None;
        };
        let before = self.problems.len();
        let mut unknown = Vec::new();
        unknown_fields(&mapping, &RATE_LIMIT_FIELDS, "rate_limit.", &mut unknown);
        for text in unknown {
            self.problem(path, text);
        }
        let replaces = self.replaces(path, &mut mapping);
        let raw = RawRateLimit {
            unit: self.text(path, &mut mapping, "unit"),
            requests_per_unit: self.count(path, &mut mapping, "requests_per_unit"),
            unlimited: self.flag(path, &mut mapping, "unlimited"),
            name: self.text(path, &mut mapping, "name"),
            replaces,
            algorithm: self.text(path, &mut mapping, "algorithm"),
            refill_tokens: self.count(path, &mut mapping, "refill_tokens"),
            calendar: self.text(path, &mut mapping, "calendar"),
            timezone: self.text(path, &mut mapping, "timezone"),
            cost: self.text(path, &mut mapping, "cost"),
        };
        if raw.name.as_deref() == Some("") {
            self.problem(
                path,
                "field `rate_limit.name` must not be empty when given".into(),
            );
        }
        for replaced in &raw.replaces {
            if replaced.is_empty() {
                self.problem(
                    path,
                    "field `rate_limit.replaces`: an entry without `name`".into(),
                );
            } else if Some(replaced) == raw.name.as_ref() {
                self.problem(
                    path,
                    format!(
                        "field `rate_limit.replaces`: a limit cannot replace itself ({replaced:?})"
                    ),
                );
            }
        }
        let limit = if raw.unlimited {
            for (field, given) in [
                ("unit", raw.unit.is_some()),
                ("requests_per_unit", raw.requests_per_unit.is_some()),
                ("algorithm", raw.algorithm.is_some()),
                ("refill_tokens", raw.refill_tokens.is_some()),
                ("calendar", raw.calendar.is_some()),
                ("cost", raw.cost.is_some()),
            ] {
                if given {
                    let text = format!(
                        "field `rate_limit.{field}`: an unlimited rate limit takes no {field}"
                    );
                    self.problem(path, text);
                }
            }
            None
        } else {
            self.limit(path, &raw)
        };
        if self.problems.len() > before {
            return None;
        }
        Some(Rule {
            limit,
            name: raw.name,
            replaces: raw.replaces,
            shadow_mode,
            quota_mode,
            metadata,
        })
    }

    fn replaces(&mut self, path: &str, mapping: &mut Mapping) -> Vec<String> {
        let items = match mapping.remove("replaces") {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Sequence(items)) => items,
            Some(other) => {
                let text = format!(
                    "field `rate_limit.replaces`: expected a list of `name:` entries, found {}",
                    describe(&other)
                );
                self.problem(path, text);
                return Vec::new();
            }
        };
        let mut names = Vec::new();
        for item in items {
            match item {
                Value::Mapping(mut entry) => {
                    let mut unknown = Vec::new();
                    unknown_fields(&entry, &["name"], "rate_limit.replaces[].", &mut unknown);
                    for text in unknown {
                        self.problem(path, text);
                    }
                    names.push(self.text(path, &mut entry, "name").unwrap_or_default());
                }
                other => {
                    let text = format!(
                        "field `rate_limit.replaces`: expected `name:` entries, found {}",
                        describe(&other)
                    );
                    self.problem(path, text);
                }
            }
        }
        names
    }

    /// The limit of a (not unlimited) `rate_limit`.
    fn limit(&mut self, path: &str, raw: &RawRateLimit) -> Option<Arc<Limit>> {
        // `calendar:` (our extension): a fixed window that lasts a calendar period.
        let mut calendar_of = None;
        let seconds = match (&raw.unit, &raw.calendar) {
            (Some(_), Some(_)) => {
                let text =
                    "fields `rate_limit.unit` and `rate_limit.calendar`: give one, not both".into();
                self.problem(path, text);
                None
            }
            (Some(unit), None) => {
                let found = UNITS
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(unit))
                    .map(|(_, seconds)| *seconds);
                if found.is_none() {
                    let text = format!(
                        "field `rate_limit.unit`: unknown unit {unit:?} (one of {})",
                        UNITS.map(|(n, _)| n).join(", ")
                    );
                    self.problem(path, text);
                }
                found
            }
            (None, Some(period)) => {
                let zone = raw.timezone.as_deref().unwrap_or("UTC");
                let period = period
                    .parse::<Period>()
                    .map_err(|e| self.problem(path, format!("field `rate_limit.calendar`: {e}")))
                    .ok();
                let zone = calendar::zone(zone)
                    .map_err(|e| self.problem(path, format!("field `rate_limit.timezone`: {e}")))
                    .ok();
                let (period, zone) = (period?, zone?);
                calendar_of = Some(Calendar::new(period, zone));
                Some(period.nominal_seconds())
            }
            (None, None) => {
                self.problem(path, "missing field `rate_limit.unit`".into());
                None
            }
        };
        if raw.timezone.is_some() && raw.calendar.is_none() {
            self.problem(
                path,
                "field `rate_limit.timezone` only applies with `calendar`".into(),
            );
        }
        // `cost:` (our extension): what a charge of usage costs, as in the Limitador format.
        let cost = raw.cost.as_ref().and_then(|source| {
            Expression::compile_cost(source)
                .map_err(|e| {
                    self.problem(path, format!("field `rate_limit.cost` ({source:?}): {e}"))
                })
                .ok()
        });
        let requests_per_unit = raw.requests_per_unit;
        if requests_per_unit.is_none() {
            self.problem(path, "missing field `rate_limit.requests_per_unit`".into());
        }
        if let Some(max) = requests_per_unit
            && max > u64::from(u32::MAX)
        {
            self.problem(
                path,
                format!(
                    "field `rate_limit.requests_per_unit` must be at most {}, found {max}",
                    u32::MAX
                ),
            );
        }
        let kind = match raw.algorithm.as_deref() {
            None | Some("fixed_window") => AlgorithmKind::FixedWindow,
            Some("token_bucket") => AlgorithmKind::TokenBucket {
                refill_tokens: raw.refill_tokens,
            },
            Some("sliding_window") => AlgorithmKind::SlidingWindow,
            Some("concurrency") => AlgorithmKind::Concurrency,
            Some(other) => {
                let text = format!(
                    "field `rate_limit.algorithm`: unknown algorithm {other:?} (known: fixed_window, \
                     token_bucket, sliding_window, concurrency)"
                );
                self.problem(path, text);
                AlgorithmKind::FixedWindow
            }
        };
        // A concurrency counter's slots are holds, and a counter carries at most MAX_HOLDS.
        if let (AlgorithmKind::Concurrency, Some(max)) = (kind, requests_per_unit)
            && max > MAX_HOLDS as u64
        {
            let text = format!(
                "field `rate_limit.requests_per_unit` of a concurrency limit must be at most \
                 {MAX_HOLDS} (the slots one counter carries), found {max}"
            );
            self.problem(path, text);
        }
        let kind = match (calendar_of, kind) {
            (Some(calendar), AlgorithmKind::FixedWindow) => AlgorithmKind::Calendar(calendar),
            (Some(_), _) => {
                let text = format!(
                    "field `rate_limit.calendar` only applies to `algorithm: fixed_window`, found \
                     `algorithm: {}`",
                    raw.algorithm.as_deref().unwrap_or("")
                );
                self.problem(path, text);
                kind
            }
            (None, kind) => kind,
        };
        match (kind, raw.refill_tokens, requests_per_unit) {
            (AlgorithmKind::TokenBucket { .. }, Some(tokens), Some(max))
                if tokens == 0 || tokens > max =>
            {
                self.problem(
                    path,
                    format!(
                        "field `rate_limit.refill_tokens` must be between 1 and requests_per_unit ({max}), found {tokens}"
                    ),
                );
            }
            (AlgorithmKind::TokenBucket { .. }, _, _) | (_, None, _) => {}
            (_, Some(_), _) => self.problem(
                path,
                "field `rate_limit.refill_tokens` only applies to `algorithm: token_bucket`".into(),
            ),
        }
        let exact_in_ms = matches!(
            kind,
            AlgorithmKind::SlidingWindow
                | AlgorithmKind::TokenBucket {
                    refill_tokens: None
                }
        );
        if let (true, Some(max), Some(seconds)) = (exact_in_ms, requests_per_unit, seconds)
            && max.saturating_mul(seconds).saturating_mul(1000) > MAX_COUNT
        {
            self.problem(
                path,
                format!("requests_per_unit × unit in seconds × 1000 must be at most {MAX_COUNT} for this algorithm"),
            );
        }
        let (Some(max_value), Some(seconds)) = (requests_per_unit, seconds) else {
            return None;
        };
        debug_assert!(seconds <= MAX_SECONDS);
        let name = raw.name.clone().filter(|n| !n.is_empty());
        let limit =
            Arc::new(tree_limit(self.domain, path, name, max_value, seconds, kind).with_cost(cost));
        self.limits.push(limit.clone());
        Some(limit)
    }
}

/// A limit of this format: `max_value` per `seconds` in `domain`, at descriptor `path` (which
/// names its counters, with the descriptor's values). Without an algorithm of ours, a fixed
/// window aligned to the clock.
pub fn tree_limit(
    domain: &str,
    path: &str,
    name: Option<String>,
    max_value: u64,
    seconds: u64,
    kind: AlgorithmKind,
) -> Limit {
    let fields = LimitFields {
        namespace: domain.to_string(),
        max_value,
        seconds,
        name,
        id: None,
        kind,
    };
    let mut limit = Limit::new(fields, Vec::new(), Vec::new());
    // As the Limitador format's, but this format's fixed windows are aligned to the clock.
    let kind_text = match kind {
        AlgorithmKind::FixedWindow => "aligned".to_string(),
        other => other.identity(),
    };
    let seconds_text = seconds.to_string();
    limit.key = fingerprint([
        "envoyproxy/ratelimit",
        domain,
        path,
        seconds_text.as_str(),
        kind_text.as_str(),
    ]);
    if kind == AlgorithmKind::FixedWindow {
        limit.algorithm = Algorithm::FixedWindow(FixedWindow::aligned(
            max_value,
            seconds.saturating_mul(1000),
        ));
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Vec<Domain>, Vec<String>> {
        let mut domains = Vec::new();
        let document: Value = serde_yaml::from_str(text).unwrap();
        let problems = read_document(
            "t.yaml",
            document,
            RatelimitSettings::default(),
            &mut domains,
        );
        if problems.is_empty() {
            Ok(domains)
        } else {
            Err(problems)
        }
    }

    fn entries(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn wildcards_match_as_envoyproxy_ratelimit_defines_them() {
        let parts = |p: &str| p.split('*').map(str::to_string).collect::<Vec<_>>();
        assert!(wildcard_matches(&parts("k_foo*"), "k_foo"));
        assert!(wildcard_matches(&parts("k_foo*"), "k_foobar"));
        assert!(!wildcard_matches(&parts("k_foo*"), "k_fo"));
        assert!(wildcard_matches(&parts("k_bar*b"), "k_barb"));
        assert!(wildcard_matches(&parts("k_bar*b"), "k_bar123b"));
        assert!(!wildcard_matches(&parts("k_bar*b"), "k_bar123"));
        assert!(wildcard_matches(&parts("k_foo*bar*baz"), "k_foo1bar2baz"));
        assert!(!wildcard_matches(&parts("k_foo*bar*baz"), "k_foobaz"));
        assert!(
            !wildcard_matches(&parts("k_ab*ba"), "k_aba"),
            "fixed parts may not overlap"
        );
    }

    #[test]
    fn calendar_windows_are_checked_like_the_limitador_formats() {
        let with = |rate_limit: &str| {
            load(&format!(
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {rate_limit}\n"
            ))
        };
        let domains =
            with("{calendar: week, timezone: Asia/Kathmandu, requests_per_unit: 5}").unwrap();
        let limit = domains[0]
            .find(&entries(&[("a", "x")]))
            .and_then(|f| f.rule.limit.clone())
            .unwrap();
        assert!(limit.calendar().is_some());
        for (rate_limit, said) in [
            (
                "{calendar: month, algorithm: token_bucket, requests_per_unit: 5}",
                "`rate_limit.calendar` only applies to `algorithm: fixed_window`",
            ),
            (
                "{calendar: month, timezone: Mars/Olympus, requests_per_unit: 5}",
                "field `rate_limit.timezone`",
            ),
            (
                "{calendar: fortnight, requests_per_unit: 5}",
                "field `rate_limit.calendar`",
            ),
            (
                "{calendar: day, unit: day, requests_per_unit: 5}",
                "give one, not both",
            ),
        ] {
            let Err(problems) = with(rate_limit) else {
                panic!("{rate_limit} loaded");
            };
            assert!(
                problems.iter().any(|p| p.contains(said)),
                "{rate_limit}: {problems:?}"
            );
        }
    }

    #[test]
    fn the_node_the_last_entry_reaches_decides() {
        let domains = load(
            "domain: d\ndescriptors:\n  - key: a\n    value: x\n    rate_limit: {unit: second, requests_per_unit: 1}\n    descriptors:\n      - key: b\n        rate_limit: {unit: minute, requests_per_unit: 2}\n  - key: c\n",
        )
        .unwrap();
        let d = &domains[0];
        let max = |pairs: &[(&str, &str)]| {
            let e = entries(pairs);
            d.find(&e)
                .and_then(|f| f.rule.limit.as_ref().map(|l| l.max_value))
        };
        assert_eq!(max(&[("a", "x")]), Some(1));
        assert_eq!(max(&[("a", "x"), ("b", "any")]), Some(2));
        assert_eq!(max(&[("a", "y")]), None);
        assert_eq!(
            max(&[("a", "x"), ("b", "1"), ("z", "1")]),
            None,
            "deeper than the tree"
        );
        assert_eq!(max(&[("c", "1")]), None, "a node without rate_limit");
        assert_eq!(max(&[]), None);
    }
}
