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
    let log = server.log();
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
