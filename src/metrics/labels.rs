//! Custom labels on `authorized_calls`, `authorized_hits` and `limited_calls`, from the
//! request's descriptors: Limitador's `-L/--custom-metric-labels FILE` (a YAML map of label
//! name → CEL expression giving the value) and `--metric-labels-default CEL` (one expression
//! giving a map of label name → value). Expressions see `descriptors`, as limits do.
//!
//! Cardinality is bounded: each label takes at most [`MAX_VALUES_PER_LABEL`] distinct values
//! (in the order first seen), later values are [`OTHER_VALUE`]; the default expression adds at
//! most [`MAX_DEFAULT_LABELS`] distinct label names, later names are left out.
//!
//! The file is reloaded when its content changes ([`watch_labels_file`], as Limitador does); a
//! new version that does not parse is logged and the labels in force are kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::limits::{Expression, Input};
use crate::request::Descriptor;

/// Distinct values one label takes before the others become [`OTHER_VALUE`].
pub const MAX_VALUES_PER_LABEL: usize = 100;
/// The value of a label past its first [`MAX_VALUES_PER_LABEL`] values.
pub const OTHER_VALUE: &str = "other";
/// Distinct label names `--metric-labels-default` may add; later names are left out.
pub const MAX_DEFAULT_LABELS: usize = 16;
/// Labels ratekeeper sets itself, which no custom label may replace.
const RESERVED: [&str; 2] = [super::NAMESPACE, super::LIMIT_NAME];

/// The configured labels and the values seen so far.
pub struct MetricLabels {
    /// `-L`: label name → expression, by name.
    named: ArcSwap<Vec<(String, Expression)>>,
    /// `--metric-labels-default`.
    default: Option<Expression>,
    /// Label name → the values admitted so far (at most [`MAX_VALUES_PER_LABEL`] each; at most
    /// [`MAX_DEFAULT_LABELS`] names beyond the file's).
    seen: Mutex<HashMap<String, HashSet<String>>>,
}

impl MetricLabels {
    /// The labels of `--metric-labels-default` (`default`) and of the `-L` file (`named`, as
    /// [`parse_labels_file`] reads it), or `None` when neither is set. A label both define
    /// takes the file's value.
    pub fn new(
        default: Option<&str>,
        named: Option<Vec<(String, Expression)>>,
    ) -> Result<Option<Self>, String> {
        let default = match default {
            Some(source) => {
                Some(compile(source).map_err(|e| format!("--metric-labels-default: {e}"))?)
            }
            None => None,
        };
        if default.is_none() && named.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            named: ArcSwap::from_pointee(named.unwrap_or_default()),
            default,
            seen: Mutex::new(HashMap::new()),
        }))
    }

    /// The custom labels of a request, by name, their values bounded. Labels whose expression
    /// does not resolve on this request (a missing descriptor or key, a wrong type) are left out,
    /// as Limitador does.
    pub fn of(&self, descriptors: &[Descriptor]) -> Vec<(String, String)> {
        let input = Input::new(descriptors);
        let mut labels: BTreeMap<String, String> = BTreeMap::new();
        if let Some(default) = &self.default
            && let Ok(entries) = default.to_string_map(&input)
        {
            labels.extend(
                entries
                    .into_iter()
                    .filter(|(name, _)| is_label_name(name) && !RESERVED.contains(&name.as_str())),
            );
        }
        let named = self.named.load();
        for (name, expression) in named.iter() {
            if let Ok(value) = expression.to_key_part(&input, None) {
                labels.insert(name.clone(), value.into_owned());
            }
        }
        if labels.is_empty() {
            return Vec::new();
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut bounded = Vec::with_capacity(labels.len());
        for (name, value) in labels {
            let is_named = |name: &str| named.iter().any(|(n, _)| n == name);
            if !seen.contains_key(&name) && !is_named(&name) {
                let default_names = seen.keys().filter(|n| !is_named(n)).count();
                if default_names >= MAX_DEFAULT_LABELS {
                    continue;
                }
            }
            let values = seen.entry(name.clone()).or_default();
            let value = if values.contains(&value) {
                value
            } else if values.len() < MAX_VALUES_PER_LABEL {
                values.insert(value.clone());
                value
            } else {
                OTHER_VALUE.to_string()
            };
            bounded.push((name, value));
        }
        bounded
    }
}

impl MetricLabels {
    /// Puts a new version of the file's labels in force. Values are counted afresh (each
    /// reload may admit up to [`MAX_VALUES_PER_LABEL`] new values per label).
    pub fn replace_named(&self, named: Vec<(String, Expression)>) {
        self.named.store(Arc::new(named));
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }
}

/// How often the labels file is read for changes.
pub const LABELS_POLL: Duration = Duration::from_secs(1);

/// Reads `path` every [`LABELS_POLL`] and puts each new content in force once it has stayed
/// the same for one more read (so a file caught half-written is not applied); content that
/// does not parse is logged once and the labels in force are kept. Runs until the runtime ends.
pub async fn watch_labels_file(path: PathBuf, labels: Arc<MetricLabels>) {
    let mut applied = std::fs::read(&path).ok();
    let mut last_read = applied.clone();
    let mut interval = tokio::time::interval(LABELS_POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let read = std::fs::read(&path).ok();
        let settled = read == last_read;
        last_read = read.clone();
        let Some(content) = read.filter(|_| settled) else {
            continue;
        };
        if applied.as_ref() == Some(&content) {
            continue;
        }
        applied = Some(content.clone());
        let parsed = std::str::from_utf8(&content)
            .map_err(|e| e.to_string())
            .and_then(parse_labels);
        match parsed {
            Ok(named) => {
                tracing::info!(file = %path.display(), labels = named.len(), "metric labels reloaded");
                labels.replace_named(named);
            }
            Err(error) => tracing::error!(
                file = %path.display(),
                %error,
                "the metric labels file could not be applied; the labels in force are kept"
            ),
        }
    }
}

/// Reads Limitador's custom labels file: a YAML map of label name → CEL expression. Every
/// problem is an error (an invalid or reserved label name, an expression that does not
/// compile or reads anything but `descriptors`).
pub fn parse_labels_file(path: &Path) -> Result<Vec<(String, Expression)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the metric labels file {}: {e}", path.display()))?;
    parse_labels(&text).map_err(|e| format!("metric labels file {}: {e}", path.display()))
}

/// The labels of a custom labels file's text, by name.
pub fn parse_labels(text: &str) -> Result<Vec<(String, Expression)>, String> {
    let map: BTreeMap<String, String> = serde_yaml::from_str(text).map_err(|e| {
        format!("expected a map of label name to CEL expression (as a string): {e}")
    })?;
    let mut labels = Vec::with_capacity(map.len());
    for (name, source) in map {
        if !is_label_name(&name) {
            return Err(format!(
                "`{name}` is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"
            ));
        }
        if RESERVED.contains(&name.as_str()) {
            return Err(format!("`{name}` is a label ratekeeper sets itself"));
        }
        let expression = compile(&source).map_err(|e| format!("label `{name}`: {e}"))?;
        labels.push((name, expression));
    }
    Ok(labels)
}

/// Compiles a label expression: like a limit's, but only `descriptors` is defined.
fn compile(source: &str) -> Result<Expression, String> {
    let expression = Expression::compile(source)?;
    if expression.reads_limit() {
        return Err(format!(
            "`{source}` reads `limit`: label expressions see only `descriptors`"
        ));
    }
    Ok(expression)
}

/// Whether `name` is a valid Prometheus label name that is not reserved for Prometheus (`__`).
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.starts_with("__")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(entries: &[&[(&str, &str)]]) -> Vec<Descriptor> {
        entries.iter().map(|e| Descriptor::of(e)).collect()
    }

    #[test]
    fn the_file_is_a_map_of_names_to_expressions() {
        let labels =
            parse_labels("user: descriptors[0].user\nmodel: \"descriptors[0]['model']\"\n")
                .expect("valid file");
        let names: Vec<&str> = labels.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["model", "user"]);
        for bad in [
            "- a\n- b\n",
            "user: \"descriptors[0].\"\n",
            "\"bad-name\": descriptors[0].user\n",
            "__x: descriptors[0].user\n",
            "limitador_namespace: descriptors[0].user\n",
            "user: limit.name\n",
            "user: request.path\n",
        ] {
            assert!(parse_labels(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn labels_come_from_the_file_and_the_default_map() {
        let named = parse_labels("user: descriptors[0].user\nn: descriptors[0].n\n").unwrap();
        let labels = MetricLabels::new(
            Some("{'tier': descriptors[1].tier, 'user': 'x'}"),
            Some(named),
        )
        .unwrap()
        .unwrap();
        let got = labels.of(&request(&[&[("user", "alice")], &[("tier", "gold")]]));
        assert_eq!(
            got,
            [
                ("tier".into(), "gold".into()),
                ("user".into(), "alice".into())
            ],
            "the file wins over the default map, and a missing key leaves its label out"
        );
        assert_eq!(labels.of(&request(&[])), Vec::<(String, String)>::new());
    }

    #[test]
    fn each_label_takes_a_bounded_number_of_values() {
        let named = parse_labels("user: descriptors[0].user\n").unwrap();
        let labels = MetricLabels::new(None, Some(named)).unwrap().unwrap();
        for i in 0..MAX_VALUES_PER_LABEL {
            let user = format!("u{i}");
            assert_eq!(labels.of(&request(&[&[("user", &user)]]))[0].1, user);
        }
        assert_eq!(
            labels.of(&request(&[&[("user", "late")]]))[0].1,
            OTHER_VALUE
        );
        assert_eq!(labels.of(&request(&[&[("user", "u0")]]))[0].1, "u0");
    }

    #[test]
    fn the_default_map_adds_a_bounded_number_of_names() {
        let labels = MetricLabels::new(Some("descriptors[0]"), None)
            .unwrap()
            .unwrap();
        for i in 0..MAX_DEFAULT_LABELS {
            let name = format!("l{i:02}");
            assert_eq!(labels.of(&request(&[&[(&name, "v")]])).len(), 1);
        }
        assert!(labels.of(&request(&[&[("late", "v")]])).is_empty());
        assert!(
            labels
                .of(&request(&[&[("bad-name", "v"), ("limit_name", "v")]]))
                .is_empty(),
            "invalid and reserved names are left out"
        );
    }
}
