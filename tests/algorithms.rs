//! Token buckets and sliding windows through the real services, on every storage: the
//! boundary burst a fixed window allows and a sliding window refuses, bucket debt and exact
//! refills, and ASM's HTTP interface with its user-type table.

mod common;

use common::*;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::rls::headers::RateLimitHeaders;

fn limit(algorithm: &str) -> String {
    format!(
        "- {{name: l, namespace: ns, algorithm: {algorithm}, max_value: 100, seconds: 60, variables: ['descriptors[0].u']}}"
    )
}

async fn spend(server: &TestServer, cost: u32) -> Code {
    code(
        &server
            .should(request("ns", vec![descriptor(&[("u", "x")])], cost))
            .await,
    )
}

/// 100 per minute: 1 at t=0, 99 at t=59 s, then 100 more at t=60 s.
async fn boundary_burst(backend: Backend, algorithm: &str) -> Code {
    let server = TestServer::on(backend, &limit(algorithm)).await;
    assert_eq!(spend(&server, 1).await, Code::Ok);
    server.clock.advance_ms(59_000);
    assert_eq!(spend(&server, 99).await, Code::Ok);
    server.clock.advance_ms(1_000);
    spend(&server, 100).await
}

async fn fixed_window_allows_the_boundary_burst_sliding_does_not(backend: Backend) {
    assert_eq!(
        boundary_burst(backend, "fixed_window").await,
        Code::Ok,
        "199 in 1 s"
    );
    assert_eq!(
        boundary_burst(backend, "sliding_window").await,
        Code::OverLimit
    );
}

async fn sliding_window_frees_budget_as_the_old_window_fades(backend: Backend) {
    let server = TestServer::on(backend, &limit("sliding_window")).await;
    assert_eq!(spend(&server, 100).await, Code::Ok);
    server.clock.advance_ms(90_000);
    // Half of the first window still counts: 50 fit, 51 do not.
    let r = server
        .check(request("ns", vec![descriptor(&[("u", "x")])], 51))
        .await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].limit_remaining, 50);
    assert_eq!(spend(&server, 50).await, Code::Ok);
}

async fn token_bucket_debt_and_exact_retry_after(backend: Backend) {
    let yaml = "- {name: b, namespace: ns, algorithm: token_bucket, max_value: 200, seconds: 30, refill_tokens: 50, variables: ['descriptors[0].u']}";
    let options = Options {
        backend,
        headers: RateLimitHeaders::DraftVersion03,
        ..Options::default()
    };
    let server = TestServer::start_with(yaml, options).await;
    let x = || vec![descriptor(&[("u", "x")])];
    // Starts full.
    let r = server.check(request("ns", x(), 200)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 200);
    // A report of 290 leaves 90 of debt.
    let r = server.report(request("ns", x(), 290)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    // Full again after ceil(290 / 50) = 6 steps of 30 s.
    assert_eq!(r.statuses[0].duration_until_reset.unwrap().seconds, 180);
    let r = server.check(request("ns", x(), 1)).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(
        header(&r, "Retry-After"),
        Some("60"),
        "two refills repay 90 and give 10"
    );
    server.clock.advance_ms(59_999);
    assert_eq!(
        code(&server.check(request("ns", x(), 1)).await),
        Code::OverLimit
    );
    server.clock.advance_ms(1);
    let r = server.check(request("ns", x(), 10)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 10);
}

async fn continuous_token_bucket_refills_per_millisecond(backend: Backend) {
    let yaml = "- {name: c, namespace: ns, algorithm: token_bucket, max_value: 60, seconds: 60, variables: ['descriptors[0].u']}";
    let server = TestServer::on(backend, yaml).await;
    let x = || vec![descriptor(&[("u", "x")])];
    assert_eq!(code(&server.should(request("ns", x(), 60)).await), Code::Ok);
    assert_eq!(
        code(&server.should(request("ns", x(), 1)).await),
        Code::OverLimit
    );
    server.clock.advance_ms(2_999);
    let r = server.check(request("ns", x(), 1)).await;
    assert_eq!(r.statuses[0].limit_remaining, 2, "one token a second");
    server.clock.advance_ms(1);
    assert_eq!(code(&server.should(request("ns", x(), 3)).await), Code::Ok);
}

async fn asm_user_types_regular_user_is_limited_first(backend: Backend) {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/limits/asm-user-types.yaml"
    ))
    .unwrap();
    let server = TestServer::on(backend, &yaml).await;
    let http = reqwest::Client::new();
    let check = |key: &'static str| {
        let url = format!("{}/ratelimit", server.http_base);
        let http = http.clone();
        async move {
            let keys = format!("[\"{key}\"]");
            let r = http
                .get(url)
                .query(&[("ratelimit_keys", keys)])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let report = |key: &'static str, tokens: u64| {
        let url = format!("{}/update_ratelimit_record", server.http_base);
        let http = http.clone();
        async move {
            let body = serde_json::json!({"ratelimit_keys": [key], "prompt_tokens": tokens / 2,
                "completion_tokens": tokens - tokens / 2, "total_tokens": tokens});
            let r = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // The tutorial's keys (the plug-in sends the `user-type` header as is); both user types
    // spend 120 tokens a call.
    let mut regular_limited_at = None;
    let mut subscriber_limited_at = None;
    for call in 1..=10 {
        for (key, limited_at) in [
            ("regular-user", &mut regular_limited_at),
            ("subscriber", &mut subscriber_limited_at),
        ] {
            if limited_at.is_some() {
                continue;
            }
            let answer = check(key).await;
            if answer["allow"] == true {
                report(key, 120).await;
            } else {
                let description = answer["description"].as_str().unwrap();
                assert!(description.contains(key), "{description}");
                *limited_at = Some(call);
            }
        }
    }
    // regular-user: 200 → 80 → -40: the third check is refused. subscriber: after nine
    // reports 1000 - 1080 = -80: the tenth check is refused.
    assert_eq!(regular_limited_at, Some(3));
    assert_eq!(subscriber_limited_at, Some(10));
    // 30 s later regular-user has +50: 10 tokens, so it may go again.
    server.clock.advance_ms(30_000);
    assert_eq!(check("regular-user").await["allow"], true);
    // A key no rule matches is not limited.
    assert_eq!(check("guest").await["allow"], true);
}

on_every_storage!(
    fixed_window_allows_the_boundary_burst_sliding_does_not,
    sliding_window_frees_budget_as_the_old_window_fades,
    token_bucket_debt_and_exact_retry_after,
    continuous_token_bucket_refills_per_millisecond,
    asm_user_types_regular_user_is_limited_first,
);

#[tokio::test]
async fn asm_api_refuses_malformed_keys() {
    let server = TestServer::start("[]").await;
    let r = reqwest::Client::new()
        .get(format!("{}/ratelimit", server.http_base))
        .query(&[("ratelimit_keys", "not json")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
