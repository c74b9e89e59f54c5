//! Operations: Prometheus metrics (parsed with a real exposition-format parser), gRPC health
//! and reflection, HTTP liveness/readiness, and hot reload of the limits file under traffic.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

const LIMITS: &str = r#"
- name: per-user
  namespace: NS
  max_value: 10
  seconds: 60
  variables: ["descriptors[0].user"]
"#;

fn limits_for(namespace: &str) -> String {
    LIMITS.replace("NS", namespace)
}

async fn scrape(server: &TestServer) -> Vec<prometheus_parse::Sample> {
    let text = get_text(&format!("{}/metrics", server.http_base)).await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines)
        .expect("the exposition format parses")
        .samples
}

/// The value of `metric` whose labels include all of `labels`; 0 when absent.
fn value(samples: &[prometheus_parse::Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map(|b| b.count).unwrap_or(0.0)
            }
            prometheus_parse::Value::Summary(_) => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn metrics_count_known_traffic_with_limitador_names() {
    let options = Options {
        limit_name_in_labels: true,
        ..Options::default()
    };
    let server = TestServer::start_with(&limits_for("metrics-a"), options).await;
    let alice = || request("metrics-a", vec![descriptor(&[("user", "alice")])], 4);
    // 4 + 4 admitted, then refused; then a report of 7 tokens goes 5 past the limit.
    assert_eq!(code(&server.should(alice()).await), Code::Ok);
    assert_eq!(code(&server.should(alice()).await), Code::Ok);
    assert_eq!(code(&server.should(alice()).await), Code::OverLimit);
    server
        .report(request(
            "metrics-a",
            vec![descriptor(&[("user", "alice")])],
            7,
        ))
        .await;

    let samples = scrape(&server).await;
    let ns = ("limitador_namespace", "metrics-a");
    let limit = ("limit_name", "per-user");
    assert_eq!(value(&samples, "authorized_calls", &[ns]), 2.0);
    assert_eq!(
        value(&samples, "authorized_hits", &[ns]),
        15.0,
        "8 admitted + 7 reported"
    );
    assert_eq!(value(&samples, "limited_calls", &[ns, limit]), 1.0);
    assert_eq!(
        value(&samples, "ratekeeper_tokens_charged", &[ns, limit]),
        15.0
    );
    assert_eq!(
        value(&samples, "ratekeeper_tokens_overshoot", &[ns, limit]),
        5.0
    );
    assert_eq!(value(&samples, "limitador_up", &[]), 1.0);
    assert_eq!(value(&samples, "datastore_partitioned", &[]), 0.0);
    // Latency histograms have real buckets and counted these calls.
    let should = samples
        .iter()
        .find(|s| {
            s.metric == "ratekeeper_rpc_duration_seconds"
                && s.labels.get("rpc") == Some("ShouldRateLimit")
        })
        .expect("a ShouldRateLimit latency histogram");
    match &should.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.len() >= 10, "{} buckets", buckets.len());
            assert!(buckets.last().unwrap().count >= 3.0);
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert!(value(&samples, "datastore_latency", &[]) >= 4.0);
    assert!(
        value(
            &samples,
            "ratekeeper_rpc_calls",
            &[("rpc", "ShouldRateLimit"), ("outcome", "over_limit")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_charge_past_the_limit_is_served_usage_not_a_refusal() {
    let server = TestServer::start(&limits_for("metrics-c")).await;
    let user = [("user", "zoe")];
    // Envoy's check (hits 0), then its charge of the real usage: 15 of a limit of 10.
    let check = || request("metrics-c", vec![descriptor_with_hits(&user, 0)], 0);
    assert_eq!(code(&server.should(check()).await), Code::Ok);
    let charge = request("metrics-c", vec![descriptor_with_hits(&user, 15)], 0);
    assert_eq!(code(&server.should(charge).await), Code::OverLimit);
    let samples = scrape(&server).await;
    let ns = ("limitador_namespace", "metrics-c");
    assert_eq!(
        value(&samples, "limited_calls", &[ns]),
        0.0,
        "nothing was refused"
    );
    assert_eq!(value(&samples, "authorized_calls", &[ns]), 2.0);
    assert_eq!(value(&samples, "authorized_hits", &[ns]), 15.0);
    assert_eq!(value(&samples, "ratekeeper_tokens_overshoot", &[ns]), 5.0);
    // The next check is refused: that one is a limited call.
    assert_eq!(code(&server.should(check()).await), Code::OverLimit);
    let samples = scrape(&server).await;
    assert_eq!(value(&samples, "limited_calls", &[ns]), 1.0);
}

#[tokio::test]
async fn clients_cannot_create_metric_series() {
    let server = TestServer::start(&limits_for("metrics-d")).await;
    for i in 0..20 {
        let domain = format!("made-up-{i}");
        server
            .should(request(&domain, vec![descriptor(&[("user", "u")])], 1))
            .await;
    }
    let samples = scrape(&server).await;
    assert!(
        !samples.iter().any(|s| s
            .labels
            .get("limitador_namespace")
            .is_some_and(|n| n.starts_with("made-up"))),
        "a series per client-chosen domain"
    );
    assert!(value(&samples, "authorized_calls", &[("limitador_namespace", "")]) >= 20.0);
}

#[tokio::test]
async fn limit_name_is_only_a_label_when_asked() {
    let server = TestServer::start(&limits_for("metrics-b")).await;
    let r = request("metrics-b", vec![descriptor(&[("user", "bob")])], 11);
    assert_eq!(code(&server.should(r).await), Code::OverLimit);
    let samples = scrape(&server).await;
    let limited: Vec<_> = samples
        .iter()
        .filter(|s| {
            s.metric == "limited_calls" && s.labels.get("limitador_namespace") == Some("metrics-b")
        })
        .collect();
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].labels.get("limit_name"), None);
}

#[tokio::test]
async fn grpc_health_and_http_probes_report_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let server = TestServer::start(&limits_for("health")).await;
    let channel = grpc_channel(server.rls_addr()).await.unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let mut status = ServingStatus::Unknown;
        for _ in 0..50 {
            let response = health
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await;
            if let Ok(response) = response {
                status = response.into_inner().status();
                if status == ServingStatus::Serving {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    for path in ["/healthz", "/readyz"] {
        let response = reqwest::get(format!("{}{path}", server.http_base))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

/// Reflection's service list, asked of `grpc.reflection.v1` or of the older `v1alpha` (one
/// macro: the two packages have the same messages under different Rust types).
macro_rules! reflected_services {
    ($version:ident, $channel:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::once(request))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("not a service list");
        };
        list.service
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<String>>()
    }};
}

#[tokio::test]
async fn reflection_lists_the_services_when_enabled() {
    let options = Options {
        grpc_reflection: true,
        ..Options::default()
    };
    let server = TestServer::start_with(&limits_for("reflection"), options).await;
    let channel = grpc_channel(server.rls_addr()).await.unwrap();
    let v1 = reflected_services!(v1, channel.clone());
    let v1alpha = reflected_services!(v1alpha, channel);
    for names in [&v1, &v1alpha] {
        for expected in [
            "envoy.service.ratelimit.v3.RateLimitService",
            "kuadrant.service.ratelimit.v1.RateLimitService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == expected), "{names:?}");
        }
    }
}

/// Polls /status until `field` reaches `value` (bounded).
async fn wait_for_status(server: &TestServer, field: &str, value: u64) -> serde_json::Value {
    let mut status = serde_json::Value::Null;
    for _ in 0..100 {
        status = get_json(
            &reqwest::Client::new(),
            &format!("{}/status", server.http_base),
        )
        .await;
        if status[field] == value {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{field} never reached {value}: {status}");
}

async fn wait_for_version(server: &TestServer, version: u64) -> serde_json::Value {
    wait_for_status(server, "config_version", version).await
}

async fn wait_for_errors(server: &TestServer, errors: u64) -> serde_json::Value {
    wait_for_status(server, "config_err_since", errors).await
}

fn limit_yaml(max: u64) -> String {
    format!(
        "- {{name: per-user, namespace: reload, max_value: {max}, seconds: 60, variables: ['descriptors[0].user']}}\n"
    )
}

async fn remaining_for(server: &TestServer, user: &str) -> u32 {
    let r = server
        .check(request("reload", vec![descriptor(&[("user", user)])], 0))
        .await;
    r.statuses[0]
        .current_limit
        .as_ref()
        .map(|_| r.statuses[0].limit_remaining)
        .unwrap_or(u32::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_edit_is_reloaded_while_traffic_flows() {
    let server = Arc::new(TestServer::start(&limit_yaml(100)).await);
    let path = server.limits_path().to_path_buf();
    let dir = path.parent().unwrap().to_path_buf();

    // Traffic on another user while the file changes: no call may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (server, stop, failures) = (server.clone(), stop.clone(), failures.clone());
        tokio::spawn(async move {
            let mut client = server.envoy.clone();
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = client
                    .should_rate_limit(request("reload", vec![descriptor(&[("user", "bg")])], 0))
                    .await;
                if r.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // alice has used 30.
    server
        .report(request(
            "reload",
            vec![descriptor(&[("user", "alice")])],
            30,
        ))
        .await;
    assert_eq!(remaining_for(&server, "alice").await, 70);

    // 1. In-place write.
    std::fs::write(&path, limit_yaml(200)).unwrap();
    wait_for_version(&server, 1).await;
    assert_eq!(
        remaining_for(&server, "alice").await,
        170,
        "the counter was kept"
    );

    // 2. sed -i (writes a temp file and renames it over the original).
    let sed = std::process::Command::new("sed")
        .args(["-i", "s/max_value: 200/max_value: 300/"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(sed.success());
    wait_for_version(&server, 2).await;
    assert_eq!(remaining_for(&server, "alice").await, 270);

    // 3. mv of a temp file into place.
    let temp = dir.join("limits.yaml.tmp");
    std::fs::write(&temp, limit_yaml(400)).unwrap();
    std::fs::rename(&temp, &path).unwrap();
    wait_for_version(&server, 3).await;
    assert_eq!(remaining_for(&server, "alice").await, 370);

    // 4. A broken file never replaces good limits; the error shows in /status.
    std::fs::write(&path, "- {namespace: reload, seconds: 60}\n").unwrap();
    let status = wait_for_errors(&server, 1).await;
    assert_eq!(status["config_version"], 3);
    assert_eq!(remaining_for(&server, "alice").await, 370);

    // 5. Neither does an empty file (a truncate before a write, or an accident).
    std::fs::write(&path, "").unwrap();
    wait_for_errors(&server, 2).await;
    assert_eq!(remaining_for(&server, "alice").await, 370);

    // 6. A good file again: applied, and the error count resets.
    std::fs::write(&path, limit_yaml(500)).unwrap();
    let status = wait_for_version(&server, 4).await;
    assert_eq!(status["config_err_since"], 0);
    assert_eq!(remaining_for(&server, "alice").await, 470);

    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no call failed during reloads"
    );

    let samples = scrape(&server).await;
    assert!(
        value(
            &samples,
            "ratekeeper_limits_reloads",
            &[("result", "failed")]
        ) >= 2.0
    );
}

#[cfg(unix)]
/// An edit that lands between loading the file and starting to watch it is applied: the
/// watcher starts from the version in force, not from what it finds on disk.
#[tokio::test]
async fn an_edit_made_while_starting_is_applied() {
    let options = Options {
        edited_while_starting: Some(limit_yaml(7)),
        ..Options::default()
    };
    let server = TestServer::start_with(&limit_yaml(5), options).await;
    wait_for_version(&server, 1).await;
    assert_eq!(remaining_for(&server, "alice").await, 7);
}

#[tokio::test]
async fn a_configmap_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    // Lay the file out the way the kubelet does: limits.yaml -> ..data/limits.yaml,
    // ..data -> ..2026_01_01_v1; an update swaps ..data atomically.
    let server = TestServer::start(&limit_yaml(100)).await;
    let path = server.limits_path().to_path_buf();
    let dir = path.parent().unwrap().to_path_buf();
    let v1 = dir.join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("limits.yaml"), limit_yaml(100)).unwrap();
    symlink("..v1", dir.join("..data")).unwrap();
    std::fs::remove_file(&path).unwrap();
    symlink("..data/limits.yaml", &path).unwrap();
    // Same content so far: nothing to apply.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.status.config_version(), 0);

    let v2 = dir.join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("limits.yaml"), limit_yaml(250)).unwrap();
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    wait_for_version(&server, 1).await;
    assert_eq!(remaining_for(&server, "carol").await, 250);
}

#[tokio::test]
async fn a_half_written_file_is_never_applied() {
    let limits = |max: u64| {
        format!(
            "- name: per-user\n  namespace: reload\n  seconds: 60\n  variables: ['descriptors[0].user']\n  max_value: {max}\n"
        )
    };
    let server = TestServer::start(&limits(1000)).await;
    let path = server.limits_path().to_path_buf();
    // An in-place writer pauses after `max_value: 9` of `max_value: 900`: the prefix is valid
    // YAML with a limit of 9. It pauses longer than the debounce, shorter than the settle period.
    let edited = limits(900);
    let cut = edited.find("max_value: 9").unwrap() + "max_value: 9".len();
    std::fs::write(&path, &edited[..cut]).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(server.status.config_version(), 0, "the prefix was applied");
    assert_eq!(remaining_for(&server, "alice").await, 1000);

    std::fs::write(&path, &edited).unwrap();
    wait_for_version(&server, 1).await;
    assert_eq!(remaining_for(&server, "alice").await, 900);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.status.config_version(),
        1,
        "only the whole file was applied"
    );
}

#[tokio::test]
async fn counters_of_limits_no_longer_loaded_do_not_hold_capacity() {
    let limits = |tier: &str| {
        format!(
            "- {{name: per-user, namespace: reload, max_value: 5, seconds: 60, conditions: [\"descriptors[0].tier == '{tier}'\"], variables: ['descriptors[0].user']}}\n"
        )
    };
    let options = Options {
        capacity: 10,
        ..Options::default()
    };
    let server = TestServer::start_with(&limits("free"), options).await;
    let call = |tier: &'static str, user: String| {
        request(
            "reload",
            vec![descriptor(&[("tier", tier), ("user", user.as_str())])],
            1,
        )
    };
    for user in 0..10 {
        let r = server.should(call("free", format!("u{user}"))).await;
        assert_eq!(code(&r), Code::Ok);
    }
    // A routine edit of the condition: a new limit identity, new counters. The old limit's
    // ten counters must not keep the store full.
    let path = server.limits_path().to_path_buf();
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, limits("basic")).unwrap();
    std::fs::rename(&temp, &path).unwrap();
    wait_for_version(&server, 1).await;
    for user in 10..20 {
        let r = server
            .envoy
            .clone()
            .should_rate_limit(call("basic", format!("u{user}")))
            .await;
        let r = r.unwrap_or_else(|e| panic!("user {user} refused: {e}"));
        assert_eq!(code(&r.into_inner()), Code::Ok);
    }
}

#[tokio::test]
async fn a_huge_cost_saturates_in_the_metrics_instead_of_wrapping() {
    let server = TestServer::start(&limits_for("metrics-huge")).await;
    let alice = |hits| {
        request(
            "metrics-huge",
            vec![descriptor_with_hits(&[("user", "alice")], hits)],
            0,
        )
    };
    server.report(alice(30)).await;
    server.report(alice(u64::MAX)).await;
    let samples = scrape(&server).await;
    let ns = ("limitador_namespace", "metrics-huge");
    let hits = value(&samples, "authorized_hits", &[ns]);
    // 30 + (2^53 - 1), where counters saturate; a wrapped counter reads 29 (a reset).
    assert!(hits >= 9_007_199_254_740_991.0, "authorized_hits is {hits}");
}

#[tokio::test]
async fn a_reload_never_rescales_a_continuous_bucket_kept_by_its_id() {
    let limits = |seconds: u64| {
        format!(
            "- {{id: tokens, namespace: reload, algorithm: token_bucket, max_value: 100, seconds: {seconds}, variables: ['descriptors[0].user']}}\n"
        )
    };
    let server = TestServer::start(&limits(60)).await;
    let alice = || request("reload", vec![descriptor(&[("user", "alice")])], 50);
    assert_eq!(code(&server.should(alice()).await), Code::Ok);
    assert_eq!(remaining_for(&server, "alice").await, 50);
    // Only `seconds` changes: the same level would mean other tokens (it is kept in units of
    // 1/period), so alice gets a new bucket, never her 50 tokens rescaled to 0.
    let path = server.limits_path().to_path_buf();
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, limits(3600)).unwrap();
    std::fs::rename(&temp, &path).unwrap();
    wait_for_version(&server, 1).await;
    assert_eq!(remaining_for(&server, "alice").await, 100);
}

/// Calls to namespaces without limits are counted by name for the first 100 names, the rest
/// in one `other` series, so clients cannot create series without bound.
#[tokio::test]
async fn calls_to_namespaces_without_limits_are_counted_by_name_up_to_a_cap() {
    let server = TestServer::start(&limits_for("capped")).await;
    for i in 0..105 {
        let calls = if i == 0 { 3 } else { 1 };
        for _ in 0..calls {
            let call = request(&format!("typo-{i}"), vec![descriptor(&[("user", "u")])], 1);
            assert_eq!(code(&server.should(call).await), Code::Ok);
        }
    }
    let call = request("capped", vec![descriptor(&[("user", "u")])], 1);
    assert_eq!(code(&server.should(call).await), Code::Ok);

    let samples = scrape(&server).await;
    let unknown = |namespace: &str| {
        value(
            &samples,
            "ratekeeper_unknown_namespace_calls",
            &[("namespace", namespace)],
        )
    };
    assert_eq!(unknown("typo-0"), 3.0);
    assert_eq!(unknown("typo-99"), 1.0);
    assert_eq!(unknown("typo-100"), 0.0, "past the cap");
    assert_eq!(unknown("other"), 5.0, "typo-100 to typo-104");
    assert_eq!(unknown("capped"), 0.0, "a namespace with limits");
    let named = samples
        .iter()
        .filter(|s| s.metric == "ratekeeper_unknown_namespace_calls")
        .filter(|s| {
            s.labels
                .get("namespace")
                .is_some_and(|n| n.starts_with("typo-"))
        })
        .count();
    assert_eq!(named, 100);
    // Limitador's series still pool them (under "", not by name).
    assert_eq!(
        value(
            &samples,
            "authorized_calls",
            &[("limitador_namespace", "typo-0")]
        ),
        0.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn refunds_are_counted_by_limit() {
    let server = TestServer::start(&limits_for("metrics-refund")).await;
    let alice = || vec![descriptor_with_hits(&[("user", "alice")], 6)];
    let refund_alice = || vec![refund(&[("user", "alice")], 4)];
    server.should(request("metrics-refund", alice(), 0)).await;
    server
        .should(request("metrics-refund", refund_alice(), 0))
        .await;
    let samples = scrape(&server).await;
    let ns = ("limitador_namespace", "metrics-refund");
    assert_eq!(value(&samples, "ratekeeper_tokens_refunded", &[ns]), 4.0);
    assert_eq!(value(&samples, "ratekeeper_tokens_charged", &[ns]), 6.0);
}
