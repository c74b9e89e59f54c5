//! Operations seen from outside the process: SIGHUP reloads, JSON logs that carry the
//! request's `x-request-id`, refusals logged at debug, and no line per call at the default
//! level for what a client can repeat (refusals, failing expressions).

mod common;

use std::time::{Duration, Instant};

use common::process::*;
use common::{code, descriptor, request};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

async fn start(extra: &[&str]) -> Server {
    let args: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["limits/llm-tiers.yaml"])
        .collect();
    Server::start_on_loopback(&args).await
}

#[tokio::test]
async fn sighup_reloads_the_limits_file() {
    let server = start(&[]).await;
    assert_eq!(server.status().await["config_version"], 0);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let start = Instant::now();
    while server.status().await["config_version"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no reload after SIGHUP; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still serving.
    let r = server.should(llm_tokens("u", 1)).await;
    assert_eq!(code(&r), Code::Ok);
}

#[tokio::test]
async fn json_logs_carry_the_request_id_of_a_refused_call() {
    // Refusals are logged at debug (`-v`).
    let server = start(&["--structured-logs", "-v"]).await;
    let mut call = tonic::Request::new(llm_tokens("max", 51));
    call.metadata_mut()
        .insert("x-request-id", "req-4242".parse().unwrap());
    let r = server.try_should(call).await.unwrap();
    assert_eq!(code(&r), Code::OverLimit);

    // And a malformed call: an oversized descriptor value.
    let long = "v".repeat(5000);
    let mut bad = tonic::Request::new(request(
        "llm_tokens",
        vec![descriptor(&[("user", long.as_str())])],
        1,
    ));
    bad.metadata_mut()
        .insert("x-request-id", "req-bad".parse().unwrap());
    let error = server.try_should(bad).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);

    let start = Instant::now();
    loop {
        let log = server.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let refused = lines.iter().find(|l| l.to_string().contains("req-4242"));
        let malformed = lines.iter().find(|l| l.to_string().contains("req-bad"));
        if let (Some(refused), Some(malformed)) = (refused, malformed) {
            assert_eq!(refused["fields"]["message"], "over the limit", "{refused}");
            assert_eq!(refused["fields"]["limit"], "llm-free", "{refused}");
            assert!(
                malformed["fields"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("malformed"),
                "{malformed}"
            );
            assert!(
                lines.iter().all(|l| l.is_object()),
                "every line is a JSON object"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the log lacks the request ids:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn refusals_and_failing_expressions_do_not_flood_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.yaml");
    std::fs::write(
        &path,
        r#"
- {name: tiny, namespace: ns, max_value: 1, seconds: 60, variables: ["descriptors[0].user"]}
- {name: broken, namespace: ns, max_value: 5, seconds: 60, conditions: ["descriptors[0].n > 3"]}
"#,
    )
    .unwrap();
    let server = Server::start_on_loopback(&[path.to_str().unwrap()]).await;
    let mut client = server.grpc().await;
    // The first call spends alice's budget of 1, the other 199 are refused; and on every call
    // `n > 3` fails ("7" is a string), skipping the limit `broken`.
    for i in 0..200 {
        let call = request("ns", vec![descriptor(&[("user", "alice"), ("n", "7")])], 1);
        let r = client.should_rate_limit(call).await.unwrap().into_inner();
        let expected = if i == 0 { Code::Ok } else { Code::OverLimit };
        assert_eq!(code(&r), expected, "call {i}");
    }
    let log = server
        .log_when(|log| log.contains("CEL expression failed"))
        .await;
    let per_call = log
        .lines()
        .filter(|l| l.contains("over the limit") || l.contains("CEL expression failed"))
        .count();
    assert!(
        per_call <= 2,
        "{per_call} lines for 200 calls (at most one per throttling interval expected):\n{log}"
    );
    assert!(
        log.contains("CEL expression failed"),
        "the first failure is still logged:\n{log}"
    );
}

/// The JSON lines of a `--structured-logs` log.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls the log until `done` says it holds what the test waits for (at most 10 s).
async fn log_until(
    server: &Server,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let lines = json_lines(&server.log());
        if done(&lines) {
            return lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the log never got there:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn message(line: &serde_json::Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn dash_v_logs_one_line_per_decision_and_no_http2_frames() {
    let server = start(&["--structured-logs", "-v"]).await;
    // Two gRPC decisions (the second refused) and one refused HTTP call.
    let r = server.should(llm_tokens("vera", 1)).await;
    assert_eq!(code(&r), Code::Ok);
    let r = server.should(llm_tokens("vera", 50)).await;
    assert_eq!(code(&r), Code::OverLimit);
    let response = reqwest::Client::new()
        .post(format!("http://{}/check_and_report", server.http))
        .header("x-request-id", "http-77")
        .body(
            r#"{"namespace":"llm_tokens","values":{"generic_key":"llm","user":"vera"},"delta":50}"#,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);

    let lines = log_until(&server, |lines| {
        lines.iter().filter(|l| message(l) == "decision").count() >= 3
            && lines.iter().any(|l| l["fields"]["request_id"] == "http-77")
    })
    .await;
    let decisions: Vec<&serde_json::Value> =
        lines.iter().filter(|l| message(l) == "decision").collect();
    assert_eq!(decisions.len(), 3, "one line per decision: {decisions:#?}");
    assert_eq!(decisions[0]["level"], "DEBUG");
    assert_eq!(decisions[0]["fields"]["namespace"], "llm_tokens");
    assert_eq!(decisions[0]["fields"]["limit"], "llm-free");
    assert_eq!(decisions[1]["fields"]["verdict"], "Refused");
    // The HTTP refusal is logged as a gRPC one is.
    let refused = lines
        .iter()
        .find(|l| l["fields"]["request_id"] == "http-77")
        .unwrap();
    assert_eq!(message(refused), "over the limit", "{refused}");
    assert_eq!(refused["fields"]["limit"], "llm-free", "{refused}");
    assert_eq!(refused["fields"]["rpc"], "ShouldRateLimit", "{refused}");
    // Only ratekeeper's own debug lines: not the HTTP/2 frames of hyper, h2 or tonic.
    let foreign: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["level"] == "DEBUG" || l["level"] == "TRACE")
        .filter(|l| {
            !l["target"]
                .as_str()
                .unwrap_or_default()
                .starts_with("ratekeeper")
        })
        .collect();
    assert!(
        foreign.is_empty(),
        "debug lines of dependencies at -v: {foreign:#?}"
    );
}

#[tokio::test]
async fn a_namespace_without_limits_is_allowed_and_warned_about_once() {
    let server = start(&["--structured-logs"]).await;
    for _ in 0..3 {
        let call = request("llm_tokenz", vec![descriptor(&[("user", "u")])], 1);
        assert_eq!(code(&server.should(call).await), Code::Ok);
    }
    let call = request("llm-tokens", vec![descriptor(&[("user", "u")])], 1);
    assert_eq!(code(&server.should(call).await), Code::Ok);
    // A namespace with limits is not warned about.
    assert_eq!(code(&server.should(llm_tokens("u", 1)).await), Code::Ok);

    let warned = |lines: &[serde_json::Value], namespace: &str| {
        lines
            .iter()
            .filter(|l| l["level"] == "WARN" && l["fields"]["namespace"] == namespace)
            .count()
    };
    let lines = log_until(&server, |lines| warned(lines, "llm-tokens") == 1).await;
    assert_eq!(warned(&lines, "llm_tokenz"), 1, "once per namespace");
    assert_eq!(warned(&lines, "llm_tokens"), 0);
    let line = lines
        .iter()
        .find(|l| l["fields"]["namespace"] == "llm_tokenz")
        .unwrap();
    assert!(message(line).contains("no limits"), "{line}");

    let metrics = reqwest::get(format!("http://{}/metrics", server.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (namespace, calls) in [("llm_tokenz", 3), ("llm-tokens", 1)] {
        let series =
            format!("ratekeeper_unknown_namespace_calls{{namespace=\"{namespace}\"}} {calls}");
        assert!(metrics.contains(&series), "no {series} in\n{metrics}");
    }
    assert!(!metrics.contains("ratekeeper_unknown_namespace_calls{namespace=\"llm_tokens\"}"));
}
