//! Reading limits from Limitador-format YAML. Stricter than Limitador where it protects users:
//! a missing `max_value`, an unknown field, a CEL error or two limits sharing counters is an
//! error that names the file, the entry and the field, never a silent default.

use std::collections::HashMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;

use super::{AlgorithmKind, Expression, Limit, LimitFields, LimitSet};
use crate::algorithm::{Calendar, MAX_COUNT, MAX_HOLDS, Period, calendar};

/// Every problem found in one limits file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsError {
    pub file: String,
    pub problems: Vec<String>,
}

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid limits file {}:", self.file)?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LimitsError {}

const ALGORITHMS: [&str; 4] = [
    "fixed_window",
    "token_bucket",
    "sliding_window",
    "concurrency",
];

/// The longest `seconds` (about 31,700 years), for every algorithm and storage: every time in
/// milliseconds a storage computes (now + seconds × 1000, TTLs) then stays an integer below
/// 2^53, exact in the doubles Redis scripts compute with and written out by Redis as digits
/// (it formats a larger number as `1e+17`, which `SET … PX` refuses).
pub const MAX_SECONDS: u64 = 1_000_000_000_000;

/// One entry's fields as read, each checked on its own so that every problem of an entry is
/// reported at once (a typed deserializer stops at the first). A required field that is
/// missing or of the wrong type is `None`, with its problem recorded.
struct RawLimit {
    namespace: Option<String>,
    max_value: Option<u64>,
    seconds: Option<u64>,
    name: Option<String>,
    id: Option<String>,
    conditions: Option<Vec<String>>,
    variables: Option<Vec<String>>,
    algorithm: Option<String>,
    refill_tokens: Option<u64>,
    calendar: Option<String>,
    timezone: Option<String>,
    cost: Option<String>,
}

/// Every field an entry may have.
const FIELDS: [&str; 12] = [
    "namespace",
    "max_value",
    "seconds",
    "name",
    "id",
    "conditions",
    "variables",
    "algorithm",
    "refill_tokens",
    "calendar",
    "timezone",
    "cost",
];

/// A YAML value as a problem shows it: scalars as written, texts quoted, collections by kind.
fn describe(value: &serde_yaml::Value) -> String {
    use serde_yaml::Value;
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if s.chars().count() > 60 => {
            let head: String = s.chars().take(60).collect();
            format!("{head:?}…")
        }
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// Reads the fields of one entry's mapping, recording a problem for each bad one.
struct FieldReader {
    mapping: serde_yaml::Mapping,
    problems: Vec<String>,
}

impl FieldReader {
    /// The field's value; `null` counts as absent (as `conditions:` with nothing after it).
    fn take(&mut self, field: &str, required: bool) -> Option<serde_yaml::Value> {
        let value = self.mapping.remove(field).filter(|v| !v.is_null());
        if value.is_none() && required {
            self.problems.push(format!("missing field `{field}`"));
        }
        value
    }

    fn wrong(&mut self, field: &str, expected: &str, found: &serde_yaml::Value) {
        self.problems.push(format!(
            "field `{field}`: expected {expected}, found {}",
            describe(found)
        ));
    }

    fn text(&mut self, field: &str, required: bool) -> Option<String> {
        match self.take(field, required)? {
            serde_yaml::Value::String(text) => Some(text),
            other => {
                self.wrong(field, "a text", &other);
                None
            }
        }
    }

    fn count(&mut self, field: &str, required: bool) -> Option<u64> {
        let value = self.take(field, required)?;
        let count = value.as_u64();
        if count.is_none() {
            self.wrong(field, "a whole number >= 0", &value);
        }
        count
    }

    fn expressions(&mut self, field: &str) -> Option<Vec<String>> {
        let items = match self.take(field, false)? {
            serde_yaml::Value::Sequence(items) => items,
            other => {
                self.wrong(field, "a list of CEL expressions", &other);
                return None;
            }
        };
        let mut sources = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match item {
                serde_yaml::Value::String(source) => sources.push(source),
                other => self.wrong(&format!("{field}[{i}]"), "a CEL expression as text", &other),
            }
        }
        Some(sources)
    }
}

impl RawLimit {
    /// Reads an entry: its fields, and a problem for each field that is missing, unknown or of
    /// the wrong type.
    fn read(entry: serde_yaml::Value) -> (Option<RawLimit>, Vec<String>) {
        let serde_yaml::Value::Mapping(mapping) = entry else {
            let problem = format!(
                "expected a mapping with the fields namespace, max_value, seconds, …; found {}",
                describe(&entry)
            );
            return (None, vec![problem]);
        };
        let mut problems = Vec::new();
        for key in mapping.keys() {
            match key.as_str() {
                Some(field) if FIELDS.contains(&field) => {}
                Some(field) => problems.push(format!(
                    "unknown field `{field}`, expected one of {}",
                    FIELDS.map(|f| format!("`{f}`")).join(", ")
                )),
                None => problems.push(format!("a key that is not a text: {}", describe(key))),
            }
        }
        // A calendar quota has `calendar` instead of `seconds`.
        let has_calendar = mapping.get("calendar").is_some_and(|v| !v.is_null());
        let mut reader = FieldReader { mapping, problems };
        let raw = RawLimit {
            namespace: reader.text("namespace", true),
            max_value: reader.count("max_value", true),
            seconds: reader.count("seconds", !has_calendar),
            name: reader.text("name", false),
            id: reader.text("id", false),
            conditions: reader.expressions("conditions"),
            variables: reader.expressions("variables"),
            algorithm: reader.text("algorithm", false),
            refill_tokens: reader.count("refill_tokens", false),
            calendar: reader.text("calendar", false),
            timezone: reader.text("timezone", false),
            cost: reader.text("cost", false),
        };
        (Some(raw), reader.problems)
    }
}

/// Loads and validates a limits file.
pub fn load_file(path: &Path) -> Result<LimitSet, LimitsError> {
    let bytes = std::fs::read(path).map_err(|e| LimitsError {
        file: path.display().to_string(),
        problems: vec![format!("cannot read it: {e}")],
    })?;
    load_bytes(path, &bytes)
}

/// Limits from the bytes read from `path`. The set remembers their digest, so the watcher
/// knows which version of the file is in force without reading it again.
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<LimitSet, LimitsError> {
    let file = path.display().to_string();
    let text = std::str::from_utf8(bytes).map_err(|e| LimitsError {
        file: file.clone(),
        problems: vec![format!("not UTF-8: {e}")],
    })?;
    let limits = parse_limits(&file, text)?;
    Ok(LimitSet::new(limits).from_content(digest(bytes)))
}

/// A fingerprint of a file's content, to tell versions apart.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Parses limits from YAML text; `file` names the source in errors.
pub fn parse_limits(file: &str, text: &str) -> Result<Vec<Limit>, LimitsError> {
    let fail = |problems: Vec<String>| LimitsError {
        file: file.to_string(),
        problems,
    };
    let document: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| fail(vec![format!("not valid YAML: {e}")]))?;
    let entries = match document {
        serde_yaml::Value::Null => Vec::new(),
        serde_yaml::Value::Sequence(entries) => entries,
        _ => {
            return Err(fail(vec![
                "expected a list of limits at the top level".into(),
            ]));
        }
    };

    let mut problems = Vec::new();
    let mut limits = Vec::new();
    let mut seen: HashMap<u64, String> = HashMap::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let label = entry_label(index, &entry);
        match build_limit(entry) {
            Ok(limit) => {
                if let Some(first) = seen.get(&limit.key) {
                    problems.push(format!(
                        "{label}: same namespace, seconds, conditions and variables (or id) as \
                         {first}; the two would share counters"
                    ));
                } else {
                    seen.insert(limit.key, label);
                    limits.push(limit);
                }
            }
            Err(entry_problems) => problems.extend(
                entry_problems
                    .into_iter()
                    .map(|problem| format!("{label}: {problem}")),
            ),
        }
    }
    if problems.is_empty() {
        Ok(limits)
    } else {
        Err(fail(problems))
    }
}

/// "entry #2 (name "free", namespace "llm/route")", from whatever the raw entry has.
fn entry_label(index: usize, entry: &serde_yaml::Value) -> String {
    let mut label = format!("entry #{}", index + 1);
    let described: Vec<String> = ["name", "id", "namespace"]
        .iter()
        .filter_map(|field| {
            entry
                .get(field)
                .and_then(serde_yaml::Value::as_str)
                .map(|v| format!("{field} {v:?}"))
        })
        .collect();
    if !described.is_empty() {
        label.push_str(&format!(" ({})", described.join(", ")));
    }
    label
}

fn build_limit(entry: serde_yaml::Value) -> Result<Limit, Vec<String>> {
    let (raw, mut problems) = RawLimit::read(entry);
    let Some(raw) = raw else {
        return Err(problems);
    };
    if raw.namespace.as_deref() == Some("") {
        problems.push("field `namespace` must not be empty".to_string());
    }
    if let Some(max_value) = raw.max_value
        && max_value > MAX_COUNT
    {
        problems.push(format!(
            "field `max_value` must be at most {MAX_COUNT}, found {max_value}"
        ));
    }
    if raw.seconds == Some(0) {
        problems.push("field `seconds` must be at least 1, found 0".to_string());
    }
    if let Some(seconds) = raw.seconds
        && seconds > MAX_SECONDS
    {
        problems.push(format!(
            "field `seconds` must be at most {MAX_SECONDS} (about 31,700 years; every storage \
             keeps times exact in milliseconds up to there)"
        ));
    }
    for (field, value) in [("name", &raw.name), ("id", &raw.id)] {
        if value.as_deref() == Some("") {
            problems.push(format!("field `{field}` must not be empty when given"));
        }
    }
    let mut kind = match raw.algorithm.as_deref().unwrap_or("fixed_window") {
        "fixed_window" => AlgorithmKind::FixedWindow,
        "token_bucket" => AlgorithmKind::TokenBucket {
            refill_tokens: raw.refill_tokens,
        },
        "sliding_window" => AlgorithmKind::SlidingWindow,
        "concurrency" => AlgorithmKind::Concurrency,
        unknown => {
            problems.push(format!(
                "field `algorithm`: unknown algorithm {unknown:?} (known: {})",
                ALGORITHMS.join(", ")
            ));
            AlgorithmKind::FixedWindow
        }
    };
    match (kind, raw.refill_tokens, raw.max_value) {
        (AlgorithmKind::TokenBucket { .. }, Some(tokens), Some(max_value))
            if tokens == 0 || tokens > max_value =>
        {
            problems.push(format!(
                "field `refill_tokens` must be between 1 and max_value ({max_value}), found {tokens}"
            ));
        }
        (AlgorithmKind::TokenBucket { .. }, _, _) | (_, None, _) => {}
        (_, Some(_), _) => problems
            .push("field `refill_tokens` only applies to `algorithm: token_bucket`".to_string()),
    }
    // A concurrency counter's slots are holds, and a counter carries at most MAX_HOLDS.
    if let (AlgorithmKind::Concurrency, Some(max_value)) = (kind, raw.max_value)
        && max_value > MAX_HOLDS as u64
    {
        problems.push(format!(
            "field `max_value` of a concurrency limit must be at most {MAX_HOLDS} (the slots \
             one counter carries), found {max_value}"
        ));
    }
    // Continuous buckets and sliding windows compute in token·ms: keep that exact everywhere.
    let exact_in_ms = matches!(
        kind,
        AlgorithmKind::SlidingWindow
            | AlgorithmKind::TokenBucket {
                refill_tokens: None
            }
    );
    if let (true, Some(max_value), Some(seconds)) = (exact_in_ms, raw.max_value, raw.seconds)
        && max_value.saturating_mul(seconds).saturating_mul(1000) > MAX_COUNT
    {
        problems.push(format!(
            "max_value × seconds × 1000 must be at most {MAX_COUNT} for this algorithm"
        ));
    }
    let calendar = read_calendar(&raw, kind, &mut problems);
    if let Some(calendar) = calendar {
        kind = AlgorithmKind::Calendar(calendar);
    }
    let cost = raw
        .cost
        .as_deref()
        .and_then(|source| match Expression::compile_cost(source) {
            Ok(cost) => Some(cost),
            Err(e) => {
                problems.push(format!("field `cost` ({source:?}): {e}"));
                None
            }
        });
    let mut compile_all = |field: &str, sources: Option<Vec<String>>| -> Vec<Expression> {
        let mut compiled = Vec::new();
        for (i, source) in sources.unwrap_or_default().iter().enumerate() {
            match Expression::compile(source) {
                Ok(expression) => compiled.push(expression),
                Err(e) => problems.push(format!("field `{field}[{i}]` ({source:?}): {e}")),
            }
        }
        compiled
    };
    let conditions = compile_all("conditions", raw.conditions);
    let variables = compile_all("variables", raw.variables);
    let seconds = calendar.map(|c| c.period.nominal_seconds()).or(raw.seconds);
    let (Some(namespace), Some(max_value), Some(seconds)) = (raw.namespace, raw.max_value, seconds)
    else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let fields = LimitFields {
        namespace,
        max_value,
        seconds,
        name: raw.name,
        id: raw.id,
        kind,
    };
    Ok(Limit::new(fields, conditions, variables).with_cost(cost))
}

/// A calendar quota's `calendar` and `timezone`, with a problem for each misuse: both
/// `seconds` and `calendar`, `calendar` on an algorithm other than the fixed window, `timezone`
/// without `calendar`, an unknown period or zone.
fn read_calendar(
    raw: &RawLimit,
    kind: AlgorithmKind,
    problems: &mut Vec<String>,
) -> Option<Calendar> {
    let Some(period) = raw.calendar.as_deref() else {
        if raw.timezone.is_some() {
            problems.push("field `timezone` only applies with `calendar`".to_string());
        }
        return None;
    };
    let mut fine = true;
    if raw.seconds.is_some() {
        problems.push(
            "field `calendar`: a limit has `seconds` or `calendar`, not both (remove one)"
                .to_string(),
        );
        fine = false;
    }
    if kind != AlgorithmKind::FixedWindow {
        problems.push(format!(
            "field `calendar` only applies to `algorithm: fixed_window`, found `algorithm: {}`",
            raw.algorithm.as_deref().unwrap_or("")
        ));
        fine = false;
    }
    let period = period
        .parse::<Period>()
        .map_err(|e| problems.push(format!("field `calendar`: {e}")))
        .ok();
    let zone = calendar::zone(raw.timezone.as_deref().unwrap_or("UTC"))
        .map_err(|e| problems.push(format!("field `timezone`: {e}")))
        .ok();
    match (period, zone) {
        (Some(period), Some(zone)) if fine => Some(Calendar::new(period, zone)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse_limits("test.yaml", text).err().unwrap().problems
    }

    #[test]
    fn parses_limitador_format() {
        let limits = parse_limits(
            "test.yaml",
            r#"
- name: free
  namespace: llm/llm-route
  max_value: 50
  seconds: 60
  conditions: ['descriptors[0]["tokenlimit.free__065bb34d"] == "1"']
  variables: ['descriptors[0]["auth.identity.userid"]']
- namespace: other
  max_value: 5
  seconds: 1
  conditions:
  variables: []
"#,
        )
        .unwrap();
        assert_eq!(limits.len(), 2);
        assert_eq!(limits[0].name.as_deref(), Some("free"));
        assert_eq!(limits[0].variables.len(), 1);
        assert!(limits[1].conditions.is_empty());
    }

    #[test]
    fn seconds_are_bounded_for_every_algorithm() {
        for algorithm in ALGORITHMS {
            let entry = |seconds: u64| {
                format!(
                    "- {{namespace: a, max_value: 0, seconds: {seconds}, algorithm: {algorithm}}}"
                )
            };
            assert!(
                parse_limits("t", &entry(MAX_SECONDS)).is_ok(),
                "{algorithm}"
            );
            let p = problems(&entry(MAX_SECONDS + 1));
            assert!(
                p[0].contains("`seconds` must be at most 1000000000000"),
                "{p:?}"
            );
        }
    }

    #[test]
    fn an_empty_file_has_no_limits() {
        assert!(parse_limits("t", "").unwrap().is_empty());
        assert!(parse_limits("t", "[]").unwrap().is_empty());
    }

    #[test]
    fn missing_max_value_is_an_error_naming_file_entry_and_field() {
        let err = parse_limits(
            "tiers.yaml",
            "- {namespace: a, max_value: 1, seconds: 1}\n- {name: gold, namespace: a, seconds: 60}\n",
        )
        .err()
        .unwrap();
        let text = err.to_string();
        assert!(text.contains("tiers.yaml"), "{text}");
        assert!(text.contains("entry #2"), "{text}");
        assert!(text.contains("\"gold\""), "{text}");
        assert!(text.contains("max_value"), "{text}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        let p = problems("- {namespace: a, max_value: 1, seconds: 1, max_vale: 3}");
        assert!(p[0].contains("unknown field `max_vale`"), "{p:?}");
        let p = problems("- {namespace: a, max_value: -1, seconds: 1}");
        assert!(p[0].contains("entry #1"), "{p:?}");
        let p = problems("- {namespace: '', max_value: 1, seconds: 0}");
        assert_eq!(p.len(), 2, "{p:?}");
        let p = problems("- {namespace: a, max_value: 1, seconds: 1, algorithm: leaky}");
        assert!(p[0].contains("algorithm"), "{p:?}");
        assert!(!problems("{namespace: a}")[0].is_empty());
    }

    #[test]
    fn every_problem_of_an_entry_is_reported_with_its_field_and_value() {
        let p = problems(
            "- name: gold\n  namespace: ''\n  max_value: -5\n  seconds: '60'\n  \
             conditions: \"descriptors[0].x == 'y'\"\n  variables: ['descriptors[0].u', 3]\n  \
             max_vale: 3\n- 42\n- {namespace: b, seconds: 60, max_value: 1.5}\n",
        );
        let expected = [
            "entry #1 (name \"gold\", namespace \"\"): unknown field `max_vale`, expected one of",
            "entry #1 (name \"gold\", namespace \"\"): field `max_value`: expected a whole number >= 0, found -5",
            "entry #1 (name \"gold\", namespace \"\"): field `seconds`: expected a whole number >= 0, found \"60\"",
            "entry #1 (name \"gold\", namespace \"\"): field `conditions`: expected a list of CEL expressions, found \"descriptors[0].x == 'y'\"",
            "entry #1 (name \"gold\", namespace \"\"): field `variables[1]`: expected a CEL expression as text, found 3",
            "entry #1 (name \"gold\", namespace \"\"): field `namespace` must not be empty",
            "entry #2: expected a mapping with the fields namespace, max_value, seconds, …; found 42",
            "entry #3 (namespace \"b\"): field `max_value`: expected a whole number >= 0, found 1.5",
        ];
        assert_eq!(p.len(), expected.len(), "{p:#?}");
        for (problem, expected) in p.iter().zip(expected) {
            assert!(
                problem.starts_with(expected),
                "{problem:?} is not {expected:?}"
            );
        }
        // Missing fields are each named; a null counts as missing.
        let p = problems("- {namespace: ~, name: x}");
        assert_eq!(
            p,
            [
                "entry #1 (name \"x\"): missing field `namespace`",
                "entry #1 (name \"x\"): missing field `max_value`",
                "entry #1 (name \"x\"): missing field `seconds`",
            ]
        );
    }

    #[test]
    fn cel_errors_name_the_expression() {
        let p = problems(
            "- {namespace: a, max_value: 1, seconds: 1, conditions: ['ok == 1', 'descriptors[0]['], variables: ['x']}",
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("conditions[0]"), "{p:?}");
        assert!(p[1].contains("conditions[1]"), "{p:?}");
        assert!(p[2].contains("variables[0]"), "{p:?}");
    }

    #[test]
    fn limits_that_would_share_counters_are_rejected() {
        let p = problems(
            "- {namespace: a, max_value: 1, seconds: 60}\n- {namespace: a, max_value: 9, seconds: 60}",
        );
        assert!(
            p[0].contains("entry #2") && p[0].contains("entry #1"),
            "{p:?}"
        );
        // Same shape in another namespace, or another window, is a different limit.
        assert!(
            parse_limits(
                "t",
                "- {namespace: a, max_value: 1, seconds: 60}\n- {namespace: b, max_value: 1, seconds: 60}\n- {namespace: a, max_value: 1, seconds: 1}"
            )
            .is_ok()
        );
    }

    #[test]
    fn calendar_quotas_are_fixed_windows_without_seconds() {
        let limits = parse_limits(
            "t",
            "- {namespace: a, max_value: 1000, calendar: month, timezone: Europe/Paris, cost: 'hits * 2u'}\n\
             - {namespace: a, max_value: 10, calendar: day}",
        )
        .unwrap();
        let month = limits[0].calendar().unwrap();
        assert_eq!(
            (month.period, month.zone.name()),
            (Period::Month, "Europe/Paris")
        );
        assert_eq!(limits[0].seconds, 30 * 86_400, "its nominal length");
        assert_eq!(limits[1].calendar().unwrap().zone.name(), "UTC");
        assert_eq!(
            limits[0].cost.as_ref().map(|c| c.source()),
            Some("hits * 2u")
        );
        // Another identity than the same limit with `seconds`, or with another zone.
        let seconds =
            parse_limits("t", "- {namespace: a, max_value: 1000, seconds: 2592000}").unwrap();
        let utc = parse_limits("t", "- {namespace: a, max_value: 1000, calendar: month}").unwrap();
        assert_ne!(limits[0].key, seconds[0].key);
        assert_ne!(limits[0].key, utc[0].key);
        assert_ne!(seconds[0].key, utc[0].key);
    }

    #[test]
    fn calendar_and_cost_misuse_is_an_error_naming_the_field() {
        let cases = [
            (
                "calendar: month, seconds: 60",
                "field `calendar`: a limit has `seconds` or `calendar`, not both",
            ),
            (
                "calendar: month, algorithm: token_bucket",
                "field `calendar` only applies to `algorithm: fixed_window`, found `algorithm: token_bucket`",
            ),
            (
                "calendar: month, algorithm: sliding_window",
                "field `calendar` only applies to `algorithm: fixed_window`",
            ),
            (
                "calendar: fortnight",
                "field `calendar`: unknown calendar period \"fortnight\"",
            ),
            (
                "calendar: month, timezone: Mars/Olympus",
                "field `timezone`: unknown time zone \"Mars/Olympus\"",
            ),
            (
                "seconds: 60, timezone: UTC",
                "field `timezone` only applies with `calendar`",
            ),
            (
                "seconds: 60, cost: 'tokens * 2'",
                "field `cost` (\"tokens * 2\"): unknown variable `tokens`",
            ),
            (
                "seconds: 60, cost: 'uint('",
                "field `cost` (\"uint(\"): invalid CEL",
            ),
            ("calendar: 3", "field `calendar`: expected a text, found 3"),
        ];
        for (fields, expected) in cases {
            let p = problems(&format!("- {{namespace: a, max_value: 1, {fields}}}"));
            assert_eq!(p.len(), 1, "{fields}: {p:?}");
            assert!(
                p[0].starts_with(&format!("entry #1 (namespace \"a\"): {expected}")),
                "{fields}: {p:?}"
            );
        }
        // Without `calendar`, `seconds` is still required.
        let p = problems("- {namespace: a, max_value: 1}");
        assert_eq!(p, ["entry #1 (namespace \"a\"): missing field `seconds`"]);
    }

    #[test]
    fn identity_ignores_max_value_and_name_so_counters_survive_edits() {
        let a = parse_limits("t", "- {namespace: a, max_value: 1, seconds: 60, name: x}").unwrap();
        let b = parse_limits("t", "- {namespace: a, max_value: 7, seconds: 60, name: y}").unwrap();
        assert_eq!(a[0].key, b[0].key);
        let c = parse_limits("t", "- {namespace: a, max_value: 1, seconds: 61}").unwrap();
        assert_ne!(a[0].key, c[0].key);
    }

    #[test]
    fn a_concurrency_limit_has_its_own_identity_and_at_most_max_holds_slots() {
        let window = parse_limits("t", "- {namespace: a, max_value: 4, seconds: 60}").unwrap();
        let slots = "- {namespace: a, max_value: 4, seconds: 60, algorithm: concurrency}";
        let slots = parse_limits("t", slots).unwrap();
        assert_ne!(window[0].key, slots[0].key);
        assert_eq!(slots[0].view().algorithm, Some("concurrency"));
        let p = problems("- {namespace: a, max_value: 1001, seconds: 60, algorithm: concurrency}");
        assert!(
            p[0].contains("`max_value` of a concurrency limit must be at most 1000"),
            "{p:?}"
        );
        let p = problems(
            "- {namespace: a, max_value: 4, seconds: 60, algorithm: concurrency, refill_tokens: 1}",
        );
        assert!(p[0].contains("refill_tokens"), "{p:?}");
    }
}
