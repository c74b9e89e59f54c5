//! `examples/grpc_call.py` against the real binary: the README's gRPC walkthrough is run
//! command by command, in order, on a fresh server, and each output must be the one the README
//! shows (`duration_until_reset` aside: it moves with the clock). The script finds the message
//! types through reflection's `grpc.reflection.v1alpha` name, so this also tests that name.
//!
//! Needs `python3` with `grpcio` and `grpcio-reflection` (`.ci/run` installs them).

mod common;

use std::process::{Command, Output};

use common::process::{Server, manifest_dir};
use common::transcript::{Transcript, same_within};

/// Runs one README command (a shell line, continuation backslashes included) against `server`.
fn run(command: &str, server: &Server) -> Output {
    Command::new("sh")
        .args(["-c", command])
        .current_dir(manifest_dir())
        .env("RATEKEEPER_GRPC", server.rls.to_string())
        .output()
        .expect("sh runs")
}

fn script_available() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection"])
        .output()
        .expect("python3 is needed");
    assert!(
        probe.status.success(),
        "examples/grpc_call.py needs grpcio and grpcio-reflection: \
         pip install 'grpcio==1.85.*' 'grpcio-reflection==1.85.*'"
    );
}

#[tokio::test]
async fn the_readme_grpc_walkthrough_prints_what_it_shows() {
    script_available();
    let transcript = Transcript::read(
        "README.md",
        "## Walkthrough (gRPC)",
        "examples/grpc_call.py",
    );
    assert!(
        transcript.steps.len() >= 5,
        "found only {} calls",
        transcript.steps.len()
    );
    let server =
        Server::start_on_loopback(&["limits/llm-tiers.yaml", "--grpc-reflection-service"]).await;
    transcript.check(
        |command| {
            let output = run(command, &server);
            assert!(
                output.status.success(),
                "{command}\nfailed: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                server.log()
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        },
        // `duration_until_reset` moves with the clock; reservation ids are random.
        |shown, printed| {
            same_within(
                shown,
                printed,
                &[r#""duration_until_reset": "([0-9.]+)s""#],
                2.0,
                &[
                    r#""reservation_id": "[^"]*""#,
                    r#""reservation_id": "[0-9a-f]+""#,
                ],
            )
        },
    );
}

#[tokio::test]
async fn grpc_call_reports_errors_with_their_code() {
    script_available();
    let server =
        Server::start_on_loopback(&["limits/llm-tiers.yaml", "--grpc-reflection-service"]).await;
    let long = "a".repeat(5000);
    let request = format!(
        r#"'{{"domain": "llm_tokens", "descriptors": [{{"entries": [{{"key": "user", "value": "{long}"}}]}}]}}'"#
    );
    let cases = [
        (
            format!(
                "examples/grpc_call.py envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit {request}"
            ),
            1,
            "INVALID_ARGUMENT: descriptor 0: descriptor value of 5000 bytes",
        ),
        (
            "examples/grpc_call.py kuadrant.service.ratelimit.v1.RateLimitService/Nope".into(),
            2,
            "has no method 'Nope' (it has CheckRateLimit, Commit, Report, Reserve)",
        ),
        (
            "examples/grpc_call.py envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit '{\"domian\": \"x\"}'".into(),
            2,
            "is not a valid envoy.service.ratelimit.v3.RateLimitRequest",
        ),
    ];
    for (command, code, message) in cases {
        let output = run(&command, &server);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{command}: {stderr}");
        assert!(stderr.contains(message), "{command}: {stderr}");
    }
}

/// Without `--grpc-reflection-service` the script says what to do.
#[tokio::test]
async fn grpc_call_without_reflection_says_how_to_enable_it() {
    script_available();
    let server = Server::start_on_loopback(&["limits/llm-tiers.yaml"]).await;
    let output = run("examples/grpc_call.py list", &server);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--grpc-reflection-service"), "{stderr}");
}
