//! Operations seen from outside the process: SIGHUP reloads, JSON logs that carry the
//! request's `x-request-id`, one line per refused or malformed call.

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
    let server = start(&["--structured-logs"]).await;
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
