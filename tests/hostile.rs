//! Hostile and oversized input: refused with a reason, nothing changes, nothing panics.

mod common;

use common::*;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::request::RequestBounds;
use tonic::Code as GrpcCode;

const LIMITS: &str = r#"
- name: per-user
  namespace: ns
  max_value: 100
  seconds: 60
  variables: ["descriptors[0].user"]
"#;

fn small_bounds() -> Options {
    Options {
        bounds: RequestBounds {
            max_descriptors: 4,
            max_descriptor_entries: 3,
            max_entry_bytes: 16,
            max_message_bytes: 1024,
        },
        ..Options::default()
    }
}

async fn error_of(
    server: &TestServer,
    request: ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitRequest,
) -> tonic::Status {
    server
        .envoy
        .clone()
        .should_rate_limit(request)
        .await
        .expect_err("the request should be refused")
}

#[tokio::test]
async fn too_many_descriptors_or_entries_or_long_values_are_invalid_arguments() {
    let server = TestServer::start_with(LIMITS, small_bounds()).await;
    let d = descriptor(&[("user", "a")]);

    let status = error_of(&server, request("ns", vec![d.clone(); 5], 1)).await;
    assert_eq!(status.code(), GrpcCode::InvalidArgument);
    assert!(
        status.message().contains("5 descriptors"),
        "{}",
        status.message()
    );

    let wide = descriptor(&[("a", "1"), ("b", "2"), ("c", "3"), ("user", "x")]);
    let status = error_of(&server, request("ns", vec![wide], 1)).await;
    assert_eq!(status.code(), GrpcCode::InvalidArgument);
    assert!(
        status.message().contains("4 entries"),
        "{}",
        status.message()
    );

    let long = "x".repeat(17);
    let status = error_of(
        &server,
        request("ns", vec![descriptor(&[("user", &long)])], 1),
    )
    .await;
    assert_eq!(status.code(), GrpcCode::InvalidArgument);
    assert!(
        status.message().contains("17 bytes"),
        "{}",
        status.message()
    );
    let status = error_of(&server, request(&long, vec![d.clone()], 1)).await;
    assert_eq!(status.code(), GrpcCode::InvalidArgument);

    // Within the bounds, everything still works and nothing was counted.
    let r = server.should(request("ns", vec![d.clone(); 4], 1)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 99);
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    let server = TestServer::start_with(LIMITS, small_bounds()).await;
    // Each entry is within bounds; the message as a whole is not.
    let value = "y".repeat(16);
    let big = request(
        "ns",
        vec![descriptor(&[("user", value.as_str()); 3]); 30],
        1,
    );
    let status = error_of(&server, big).await;
    assert_eq!(status.code(), GrpcCode::ResourceExhausted);
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );
    // The server is still serving.
    let r = server
        .should(request("ns", vec![descriptor(&[("user", "a")])], 1))
        .await;
    assert_eq!(code(&r), Code::Ok);
}

#[tokio::test]
async fn huge_costs_never_overflow() {
    let server = TestServer::start(LIMITS).await;
    let d = |hits| descriptor_with_hits(&[("user", "a")], hits);
    // A charge of u64::MAX is counted (saturating at MAX_COUNT) and reported over the limit.
    let r = server.should(request("ns", vec![d(u64::MAX)], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
    let r = server.should(request("ns", vec![d(u64::MAX)], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let used = used(&server.counters("ns").await[0].1.state);
    assert_eq!(
        used,
        ratekeeper::algorithm::MAX_COUNT,
        "saturated, not wrapped around"
    );
    // Request-level u32::MAX on a fresh user is refused, not wrapped.
    let r = server
        .should(request("ns", vec![descriptor(&[("user", "b")])], u32::MAX))
        .await;
    assert_eq!(code(&r), Code::OverLimit);
    // Reports too.
    let r = server
        .report(request(
            "ns",
            vec![descriptor_with_hits(&[("user", "c")], u64::MAX)],
            u32::MAX,
        ))
        .await;
    assert_eq!(code(&r), Code::Ok);
}

#[tokio::test]
async fn odd_but_valid_input_is_answered() {
    let server = TestServer::start(LIMITS).await;
    // No descriptors at all; an empty descriptor; empty keys and values; non-ASCII; duplicates.
    for descriptors in [
        vec![],
        vec![descriptor(&[])],
        vec![descriptor(&[("", "")])],
        vec![descriptor(&[("user", "ünï€ødé"), ("user", "second wins")])],
    ] {
        let r = server.should(request("ns", descriptors.clone(), 1)).await;
        assert_ne!(code(&r), Code::Unknown);
        assert_eq!(r.statuses.len(), descriptors.len());
        let r = server.check(request("ns", descriptors.clone(), 0)).await;
        assert_ne!(code(&r), Code::Unknown);
    }
}

#[tokio::test]
async fn capacity_exhaustion_is_an_explicit_error_and_live_counters_keep_counting() {
    let options = Options {
        capacity: 2,
        ..Options::default()
    };
    let server = TestServer::start_with(LIMITS, options).await;
    for user in ["a", "b"] {
        let r = server
            .should(request("ns", vec![descriptor(&[("user", user)])], 1))
            .await;
        assert_eq!(code(&r), Code::Ok);
    }
    let status = error_of(
        &server,
        request("ns", vec![descriptor(&[("user", "c")])], 1),
    )
    .await;
    assert_eq!(status.code(), GrpcCode::ResourceExhausted);
    assert!(
        status.message().contains("capacity"),
        "{}",
        status.message()
    );
    // a's counter was not evicted.
    let r = server
        .should(request("ns", vec![descriptor(&[("user", "a")])], 1))
        .await;
    assert_eq!(r.statuses[0].limit_remaining, 98);
    // Once windows expire, room is made again.
    server.clock.advance_ms(61_000);
    let r = server
        .should(request("ns", vec![descriptor(&[("user", "c")])], 1))
        .await;
    assert_eq!(code(&r), Code::Ok);
}
