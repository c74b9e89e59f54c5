//! In-flight (concurrency) limits through real gRPC clients, on every storage: 120 concurrent
//! acquisitions on a limit of 4 (Limitador's path, Envoy's per-descriptor path with its refunds,
//! Kuadrant's Reserve), release by Commit and by Envoy's refund (the oldest slot first), slots
//! freed by expiry, atomicity with a token limit in the same call, and the statuses.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::{
    CommitRequest, CommitResponse, ReserveRequest, ReserveResponse,
};
use serde_json::json;

const DOMAIN: &str = "llm";

/// 4 generations at once per API key (a slot lives at most 30 s), addressed by its own
/// descriptor; 1,000 tokens a minute per API key beside it.
const LIMITS: &str = r#"
- name: inflight
  namespace: llm
  max_value: 4
  seconds: 30
  algorithm: concurrency
  conditions: ['descriptors[0].generic_key == "inflight"']
  variables: ['descriptors[0].api_key']
- name: tokens
  namespace: llm
  max_value: 1000
  seconds: 60
  conditions: ['descriptors[0].generic_key == "tokens"']
  variables: ['descriptors[0].api_key']
"#;

fn inflight(key: &str) -> Vec<(&'static str, String)> {
    vec![("generic_key", "inflight".into()), ("api_key", key.into())]
}

fn entries<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Limitador's path: the request as a whole (no descriptor carries its own hits).
async fn admit(server: &TestServer, key: &str) -> RateLimitResponse {
    let d = descriptor(&entries(&inflight(key)));
    server.should(request(DOMAIN, vec![d], 0)).await
}

/// Envoy's request path: the in-flight descriptor with hits_addend 1.
async fn envoy_admit(server: &TestServer, key: &str) -> RateLimitResponse {
    let d = descriptor_with_hits(&entries(&inflight(key)), 1);
    server.should(request(DOMAIN, vec![d], 0)).await
}

/// Envoy's stream done: the in-flight descriptor refunded (`is_negative_hits`).
async fn envoy_release(server: &TestServer, key: &str) -> RateLimitResponse {
    let d = refund(&entries(&inflight(key)), 1);
    server.should(request(DOMAIN, vec![d], 0)).await
}

/// Kuadrant's read-only check of the in-flight descriptor: (code, free slots, reset in s).
async fn free_slots(server: &TestServer, key: &str) -> (Code, u32, i64) {
    let d = descriptor(&entries(&inflight(key)));
    let response = server.check(request(DOMAIN, vec![d], 0)).await;
    let status = &response.statuses[0];
    let reset = status
        .duration_until_reset
        .as_ref()
        .map_or(-1, |d| d.seconds);
    (code(&response), status.limit_remaining, reset)
}

async fn reserve(server: &TestServer, key: &str, amount: u64, ttl_s: i64) -> ReserveResponse {
    server
        .kuadrant
        .clone()
        .reserve(ReserveRequest {
            domain: DOMAIN.into(),
            descriptors: vec![descriptor(&entries(&inflight(key)))],
            amount,
            ttl: Some(prost_types::Duration {
                seconds: ttl_s,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn commit(server: &TestServer, key: &str, id: &str, actual: u64) -> CommitResponse {
    server
        .kuadrant
        .clone()
        .commit(CommitRequest {
            domain: DOMAIN.into(),
            descriptors: vec![descriptor(&entries(&inflight(key)))],
            reservation_id: id.into(),
            actual_amount: actual,
        })
        .await
        .unwrap()
        .into_inner()
}

fn reserved(response: &ReserveResponse) -> Code {
    Code::try_from(response.code).unwrap()
}

/// 120 clients at once on a limit of 4, three ways: exactly 4 are admitted each time, and
/// nothing else is taken.
async fn a_hundred_and_twenty_at_once_admit_exactly_four(backend: Backend) {
    let server = Arc::new(TestServer::on(backend, LIMITS).await);
    let ok_of = |codes: Vec<Code>| codes.iter().filter(|c| **c == Code::Ok).count();
    let at_once = |key: &'static str, how: u8| {
        let tasks: Vec<_> = (0..120)
            .map(|_| {
                let server = server.clone();
                tokio::spawn(async move {
                    match how {
                        0 => code(&admit(&server, key).await),
                        1 => code(&envoy_admit(&server, key).await),
                        _ => reserved(&reserve(&server, key, 500, 30).await),
                    }
                })
            })
            .collect();
        async move {
            let mut codes = Vec::new();
            for task in tasks {
                codes.push(task.await.unwrap());
            }
            codes
        }
    };
    // Limitador's path: all or nothing, a refused call takes nothing.
    assert_eq!(ok_of(at_once("limitador", 0).await), 4);
    assert_eq!(free_slots(&server, "limitador").await.1, 0);
    // Kuadrant's Reserve (whatever its amount: one slot).
    assert_eq!(ok_of(at_once("kuadrant", 2).await), 4);
    assert_eq!(free_slots(&server, "kuadrant").await.1, 0);
    // Envoy's per-descriptor path: a charge takes a slot even when refused (so that the
    // refund Envoy sends for every request at stream done gives back exactly what was taken).
    assert_eq!(ok_of(at_once("envoy", 1).await), 4);
    for _ in 0..120 {
        envoy_release(&server, "envoy").await;
    }
    assert_eq!(free_slots(&server, "envoy").await, (Code::Ok, 4, 0));
}

/// Clients that run for a while and release, as Envoy does (a refund at stream done for every
/// request, admitted or not): never more than 4 run at once, and the slots keep turning over.
/// (A refused call holds a slot until its refund comes: many clients that retried at once,
/// without backing off, would keep the slots taken by refusals most of the time; see
/// docs/in-flight-limits.md.)
async fn never_more_than_four_run_at_once(backend: Backend) {
    let server = Arc::new(TestServer::on(backend, LIMITS).await);
    let running = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let (server, running, most, admitted) = (
                server.clone(),
                running.clone(),
                most.clone(),
                admitted.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..6 {
                    let answer = envoy_admit(&server, "key").await;
                    let ok = code(&answer) == Code::Ok;
                    if ok {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        admitted.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                    }
                    envoy_release(&server, "key").await;
                    if !ok {
                        // A refused client backs off, as it would on a 429.
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 4, "{most} ran at once on a limit of 4");
    assert!(admitted.load(Ordering::SeqCst) > 4, "slots were released");
    assert_eq!(free_slots(&server, "key").await, (Code::Ok, 4, 0));
}

/// A Commit frees its reservation's slot; an Envoy refund frees the oldest admission's slot;
/// a Report or a Commit of an id that holds nothing takes none; the statuses tell free slots and the oldest's end.
async fn commits_and_refunds_release_slots(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    // A reservation's slot lives min(ttl, seconds): 10 s here.
    let held = reserve(&server, "k", 0, 10).await;
    assert_eq!(reserved(&held), Code::Ok);
    assert_eq!(free_slots(&server, "k").await, (Code::Ok, 3, 10));
    let done = commit(&server, "k", &held.reservation_id, 250).await;
    assert!(done.reservation_released);
    assert_eq!(free_slots(&server, "k").await, (Code::Ok, 4, 0));
    // A Commit of an id that holds nothing (committed already) takes no slot.
    let again = commit(&server, "k", &held.reservation_id, 250).await;
    assert!(!again.reservation_released);
    assert_eq!(free_slots(&server, "k").await.1, 4);

    // A Report (usage of a request that has ended) takes none either.
    let d = descriptor(&entries(&inflight("k")));
    assert_eq!(
        code(&server.report(request(DOMAIN, vec![d], 7)).await),
        Code::Ok
    );
    assert_eq!(free_slots(&server, "k").await.1, 4);

    // Admissions at 0 s, 5 s and 8 s: statuses count down to the oldest's end.
    let first = envoy_admit(&server, "k").await;
    assert_eq!(code(&first), Code::Ok);
    assert_eq!(first.statuses[0].limit_remaining, 3);
    server.clock.advance_ms(5_000);
    admit(&server, "k").await;
    server.clock.advance_ms(3_000);
    let third = envoy_admit(&server, "k").await;
    let status = &third.statuses[0];
    assert_eq!(status.limit_remaining, 1);
    assert_eq!(status.duration_until_reset.as_ref().unwrap().seconds, 22);
    // The refund frees the oldest (taken at 0 s): now the one of 5 s ends first.
    let released = envoy_release(&server, "k").await;
    assert_eq!(code(&released), Code::Ok);
    assert_eq!(free_slots(&server, "k").await, (Code::Ok, 2, 27));
    // A check (cost 0 on Envoy's path too) takes nothing.
    let d = descriptor_with_hits(&entries(&inflight("k")), 0);
    let checked = server.should(request(DOMAIN, vec![d], 0)).await;
    assert_eq!(
        (code(&checked), checked.statuses[0].limit_remaining),
        (Code::Ok, 2)
    );
    assert_eq!(free_slots(&server, "k").await.1, 2);
    // Refunds beyond the slots taken free nothing more, and never fail.
    for _ in 0..3 {
        assert_eq!(code(&envoy_release(&server, "k").await), Code::Ok);
    }
    assert_eq!(free_slots(&server, "k").await, (Code::Ok, 4, 0));
    server.shutdown().await;
}

/// A client that vanished: its slot ends `seconds` after it was taken, oldest first.
async fn slots_end_by_themselves(backend: Backend) {
    const SHORT: &str = r#"
- name: inflight
  namespace: llm
  max_value: 2
  seconds: 2
  algorithm: concurrency
  conditions: ['descriptors[0].generic_key == "inflight"']
  variables: ['descriptors[0].api_key']
"#;
    let server = TestServer::on(backend, SHORT).await;
    assert_eq!(code(&admit(&server, "gone").await), Code::Ok);
    server.clock.advance_ms(1_000);
    assert_eq!(code(&admit(&server, "gone").await), Code::Ok);
    let refused = admit(&server, "gone").await;
    assert_eq!(code(&refused), Code::OverLimit);
    let status = &refused.statuses[0];
    assert_eq!(status.limit_remaining, 0);
    assert_eq!(status.duration_until_reset.as_ref().unwrap().seconds, 1);
    // 1 ms before the first slot ends: still full; at its end, one is free.
    server.clock.advance_ms(999);
    assert_eq!(code(&admit(&server, "gone").await), Code::OverLimit);
    server.clock.advance_ms(1);
    assert_eq!(free_slots(&server, "gone").await.1, 1);
    assert_eq!(code(&admit(&server, "gone").await), Code::Ok);
    // A reservation with a longer ttl lives `seconds` at most.
    let r = reserve(&server, "r", 10, 60).await;
    assert_eq!(reserved(&r), Code::Ok);
    server.clock.advance_ms(1_999);
    assert_eq!(free_slots(&server, "r").await.1, 1);
    server.clock.advance_ms(1);
    assert_eq!(free_slots(&server, "r").await, (Code::Ok, 2, 0));
    server.shutdown().await;
}

/// One call, an in-flight limit and a token limit (Limitador's path, and a reservation): a call
/// refused by the tokens takes no slot, and a call refused for want of a slot charges no tokens.
async fn atomic_with_a_token_limit(backend: Backend) {
    const BOTH: &str = r#"
- name: inflight
  namespace: llm
  max_value: 2
  seconds: 30
  algorithm: concurrency
  variables: ['descriptors[0].api_key']
- name: tokens
  namespace: llm
  max_value: 100
  seconds: 60
  variables: ['descriptors[0].api_key']
"#;
    let server = TestServer::on(backend, BOTH).await;
    let call = |hits: u32| request(DOMAIN, vec![descriptor(&[("api_key", "a")])], hits);
    assert_eq!(code(&server.should(call(30)).await), Code::Ok);
    // 80 more tokens do not fit: refused, and no slot taken (else the next call had none).
    assert_eq!(code(&server.should(call(80)).await), Code::OverLimit);
    assert_eq!(code(&server.should(call(30)).await), Code::Ok);
    // 10 tokens fit, but both slots are taken: refused, and no token charged.
    assert_eq!(code(&server.should(call(10)).await), Code::OverLimit);
    let tokens = server.counters(DOMAIN).await;
    let used: u64 = (tokens.iter())
        .filter(|(limit, _)| limit.name.as_deref() == Some("tokens"))
        .map(|(_, counter)| used(&counter.state))
        .sum();
    assert_eq!(used, 60);
    // A reservation the tokens refuse takes no slot either.
    let other = |amount| ReserveRequest {
        domain: DOMAIN.into(),
        descriptors: vec![descriptor(&[("api_key", "b")])],
        amount,
        ttl: None,
    };
    let mut kuadrant = server.kuadrant.clone();
    let big = kuadrant.reserve(other(101)).await.unwrap().into_inner();
    assert_eq!(reserved(&big), Code::OverLimit);
    for _ in 0..2 {
        let ok = kuadrant.reserve(other(10)).await.unwrap().into_inner();
        assert_eq!(reserved(&ok), Code::Ok);
    }
    let third = kuadrant.reserve(other(10)).await.unwrap().into_inner();
    assert_eq!(reserved(&third), Code::OverLimit, "two slots, both taken");
    server.shutdown().await;
}

/// `GET /counters` lists a concurrency counter with its slots (remaining = free slots, held =
/// slots taken, expiring with the oldest), and `POST /explain` counts them as its usage.
async fn counters_and_explain_show_slots(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    admit(&server, "k").await;
    server.clock.advance_ms(1_000);
    envoy_admit(&server, "k").await;
    let client = http_client();
    let counters = get_json(&client, &format!("{}/counters/llm", server.http_base)).await;
    let listed: Vec<_> = (counters.as_array().unwrap().iter())
        .filter(|c| c["limit"]["algorithm"] == "concurrency")
        .collect();
    assert_eq!(listed.len(), 1, "{counters}");
    let counter = listed[0];
    assert_eq!(counter["set_variables"]["descriptors[0].api_key"], "k");
    assert_eq!(
        (&counter["remaining"], &counter["held"]),
        (&json!(2), &json!(2))
    );
    assert_eq!(counter["expires_in_seconds"], 29, "the oldest ends at 30 s");
    let explained = post_json(
        &client,
        &format!("{}/explain", server.http_base),
        &json!({
            "namespace": "llm",
            "values": {"generic_key": "inflight", "api_key": "k"},
        }),
    )
    .await;
    let limit = &explained["limits"][0];
    assert_eq!(limit["limit"]["name"], "inflight", "{explained}");
    let counter = &limit["counter"];
    assert_eq!(
        (
            &counter["usage"],
            &counter["remaining"],
            &counter["reset_in_ms"]
        ),
        (&json!(2), &json!(2), &json!(29_000)),
        "{explained}"
    );
    server.shutdown().await;
}

on_every_storage!(
    counters_and_explain_show_slots,
    a_hundred_and_twenty_at_once_admit_exactly_four,
    never_more_than_four_run_at_once,
    commits_and_refunds_release_slots,
    slots_end_by_themselves,
    atomic_with_a_token_limit,
);
