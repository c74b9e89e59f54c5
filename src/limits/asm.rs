//! Alibaba ASM's own rate limit configuration: the JSON list of rules its example token rate
//! limit service reads from the environment variable `RATE_LIMIT_CONFIG`, turned into ordinary
//! token-bucket [`Limit`]s, so the limiter needs nothing of its own for them.
//!
//! A rule `{rate_limit_key_regex, max_tokens, tokens_per_fill, fill_interval_second,
//! redis_expired_seconds}` is a bucket per distinct key: capacity `max_tokens`, starting full,
//! `+tokens_per_fill` every `fill_interval_second`. ASM's matching is kept: the regex is
//! unanchored (Go's `MatchString`), and the first rule whose regex matches the key wins, so rule
//! `i` becomes a limit with the conditions `descriptors[0].key.matches(r_i)` and
//! `!descriptors[0].key.matches(r_j)` for every earlier rule `j`. A key no rule matches is not
//! limited.
//!
//! Regexes are those of the `regex` crate (RE2's syntax, as Go's `regexp`); each is compiled
//! here, so a bad one is refused at start and never reaches a request. `redis_expired_seconds`
//! is validated but does not shorten a bucket's life: ratekeeper forgets a bucket once refills
//! have made it full again, when forgetting it changes nothing.

use std::fmt;

use serde_json::Value;

use super::{AlgorithmKind, Expression, Limit, LimitFields};
use crate::algorithm::MAX_COUNT;

/// The environment variable ASM's example service reads its rules from.
pub const RATE_LIMIT_CONFIG: &str = "RATE_LIMIT_CONFIG";

/// The fields of a rule; every one is required.
const FIELDS: [&str; 5] = [
    "rate_limit_key_regex",
    "max_tokens",
    "tokens_per_fill",
    "fill_interval_second",
    "redis_expired_seconds",
];

/// Every problem found in `RATE_LIMIT_CONFIG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsmConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for AsmConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {RATE_LIMIT_CONFIG}:")?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for AsmConfigError {}

/// The limits of `RATE_LIMIT_CONFIG`'s rules (`json`), in the namespace `namespace`, in rule
/// order. Any problem refuses the whole configuration.
pub fn parse_rate_limit_config(json: &str, namespace: &str) -> Result<Vec<Limit>, AsmConfigError> {
    let fail = |problem: String| AsmConfigError {
        problems: vec![problem],
    };
    let document: Value = serde_json::from_str(json)
        .map_err(|e| fail(format!("not valid JSON: {e} (expected a list of rules)")))?;
    let Value::Array(rules) = document else {
        return Err(fail(
            "expected a JSON list of rules at the top level".into(),
        ));
    };
    if namespace.is_empty() {
        return Err(fail("the ASM namespace (--asm-namespace) is empty".into()));
    }
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        match Rule::parse(rule) {
            Ok(rule) => parsed.push(rule),
            Err(rule_problems) => {
                let label = rule_label(index, rule);
                problems.extend(rule_problems.into_iter().map(|p| format!("{label}: {p}")));
            }
        }
    }
    if !problems.is_empty() {
        return Err(AsmConfigError { problems });
    }
    let mut limits = Vec::with_capacity(parsed.len());
    for (index, rule) in parsed.iter().enumerate() {
        let earlier = &parsed[..index];
        let limit = rule.to_limit(namespace, earlier).map_err(|e| {
            fail(format!(
                "{}: field `rate_limit_key_regex`: {e}",
                rule_label(index, &rules[index])
            ))
        })?;
        limits.push(limit);
    }
    Ok(limits)
}

/// "rule #2 (index 1, rate_limit_key_regex "subscriber.*")".
fn rule_label(index: usize, rule: &Value) -> String {
    match rule.get("rate_limit_key_regex").and_then(Value::as_str) {
        Some(regex) => format!(
            "rule #{} (index {index}, rate_limit_key_regex {regex:?})",
            index + 1
        ),
        None => format!("rule #{} (index {index})", index + 1),
    }
}

/// One validated rule.
struct Rule {
    regex: String,
    max_tokens: u64,
    tokens_per_fill: u64,
    fill_interval_second: u64,
}

impl Rule {
    fn parse(rule: &Value) -> Result<Rule, Vec<String>> {
        let Value::Object(fields) = rule else {
            return Err(vec![format!(
                "expected an object with the fields {}",
                FIELDS.join(", ")
            )]);
        };
        let mut problems = Vec::new();
        for name in fields.keys() {
            if !FIELDS.contains(&name.as_str()) {
                problems.push(format!(
                    "unknown field `{name}` (expected: {})",
                    FIELDS.join(", ")
                ));
            }
        }
        let regex = match fields.get("rate_limit_key_regex") {
            Some(Value::String(regex)) => match regex::Regex::new(regex) {
                Ok(_) => Some(regex.clone()),
                Err(e) => {
                    // The regex crate's message spans lines (the pattern, a caret, the error).
                    let message: Vec<String> = e
                        .to_string()
                        .lines()
                        .map(|l| l.trim().to_string())
                        .collect();
                    problems.push(format!(
                        "field `rate_limit_key_regex`: invalid regex: {}",
                        message.join(" ")
                    ));
                    None
                }
            },
            Some(_) => {
                problems.push("field `rate_limit_key_regex` must be a string".to_string());
                None
            }
            None => {
                problems.push("missing field `rate_limit_key_regex`".to_string());
                None
            }
        };
        let mut number = |name: &str| -> Option<u64> {
            let Some(value) = fields.get(name) else {
                problems.push(format!("missing field `{name}`"));
                return None;
            };
            match value.as_u64() {
                Some(n) if (1..=MAX_COUNT).contains(&n) => Some(n),
                _ => {
                    problems.push(format!(
                        "field `{name}` must be a positive whole number (at most {MAX_COUNT}), \
                         not {value}"
                    ));
                    None
                }
            }
        };
        let max_tokens = number("max_tokens");
        let tokens_per_fill = number("tokens_per_fill");
        let fill_interval_second = number("fill_interval_second");
        let _ = number("redis_expired_seconds");
        match (regex, max_tokens, tokens_per_fill, fill_interval_second) {
            (Some(regex), Some(max_tokens), Some(tokens_per_fill), Some(fill_interval_second))
                if problems.is_empty() =>
            {
                Ok(Rule {
                    regex,
                    max_tokens,
                    // A fill larger than the bucket fills it, as in ASM.
                    tokens_per_fill: tokens_per_fill.min(max_tokens),
                    fill_interval_second,
                })
            }
            _ => Err(problems),
        }
    }

    /// The limit of this rule, which applies to the keys its regex matches and no `earlier`
    /// rule's does.
    fn to_limit(&self, namespace: &str, earlier: &[Rule]) -> Result<Limit, String> {
        let mut conditions = vec![Expression::compile(&key_matches(&self.regex))?];
        for rule in earlier {
            conditions.push(Expression::compile(&format!(
                "!{}",
                key_matches(&rule.regex)
            ))?);
        }
        let variables = vec![Expression::compile("descriptors[0].key")?];
        let fields = LimitFields {
            namespace: namespace.to_string(),
            max_value: self.max_tokens,
            seconds: self.fill_interval_second,
            name: Some(self.regex.clone()),
            id: None,
            kind: AlgorithmKind::TokenBucket {
                refill_tokens: Some(self.tokens_per_fill),
            },
        };
        Ok(Limit::new(fields, conditions, variables))
    }
}

/// `descriptors[0].key.matches('<regex>')`, the regex written as a CEL string literal.
fn key_matches(regex: &str) -> String {
    format!("descriptors[0].key.matches({})", cel_string(regex))
}

/// `text` as a CEL single-quoted string literal whose value is exactly `text`.
fn cel_string(text: &str) -> String {
    let mut literal = String::with_capacity(text.len() + 2);
    literal.push('\'');
    for c in text.chars() {
        match c {
            '\\' => literal.push_str("\\\\"),
            '\'' => literal.push_str("\\'"),
            '\n' => literal.push_str("\\n"),
            '\r' => literal.push_str("\\r"),
            '\t' => literal.push_str("\\t"),
            c if c.is_control() => literal.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => literal.push(c),
        }
    }
    literal.push('\'');
    literal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Input, KeyValues};
    use crate::request::Descriptor;

    const TUTORIAL: &str = r#"[
        {"rate_limit_key_regex": "regular-user.*", "max_tokens": 200, "tokens_per_fill": 50,
         "fill_interval_second": 30, "redis_expired_seconds": 300},
        {"rate_limit_key_regex": "subscriber.*", "max_tokens": 1000, "tokens_per_fill": 100,
         "fill_interval_second": 60, "redis_expired_seconds": 600}
    ]"#;

    /// The names of the limits that apply to `key` (the rule's regex), with their counter.
    fn applying(limits: &[Limit], key: &str) -> Vec<(String, String)> {
        let descriptors = [Descriptor::of(&[("key", key)])];
        let input = Input::new(&descriptors);
        let mut values = KeyValues::new();
        let mut found = Vec::new();
        for limit in limits {
            if limit.applies(&input, &mut values) == Ok(true) {
                let name = limit.name.clone().unwrap_or_default();
                found.push((name, values.join("|")));
            }
        }
        found
    }

    fn problems(json: &str) -> Vec<String> {
        parse_rate_limit_config(json, "asm").err().unwrap().problems
    }

    #[test]
    fn the_tutorials_rules_are_token_buckets_per_key() {
        let limits = parse_rate_limit_config(TUTORIAL, "asm").unwrap();
        assert_eq!(limits.len(), 2);
        let regular = &limits[0];
        assert_eq!(regular.namespace, "asm");
        assert_eq!(regular.max_value, 200);
        assert_eq!(regular.seconds, 30);
        assert_eq!(
            regular.kind,
            AlgorithmKind::TokenBucket {
                refill_tokens: Some(50)
            }
        );
        assert_eq!(limits[1].max_value, 1000);
        assert_eq!(limits[1].seconds, 60);
        assert_eq!(
            applying(&limits, "regular-user"),
            [("regular-user.*".into(), "regular-user".into())]
        );
        assert_eq!(
            applying(&limits, "subscriber"),
            [("subscriber.*".into(), "subscriber".into())]
        );
        assert!(applying(&limits, "guest").is_empty());
    }

    /// Go's `MatchString`: the regex may match anywhere in the key.
    #[test]
    fn regexes_are_unanchored() {
        let limits = parse_rate_limit_config(TUTORIAL, "asm").unwrap();
        for key in ["regular-user", "regular-user-1", "x-regular-user-1"] {
            assert_eq!(applying(&limits, key).len(), 1, "{key}");
            assert_eq!(applying(&limits, key)[0].1, key, "one bucket per key");
        }
        let anchored = r#"[{"rate_limit_key_regex": "^vip$", "max_tokens": 1, "tokens_per_fill": 1,
            "fill_interval_second": 1, "redis_expired_seconds": 1}]"#;
        let limits = parse_rate_limit_config(anchored, "asm").unwrap();
        assert_eq!(applying(&limits, "vip").len(), 1);
        assert!(applying(&limits, "vip2").is_empty());
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let json = r#"[
            {"rate_limit_key_regex": "gold", "max_tokens": 5, "tokens_per_fill": 1, "fill_interval_second": 1, "redis_expired_seconds": 1},
            {"rate_limit_key_regex": "user", "max_tokens": 9, "tokens_per_fill": 1, "fill_interval_second": 1, "redis_expired_seconds": 1},
            {"rate_limit_key_regex": ".*", "max_tokens": 7, "tokens_per_fill": 1, "fill_interval_second": 1, "redis_expired_seconds": 1}
        ]"#;
        let limits = parse_rate_limit_config(json, "asm").unwrap();
        let names = |key| {
            applying(&limits, key)
                .into_iter()
                .map(|(name, _)| name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("gold-user"), ["gold"]);
        assert_eq!(names("user-1"), ["user"]);
        assert_eq!(names("anyone"), [".*"]);
    }

    /// Quotes, backslashes and control characters reach the regex as written.
    #[test]
    fn regexes_reach_cel_unchanged() {
        for (regex, matching, other) in [
            (r"^a\d+'b$", "a12'b", "a'b"),
            (r#"\\"x"#, r#"\"x"#, "x"),
            ("tab\there", "tab\there", "tab here"),
            (r"\.", "a.b", "ab"),
        ] {
            let json = serde_json::json!([{"rate_limit_key_regex": regex, "max_tokens": 1,
                "tokens_per_fill": 1, "fill_interval_second": 1, "redis_expired_seconds": 1}]);
            let limits = parse_rate_limit_config(&json.to_string(), "asm").unwrap();
            assert_eq!(
                applying(&limits, matching).len(),
                1,
                "{regex:?} ~ {matching:?}"
            );
            assert!(
                applying(&limits, other).is_empty(),
                "{regex:?} !~ {other:?}"
            );
        }
    }

    #[test]
    fn a_fill_larger_than_the_bucket_fills_it() {
        let json = r#"[{"rate_limit_key_regex": "k", "max_tokens": 10, "tokens_per_fill": 50,
            "fill_interval_second": 1, "redis_expired_seconds": 1}]"#;
        let limits = parse_rate_limit_config(json, "asm").unwrap();
        assert_eq!(
            limits[0].kind,
            AlgorithmKind::TokenBucket {
                refill_tokens: Some(10)
            }
        );
    }

    #[test]
    fn an_empty_list_has_no_limits() {
        assert!(parse_rate_limit_config("[]", "asm").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_rule_and_the_field() {
        let p = problems("not json");
        assert!(p[0].contains("not valid JSON"), "{p:?}");
        let p = problems(r#"{"rate_limit_key_regex": "a"}"#);
        assert!(p[0].contains("list of rules"), "{p:?}");
        let p = problems(
            r#"[{"rate_limit_key_regex": "a", "max_tokens": 1, "tokens_per_fill": 1, "fill_interval_second": 1, "redis_expired_seconds": 1},
                {"rate_limit_key_regex": "(b", "max_tokens": 0, "tokens_per_fill": -1, "fill_interval_second": 1.5}]"#,
        );
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p.iter().all(|p| p.starts_with("rule #2 (index 1")), "{p:?}");
        assert!(
            p[0].contains("`rate_limit_key_regex`: invalid regex"),
            "{p:?}"
        );
        assert!(p[1].contains("`max_tokens` must be a positive"), "{p:?}");
        assert!(p[2].contains("`tokens_per_fill`"), "{p:?}");
        assert!(p[3].contains("`fill_interval_second`"), "{p:?}");
        assert!(
            p[4].contains("missing field `redis_expired_seconds`"),
            "{p:?}"
        );
        let p = problems(r#"[{"rate_limit_key_regex": 3, "max_tokens": "200"}]"#);
        assert!(
            p[0].contains("`rate_limit_key_regex` must be a string"),
            "{p:?}"
        );
        assert!(p[1].contains("`max_tokens`"), "{p:?}");
        let p = problems(
            r#"[{"rate_limit_key_regex": "a", "max_token": 1, "max_tokens": 1, "tokens_per_fill": 1, "fill_interval_second": 1, "redis_expired_seconds": 1}]"#,
        );
        assert!(p[0].contains("unknown field `max_token`"), "{p:?}");
        assert!(problems("[3]")[0].starts_with("rule #1 (index 0)"));
    }

    /// Lookaround and backreferences are not RE2: refused at load, as Go refuses them.
    #[test]
    fn regexes_beyond_re2_are_refused() {
        let json = r#"[{"rate_limit_key_regex": "a(?=b)", "max_tokens": 1, "tokens_per_fill": 1,
            "fill_interval_second": 1, "redis_expired_seconds": 1}]"#;
        assert!(problems(json)[0].contains("invalid regex"));
    }
}
