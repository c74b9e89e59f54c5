//! What operators look at: the Grafana dashboard (deploy/grafana) and the Prometheus alert
//! rules (deploy/prometheus) use only metric names a live server really exports — scraped from
//! real processes, on memory and on Redis, after known traffic that makes every series exist —
//! and the rules pass `promtool check rules` and their own `promtool test rules`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::*;
use common::redis::RedisProcess;
use common::{code, descriptor, descriptor_with_hits, request};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use serde_json::Value;

const LIMITS: &str = r#"
- {name: per-user, namespace: obs, max_value: 5, seconds: 60, variables: ["descriptors[0].user"]}
- {name: broken, namespace: obs, max_value: 5, seconds: 60, conditions: ["descriptors[0].n > 3"]}
"#;

const INSTALL_PROMTOOL: &str = "apt-get install prometheus (Debian's package brings promtool)";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

async fn metrics_text(server: &Server) -> String {
    reqwest::get(format!("http://{}/metrics", server.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls /metrics until it contains `needle` (at most 10 s).
async fn wait_for_metric(server: &Server, needle: &str) {
    let start = Instant::now();
    loop {
        if metrics_text(server).await.contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "/metrics never showed {needle}:\n{}\nlog:\n{}",
            metrics_text(server).await,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sighup(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Traffic that makes every series exist: admitted and refused calls, a charge past a limit, a
/// failing expression, a namespace without limits, HTTP calls, a failed and a good reload.
async fn known_traffic(server: &Server, limits: &Path) {
    let user = |name: &str| descriptor(&[("user", name)]);
    assert_eq!(
        code(&server.should(request("obs", vec![user("a")], 1)).await),
        Code::Ok
    );
    let refused = server.should(request("obs", vec![user("a")], 10)).await;
    assert_eq!(code(&refused), Code::OverLimit);
    // Envoy's charge after the response: counted past the limit (overshoot).
    let charge = descriptor_with_hits(&[("user", "b")], 9);
    assert_eq!(
        code(&server.should(request("obs", vec![charge], 0)).await),
        Code::OverLimit
    );
    // `n > 3` fails on a string: the limit `broken` is skipped (a CEL error).
    let failing = descriptor(&[("user", "a"), ("n", "7")]);
    server.should(request("obs", vec![failing], 1)).await;
    let typo = server.should(request("obz", vec![user("a")], 1)).await;
    assert_eq!(code(&typo), Code::Ok);
    let client = reqwest::Client::new();
    for path in ["/check", "/report", "/check_and_report"] {
        client
            .post(format!("http://{}{path}", server.http))
            .body(r#"{"namespace":"obs","values":{"user":"a"},"delta":1}"#)
            .send()
            .await
            .unwrap();
    }
    // A limits file that cannot be applied, then a good one.
    std::fs::write(limits, "- {namespace: obs, max_value: -5, seconds: 60}\n").unwrap();
    sighup(server);
    wait_for_metric(server, "ratekeeper_limits_reloads{result=\"failed\"}").await;
    std::fs::write(limits, format!("{LIMITS}\n# edited\n")).unwrap();
    sighup(server);
    wait_for_metric(server, "ratekeeper_limits_reloads{result=\"ok\"}").await;
}

/// The metric names of an exposition (histograms as their `_bucket`, `_sum` and `_count`).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// A server with `storage` (the storage subcommand and its arguments), its limits file, and
/// `-l` so per-limit series carry `limit_name` as the dashboard shows them.
async fn start(storage: &[&str]) -> (Server, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let limits = dir.path().join("limits.yaml");
    std::fs::write(&limits, LIMITS).unwrap();
    let args: Vec<&str> = ["-l", limits.to_str().unwrap()]
        .into_iter()
        .chain(storage.iter().copied())
        .collect();
    (Server::start_on_loopback(&args).await, dir, limits)
}

/// What memory and Redis servers export after known traffic, and storage failures: memory's
/// counter capacity reached, Redis gone.
async fn every_exported_name() -> BTreeSet<String> {
    let mut names = BTreeSet::new();

    // Two live counters at most: the third user's call fails (capacity_exhausted).
    let (memory, _dir, limits) = start(&["memory", "--cache", "2"]).await;
    known_traffic(&memory, &limits).await;
    let full = memory
        .try_should(request("obs", vec![descriptor(&[("user", "c")])], 1))
        .await;
    assert!(full.is_err(), "a third counter fits in --cache 2: {full:?}");
    wait_for_metric(&memory, "ratekeeper_active_counters").await;
    wait_for_metric(
        &memory,
        "ratekeeper_storage_errors{kind=\"capacity_exhausted\"}",
    )
    .await;
    names.extend(exported(&metrics_text(&memory).await));

    let mut redis_process = RedisProcess::start();
    let url = redis_process.url();
    let (redis, _dir, limits) = start(&["redis", &url]).await;
    known_traffic(&redis, &limits).await;
    wait_for_metric(&redis, "ratekeeper_storage_may_evict").await;
    redis_process.kill();
    let gone = redis
        .try_should(request("obs", vec![descriptor(&[("user", "a")])], 1))
        .await;
    assert!(gone.is_err(), "answered without Redis: {gone:?}");
    wait_for_metric(&redis, "ratekeeper_storage_errors{kind=\"unavailable\"}").await;
    wait_for_metric(&redis, "datastore_partitioned 1").await;
    names.extend(exported(&metrics_text(&redis).await));
    names
}

/// PromQL's words that are not metric names: keywords, and the aggregations (which may be
/// followed by `by (...)` rather than by their parenthesis).
const KEYWORDS: [&str; 17] = [
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];
/// Words followed by a parenthesised list of label names, not of expressions.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names a PromQL expression reads: every identifier that is not a function, an
/// aggregation, a keyword or a label name; string literals, label matchers, ranges, Grafana's
/// `$variables` and label lists left out.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_to = |from: usize, close: char| -> usize {
        let mut j = from;
        while j < chars.len() && chars[j] != close {
            if chars[j] == '"' {
                j += 1;
                while j < chars.len() && chars[j] != '"' {
                    j += if chars[j] == '\\' { 2 } else { 1 };
                }
            }
            j += 1;
        }
        j + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '"' || c == '\'' {
            i = skip_to(i + 1, c);
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, or a number or duration (`1h`, `0.25`, `1e3`).
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let called = chars.get(next) == Some(&'(');
            if LABEL_LISTS.contains(&word.as_str()) && called {
                i = skip_to(next + 1, ')');
            } else if !called && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression of the dashboard: its panels' targets (rows' panels too) and its
/// query variables (`label_values(metric, label)` reads `metric`).
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn panels(list: &Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| {
                    panic!("a target without a PromQL expr in {}", panel["title"])
                });
                out.push(expr.to_string());
            }
            panels(&panel["panels"], out);
        }
    }
    let mut queries = Vec::new();
    panels(&dashboard["panels"], &mut queries);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"].as_str().unwrap_or_default();
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.split(',').next())
            .unwrap_or_else(|| panic!("a query variable that is not label_values(...): {query}"));
        queries.push(inner.trim().to_string());
    }
    queries
}

/// Every `expr` of a rules file.
fn rule_queries(rules: &Value) -> Vec<String> {
    let groups = rules["groups"].as_array().expect("rule groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| r["expr"].as_str().expect("a rule's expr").to_string())
        .collect()
}

/// The (expression, name) pairs that read a metric not in `exported`, and the expressions that
/// read none at all (the extraction would have missed something).
fn unknown_names(queries: &[String], exported: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for query in queries {
        let names = metric_names(query);
        if names.is_empty() {
            problems.push(format!("{query}: reads no metric"));
        }
        for name in names {
            if !exported.contains(&name) {
                problems.push(format!("{query}: `{name}` is not exported"));
            }
        }
    }
    problems
}

#[test]
fn promql_metric_names_are_found() {
    assert_eq!(
        metric_names(
            r#"sum by (le, rpc) (rate(x_bucket{a="}", b=~"$ns"}[$__rate_interval] offset 5m)) / on(instance) group_left(k) up:ratio > 0.25 and bool 1e3"#
        ),
        ["x_bucket", "up:ratio"]
    );
    assert_eq!(metric_names("max(limitador_up) == 1"), ["limitador_up"]);
}

#[tokio::test]
async fn the_dashboard_and_the_alert_rules_use_only_exported_metrics() {
    let exported = every_exported_name().await;
    // The traffic made the series the dashboard is about.
    for name in [
        "limited_calls",
        "ratekeeper_tokens_overshoot",
        "ratekeeper_cel_errors",
        "ratekeeper_unknown_namespace_calls",
        "ratekeeper_limits_reloads",
        "ratekeeper_storage_errors",
        "ratekeeper_active_counters",
        "ratekeeper_rpc_duration_seconds_bucket",
        "datastore_latency_bucket",
    ] {
        assert!(exported.contains(name), "{name} not exported: {exported:?}");
    }

    let text = std::fs::read_to_string(deploy().join("grafana/ratekeeper.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let problems = unknown_names(&queries, &exported);
    assert!(
        problems.is_empty(),
        "dashboard: {problems:#?}\nexported: {exported:?}"
    );

    let text = std::fs::read_to_string(deploy().join("prometheus/ratekeeper-rules.yaml")).unwrap();
    let rules: Value = serde_yaml::from_str(&text).expect("the rules are YAML");
    let queries = rule_queries(&rules);
    assert!(queries.len() >= 4, "{} rules", queries.len());
    let problems = unknown_names(&queries, &exported);
    assert!(
        problems.is_empty(),
        "rules: {problems:#?}\nexported: {exported:?}"
    );

    // The check itself finds a name that is not exported.
    let typo = ["sum(rate(limited_call[5m]))".to_string()];
    assert_eq!(unknown_names(&typo, &exported).len(), 1);
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = deploy().join("prometheus");
    for args in [
        ["check", "rules", "ratekeeper-rules.yaml"],
        ["test", "rules", "ratekeeper-rules.test.yaml"],
    ] {
        let output = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run promtool ({e}); {INSTALL_PROMTOOL}"));
        assert!(
            output.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn every_alert_of_the_brief_is_there() {
    let text = std::fs::read_to_string(deploy().join("prometheus/ratekeeper-rules.yaml")).unwrap();
    let rules: Value = serde_yaml::from_str(&text).unwrap();
    let alerts: Vec<&str> = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for alert in [
        "RatekeeperStorageDown",
        "RatekeeperConfigReloadFailing",
        "RatekeeperRefusalsSpiking",
        "RatekeeperStorageMayEvict",
    ] {
        assert!(alerts.contains(&alert), "no {alert} in {alerts:?}");
        // Each has a unit test in the promtool test file.
        let tests = std::fs::read_to_string(deploy().join("prometheus/ratekeeper-rules.test.yaml"))
            .unwrap();
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} untested"
        );
    }
}
