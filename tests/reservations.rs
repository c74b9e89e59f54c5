//! Kuadrant's reservations through real sockets, on every storage: the wasm-shim's sequence at
//! the gRPC level (Reserve on the request, Commit with total_tokens at the end of the stream,
//! Commit 0 when the upstream failed, TTL expiry when the Commit never comes), holds seen by
//! every admission (ShouldRateLimit, CheckRateLimit, HTTP /check), HTTP /reserve and /commit,
//! and 64 concurrent Reserve→Commit against one budget.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use ratekeeper::limiter::Reservations;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::{
    CommitRequest, CommitResponse, ReserveRequest, ReserveResponse,
};
use serde_json::{Value, json};

const DOMAIN: &str = "llm/llm-route";
const LIMIT: &str = "tokenlimit.budget__0a1b2c3d";

/// 1,000 tokens a minute per user, as kuadrant-operator generates a TokenRateLimitPolicy limit.
const LIMITS: &str = r#"
- name: budget
  namespace: llm/llm-route
  max_value: 1000
  seconds: 60
  conditions: ['descriptors[0]["tokenlimit.budget__0a1b2c3d"] == "1"']
  variables: ['descriptors[0]["auth.identity.userid"]']
"#;

fn shim_descriptor(user: &str) -> Vec<RateLimitDescriptor> {
    vec![descriptor(&[(LIMIT, "1"), ("auth.identity.userid", user)])]
}

async fn reserve(
    server: &TestServer,
    user: &str,
    amount: u64,
    ttl_s: Option<i64>,
) -> ReserveResponse {
    server
        .kuadrant
        .clone()
        .reserve(ReserveRequest {
            domain: DOMAIN.into(),
            descriptors: shim_descriptor(user),
            amount,
            ttl: ttl_s.map(|seconds| prost_types::Duration { seconds, nanos: 0 }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn commit(server: &TestServer, user: &str, id: &str, actual: u64) -> CommitResponse {
    server
        .kuadrant
        .clone()
        .commit(CommitRequest {
            domain: DOMAIN.into(),
            // The shim's commit: the limit identifier entry and the counter's entry.
            descriptors: shim_descriptor(user),
            reservation_id: id.into(),
            actual_amount: actual,
        })
        .await
        .unwrap()
        .into_inner()
}

async fn check(server: &TestServer, user: &str, hits: u32) -> (Code, u32) {
    let response = server
        .check(request(DOMAIN, shim_descriptor(user), hits))
        .await;
    (code(&response), response.statuses[0].limit_remaining)
}

/// What the user's counter has used (0 when it has none).
async fn usage(server: &TestServer) -> u64 {
    let counters = server.counters(DOMAIN).await;
    counters.iter().map(|(_, c)| used(&c.state)).sum()
}

/// A series' value in the server's /metrics (metrics are the process's: other tests add to them).
async fn metric(server: &TestServer, series: &str) -> Option<f64> {
    let text = get_text(&format!("{}/metrics", server.http_base)).await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn reserved_code(response: &ReserveResponse) -> Code {
    Code::try_from(response.code).unwrap()
}

async fn the_shims_sequence_holds_commits_and_expires(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;

    // Reserve on the request: an id of 128 random bits, nothing charged, the hold counted.
    let first = reserve(&server, "user-1", 300, Some(30)).await;
    assert_eq!(reserved_code(&first), Code::Ok);
    assert_eq!(first.reservation_id.len(), 32, "{first:?}");
    assert!(first.reservation_id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(usage(&server).await, 0, "a hold charges nothing");
    assert_eq!(check(&server, "user-1", 700).await, (Code::Ok, 700));
    assert_eq!(check(&server, "user-1", 701).await.0, Code::OverLimit);
    assert_eq!(
        check(&server, "user-2", 1000).await.0,
        Code::Ok,
        "another counter"
    );

    // Commit with total_tokens at the end of the stream: charged, hold released.
    let done = commit(&server, "user-1", &first.reservation_id, 120).await;
    assert!(done.reservation_released);
    assert_eq!(usage(&server).await, 120);
    assert_eq!(check(&server, "user-1", 880).await, (Code::Ok, 880));
    assert_eq!(check(&server, "user-1", 881).await.0, Code::OverLimit);

    // The same id again (already committed): a plain report.
    let again = commit(&server, "user-1", &first.reservation_id, 10).await;
    assert!(!again.reservation_released);
    assert_eq!(usage(&server).await, 130);

    // The upstream failed: Commit 0 releases and charges nothing.
    let failed = reserve(&server, "user-1", 200, None).await;
    assert_eq!(reserved_code(&failed), Code::Ok);
    assert_eq!(check(&server, "user-1", 671).await.0, Code::OverLimit);
    let released = commit(&server, "user-1", &failed.reservation_id, 0).await;
    assert!(released.reservation_released);
    assert_eq!(usage(&server).await, 130);
    assert_eq!(check(&server, "user-1", 870).await.0, Code::Ok);

    // The Commit never comes: the hold expires at its ttl, releasing without charging.
    let lost = reserve(&server, "user-1", 400, Some(5)).await;
    assert_eq!(reserved_code(&lost), Code::Ok);
    server.clock.advance_ms(4_999);
    assert_eq!(check(&server, "user-1", 471).await.0, Code::OverLimit);
    server.clock.advance_ms(1);
    assert_eq!(check(&server, "user-1", 870).await, (Code::Ok, 870));
    let expired = metric(&server, "ratekeeper_holds_expired").await;
    assert!(expired.is_some_and(|n| n >= 1.0), "{expired:?}");
    // A commit after the expiry is a report.
    let late = commit(&server, "user-1", &lost.reservation_id, 50).await;
    assert!(!late.reservation_released);
    assert_eq!(usage(&server).await, 180);

    // What does not fit is refused with an empty id, and holds nothing.
    let refused = reserve(&server, "user-1", 821, None).await;
    assert_eq!(reserved_code(&refused), Code::OverLimit);
    assert_eq!(refused.reservation_id, "");
    assert_eq!(check(&server, "user-1", 820).await.0, Code::Ok);

    // Kuadrant's default amount 0: admitted while something is left, holds nothing, an id.
    let zero = reserve(&server, "user-1", 0, None).await;
    assert_eq!(reserved_code(&zero), Code::Ok);
    assert_eq!(zero.reservation_id.len(), 32);
    assert_eq!(check(&server, "user-1", 820).await.0, Code::Ok);
    let charged = commit(&server, "user-1", &zero.reservation_id, 20).await;
    assert!(!charged.reservation_released, "nothing was held");
    assert_eq!(usage(&server).await, 200);

    // A hold is at most half the limit (--max-reservation-fraction 0.5): 800 admitted, 500 held.
    let big = reserve(&server, "user-1", 800, None).await;
    assert_eq!(reserved_code(&big), Code::Ok);
    assert_eq!(check(&server, "user-1", 300).await, (Code::Ok, 300));
    assert_eq!(check(&server, "user-1", 301).await.0, Code::OverLimit);

    // With no ttl, --max-reservation-ttl (60 s) ends it; the fixed window may end it sooner.
    server.clock.advance_ms(60_000);
    assert_eq!(check(&server, "user-1", 1000).await.0, Code::Ok);
    server.shutdown().await;
}

async fn every_admission_sees_the_holds(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    let held = reserve(&server, "user-1", 400, None).await;
    assert_eq!(reserved_code(&held), Code::Ok);

    // ShouldRateLimit: 601 does not fit on top of the hold (and charges nothing).
    let over = server
        .should(request(DOMAIN, shim_descriptor("user-1"), 601))
        .await;
    assert_eq!(code(&over), Code::OverLimit);
    assert_eq!(usage(&server).await, 0);
    let fits = server
        .should(request(DOMAIN, shim_descriptor("user-1"), 600))
        .await;
    assert_eq!(code(&fits), Code::Ok);
    assert_eq!(
        fits.statuses[0].limit_remaining, 0,
        "remaining subtracts the hold"
    );

    // CheckRateLimit, and another Reserve.
    assert_eq!(check(&server, "user-1", 1).await.0, Code::OverLimit);
    let another = reserve(&server, "user-1", 1, None).await;
    assert_eq!(reserved_code(&another), Code::OverLimit);
    assert_eq!(another.reservation_id, "");

    // HTTP /check: 429 while the hold is there, 200 once it is committed.
    let client = http_client();
    let http_check = |delta: u64| {
        let client = client.clone();
        let url = format!("{}/check", server.http_base);
        async move {
            let body = json!({"namespace": DOMAIN, "values": {LIMIT: "1", "auth.identity.userid": "user-1"}, "delta": delta});
            client
                .post(&url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(http_check(1).await, 429);
    assert!(
        commit(&server, "user-1", &held.reservation_id, 100)
            .await
            .reservation_released
    );
    assert_eq!(usage(&server).await, 700);
    assert_eq!(http_check(300).await, 200);
    assert_eq!(http_check(301).await, 429);
    server.shutdown().await;
}

async fn reservations_over_http(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    let client = http_client();
    let post = |path: &'static str, body: Value| {
        let client = client.clone();
        let url = format!("{}{path}", server.http_base);
        async move {
            let response = client.post(&url).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            (
                status,
                serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)),
            )
        }
    };
    let values = json!({LIMIT: "1", "auth.identity.userid": "user-9"});
    let (status, body) = post(
        "/reserve",
        json!({"namespace": DOMAIN, "values": values, "amount": 400, "ttl_seconds": 30}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["reservation_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    let (status, body) = post(
        "/reserve",
        json!({"namespace": DOMAIN, "values": values, "amount": 601}),
    )
    .await;
    assert_eq!(
        (status, body),
        (429, Value::Null),
        "the body /check answers"
    );
    let (status, body) = post(
        "/commit",
        json!({"namespace": DOMAIN, "values": values, "reservation_id": id, "actual": 250}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"released": true})));
    let (status, body) = post(
        "/commit",
        json!({"namespace": DOMAIN, "values": values, "reservation_id": id, "actual": 0}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"released": false})));
    assert_eq!(usage(&server).await, 250);
    let (status, _) = post("/reserve", json!({"namespace": DOMAIN, "values": values})).await;
    assert_eq!(status, 400, "amount is required");
    for series in [
        r#"ratekeeper_reservations{outcome="ok"}"#,
        r#"ratekeeper_reservations{outcome="over_limit"}"#,
        r#"ratekeeper_commits{released="true"}"#,
        r#"ratekeeper_commits{released="false"}"#,
        r#"ratekeeper_rpc_calls{rpc="Reserve",outcome="ok"}"#,
    ] {
        let value = metric(&server, series).await;
        assert!(value.is_some_and(|n| n >= 1.0), "{series}: {value:?}");
    }
    assert!(metric(&server, "ratekeeper_tokens_held").await.is_some());
    server.shutdown().await;
}

/// 64 clients, each reserving an estimate (100) that covers its real cost (60..=100), using
/// it for a while, and committing the real cost, until refused: the budget of 2,000 tokens is
/// never overshot, and once everything settled the counter holds exactly the tokens used.
async fn concurrent_reservations_never_overshoot(backend: Backend) {
    const BUDGET_LIMITS: &str = r#"
- name: budget
  namespace: llm/llm-route
  max_value: 2000
  seconds: 600
  conditions: ['descriptors[0]["tokenlimit.budget__0a1b2c3d"] == "1"']
  variables: ['descriptors[0]["auth.identity.userid"]']
"#;
    let server = Arc::new(TestServer::on(backend, BUDGET_LIMITS).await);
    let used_for_real = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..64u64)
        .map(|client| {
            let (server, used_for_real, admitted) =
                (server.clone(), used_for_real.clone(), admitted.clone());
            tokio::spawn(async move {
                for round in 0u64.. {
                    let held = reserve(&server, "user-1", 100, Some(30)).await;
                    if reserved_code(&held) != Code::Ok {
                        return;
                    }
                    admitted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let real = 60 + (client * 7 + round * 13) % 41;
                    used_for_real.fetch_add(real, Ordering::Relaxed);
                    let done = commit(&server, "user-1", &held.reservation_id, real).await;
                    assert!(done.reservation_released);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let real = used_for_real.load(Ordering::Relaxed);
    assert!(real <= 2000, "overshoot: {real} tokens used of 2,000");
    assert!(real > 1900, "the budget is usable: {real} used");
    assert!(admitted.load(Ordering::Relaxed) > 20);
    assert_eq!(
        usage(&server).await,
        real,
        "usage equals the tokens really used"
    );
    assert_eq!(
        check(&server, "user-1", 1).await.0,
        if real < 2000 {
            Code::Ok
        } else {
            Code::OverLimit
        }
    );
}

async fn disabled_reservations_are_unimplemented(backend: Backend) {
    let options = Options {
        backend,
        reservations: Reservations {
            enabled: false,
            ..Reservations::default()
        },
        ..Options::default()
    };
    let server = TestServer::start_with(LIMITS, options).await;
    let status = server
        .kuadrant
        .clone()
        .reserve(ReserveRequest {
            domain: DOMAIN.into(),
            descriptors: shim_descriptor("user-1"),
            amount: 1,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let status = server
        .kuadrant
        .clone()
        .commit(CommitRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    let response = http_client()
        .post(format!("{}/reserve", server.http_base))
        .json(&json!({"namespace": DOMAIN, "values": {}, "amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 501);
    server.shutdown().await;
}

/// A counter carries at most 1,000 holds: one more is RESOURCE_EXHAUSTED (a bound, not a spent
/// budget: nothing is held, and the budget is still there).
async fn a_counter_carries_at_most_a_thousand_holds(backend: Backend) {
    const BIG: &str = r#"
- name: budget
  namespace: llm/llm-route
  max_value: 1000000
  seconds: 600
  conditions: ['descriptors[0]["tokenlimit.budget__0a1b2c3d"] == "1"']
  variables: ['descriptors[0]["auth.identity.userid"]']
"#;
    let server = TestServer::on(backend, BIG).await;
    for n in 0..1000 {
        let held = reserve(&server, "user-1", 1, None).await;
        assert_eq!(reserved_code(&held), Code::Ok, "hold {n}");
    }
    let status = server
        .kuadrant
        .clone()
        .reserve(ReserveRequest {
            domain: DOMAIN.into(),
            descriptors: shim_descriptor("user-1"),
            amount: 1,
            ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(check(&server, "user-1", 999_000).await.0, Code::Ok);
    assert_eq!(check(&server, "user-1", 999_001).await.0, Code::OverLimit);
    // Amount 0 holds nothing, so the bound does not stop it.
    assert_eq!(
        reserved_code(&reserve(&server, "user-1", 0, None).await),
        Code::Ok
    );
    // Once the holds expire (60 s at most), there is room again.
    server.clock.advance_ms(60_000);
    assert_eq!(
        reserved_code(&reserve(&server, "user-1", 1, None).await),
        Code::Ok
    );
    server.shutdown().await;
}

/// The messages' field numbers are Limitador's (CLIENTS.md), byte for byte: a shim built for
/// Limitador talks to ratekeeper unchanged.
#[test]
fn reserve_and_commit_messages_have_limitadors_field_numbers() {
    use prost::Message;
    let reserve = ReserveRequest {
        domain: "d".into(),
        descriptors: vec![],
        amount: 5,
        ttl: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
    };
    // 1: domain (length-delimited), 3: amount (varint), 4: ttl (a Duration, its field 1 = 2).
    assert_eq!(
        reserve.encode_to_vec(),
        [0x0a, 1, b'd', 0x18, 5, 0x22, 2, 0x08, 2]
    );
    let answer = ReserveResponse {
        code: Code::Ok as i32,
        reservation_id: "x".into(),
    };
    assert_eq!(answer.encode_to_vec(), [0x08, 1, 0x12, 1, b'x']);
    let commit = CommitRequest {
        domain: "d".into(),
        descriptors: vec![],
        reservation_id: "x".into(),
        actual_amount: 7,
    };
    // 3: reservation_id, 4: actual_amount.
    assert_eq!(
        commit.encode_to_vec(),
        [0x0a, 1, b'd', 0x1a, 1, b'x', 0x20, 7]
    );
    let done = CommitResponse {
        reservation_released: true,
    };
    assert_eq!(done.encode_to_vec(), [0x08, 1]);
}

/// Holds are shared by replicas: reserved through one ratekeeper, seen and committed through
/// another (two limiters on one Redis, as two replicas are), and they survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_made_on_one_replica_is_committed_on_another() {
    use ratekeeper::clock::ManualClock;
    use ratekeeper::limiter::{Call, Limiter};
    use ratekeeper::limits::{LimitSet, parse_limits};
    use ratekeeper::request::{Descriptor, Request};
    use ratekeeper::storage::RedisStorage;

    let prefix = format!("replicas{}", std::process::id());
    let replica = || {
        let storage = RedisStorage::open(
            &common::redis::shared_url(),
            &prefix,
            Duration::from_secs(2),
        )
        .unwrap();
        let limits = LimitSet::new(parse_limits("limits.yaml", LIMITS).unwrap());
        Limiter::new(
            limits,
            Arc::new(storage),
            Arc::new(ManualClock::new(START_MS)),
        )
    };
    let (a, b) = (replica(), replica());
    let request = |hits: u64| Request {
        namespace: DOMAIN.into(),
        descriptors: vec![Descriptor::of(&[
            (LIMIT, "1"),
            ("auth.identity.userid", "u"),
        ])],
        hits,
    };
    let reserved = a.reserve(&request(400), None).await.unwrap();
    let id = reserved.reservation_id.unwrap();
    async fn refused(limiter: &Limiter, hits: u64) -> bool {
        let request = Request {
            namespace: DOMAIN.into(),
            descriptors: vec![Descriptor::of(&[
                (LIMIT, "1"),
                ("auth.identity.userid", "u"),
            ])],
            hits,
        };
        let decision = limiter.decide(&request, Call::CheckRateLimit).await;
        decision.unwrap().refused()
    }
    assert!(refused(&b, 601).await, "b sees a's hold");
    drop(a);
    let committed = b.commit(&request(250), &id).await.unwrap();
    assert!(committed.released);
    let c = replica();
    assert!(
        !refused(&c, 750).await,
        "the commit charged 250 and released the hold"
    );
    assert!(refused(&c, 751).await);
}

/// `/counters` shows each counter's held tokens, and a `remaining` that leaves them out.
async fn counters_show_what_is_held(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    let url = format!("{}/counters/{DOMAIN}", server.http_base);
    // A counter with usage: 100 used, then two holds of 150 and 50.
    server
        .report(request(DOMAIN, shim_descriptor("dora"), 100))
        .await;
    let first = reserve(&server, "dora", 150, None).await;
    assert_eq!(reserved_code(&first), Code::Ok);
    let second = reserve(&server, "dora", 50, None).await;
    assert_eq!(reserved_code(&second), Code::Ok);
    let counters = get_json(&http_client(), &url).await;
    assert_eq!(counters[0]["held"], 200, "{counters}");
    assert_eq!(counters[0]["remaining"], 700, "{counters}");

    // Committed: the hold is gone, its usage counted.
    commit(&server, "dora", &first.reservation_id, 120).await;
    let counters = get_json(&http_client(), &url).await;
    assert_eq!(counters[0]["held"], 50, "{counters}");
    assert_eq!(counters[0]["remaining"], 730, "{counters}");
}

on_every_storage!(
    counters_show_what_is_held,
    the_shims_sequence_holds_commits_and_expires,
    every_admission_sees_the_holds,
    reservations_over_http,
    concurrent_reservations_never_overshoot,
    disabled_reservations_are_unimplemented,
    a_counter_carries_at_most_a_thousand_holds,
);
