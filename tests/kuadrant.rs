//! The Kuadrant wasm-shim's TokenRateLimitPolicy sequence against the shipped tiers:
//! CheckRateLimit (hits_addend absent) on the request, Report with usage.total_tokens after it.

mod common;

use common::*;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

const DOMAIN: &str = "llm/llm-route";
const FREE: &str = "tokenlimit.free__065bb34d";
const GOLD: &str = "tokenlimit.gold__bf2c6eed";

fn shipped_tiers() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/limits/llm-tiers.yaml"
    ))
    .unwrap()
}

fn shim(
    identifier: &str,
    user: &str,
    hits: u32,
) -> ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitRequest {
    request(
        DOMAIN,
        vec![descriptor(&[
            (identifier, "1"),
            ("auth.identity.userid", user),
        ])],
        hits,
    )
}

async fn free_user_is_limited_after_50_tokens_and_gold_keeps_going(backend: Backend) {
    let server = TestServer::on(backend, &shipped_tiers()).await;

    // Free user: three calls of 20 tokens. Each check passes (0, 20, 40 used); the third
    // report takes usage to 60 > 50, so the next check is refused.
    for call in 0..3 {
        let check = server.check(shim(FREE, "user-1", 0)).await;
        assert_eq!(code(&check), Code::Ok, "check {call}");
        let report = server.report(shim(FREE, "user-1", 20)).await;
        assert_eq!(code(&report), Code::Ok, "a report always answers OK");
    }
    let check = server.check(shim(FREE, "user-1", 0)).await;
    assert_eq!(code(&check), Code::OverLimit);
    let status = &check.statuses[0];
    assert_eq!(status.current_limit.as_ref().unwrap().name, "free");
    assert_eq!(status.current_limit.as_ref().unwrap().requests_per_unit, 50);
    assert_eq!(status.limit_remaining, 0);

    // The report past the limit was counted in full.
    let counters = server.counters(DOMAIN).await;
    assert_eq!(counters.len(), 1);
    assert_eq!(used(&counters[0].1.state), 60);

    // A gold user spends 150 tokens and is still admitted; another free user is unaffected.
    for _ in 0..3 {
        assert_eq!(code(&server.check(shim(GOLD, "user-2", 0)).await), Code::Ok);
        server.report(shim(GOLD, "user-2", 50)).await;
    }
    let check = server.check(shim(GOLD, "user-2", 0)).await;
    assert_eq!(code(&check), Code::Ok);
    assert_eq!(check.statuses[0].limit_remaining, 50);
    assert_eq!(code(&server.check(shim(FREE, "user-3", 0)).await), Code::Ok);

    // A minute after the free user's first report, the budget is back.
    server.clock.advance_ms(60_000);
    assert_eq!(code(&server.check(shim(FREE, "user-1", 0)).await), Code::Ok);
}

async fn check_is_read_only_and_costs_its_hits(backend: Backend) {
    let server = TestServer::on(backend, &shipped_tiers()).await;
    for _ in 0..10 {
        let r = server.check(shim(FREE, "u", 0)).await;
        assert_eq!(code(&r), Code::Ok);
        assert_eq!(r.statuses[0].limit_remaining, 50, "a check charges nothing");
    }
    assert!(server.counters(DOMAIN).await.is_empty());
    server.report(shim(FREE, "u", 45)).await;
    assert_eq!(code(&server.check(shim(FREE, "u", 5)).await), Code::Ok);
    assert_eq!(
        code(&server.check(shim(FREE, "u", 6)).await),
        Code::OverLimit
    );
}

async fn report_with_zero_hits_counts_one(backend: Backend) {
    let server = TestServer::on(backend, &shipped_tiers()).await;
    let r = server.report(shim(FREE, "u", 0)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 49);
}

async fn a_request_without_the_identifier_matches_no_tier(backend: Backend) {
    let server = TestServer::on(backend, &shipped_tiers()).await;
    let r = server
        .report(request(
            DOMAIN,
            vec![descriptor(&[("auth.identity.userid", "u")])],
            1000,
        ))
        .await;
    assert_eq!(code(&r), Code::Ok);
    assert!(r.statuses[0].current_limit.is_none());
    assert!(server.counters(DOMAIN).await.is_empty());
}

on_every_storage!(
    free_user_is_limited_after_50_tokens_and_gold_keeps_going,
    check_is_read_only_and_costs_its_hits,
    report_with_zero_hits_counts_one,
    a_request_without_the_identifier_matches_no_tier,
);
