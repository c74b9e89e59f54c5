//! Envoy's `ShouldRateLimit` through a real gRPC client: the Limitador path (request-level hits,
//! all-or-nothing) and the per-descriptor path Envoy uses for token charging.

mod common;

use common::*;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, rate_limit::Unit,
};
use ratekeeper::rls::headers::RateLimitHeaders;
use ratekeeper::rls::refusal::OverLimitResponse;

const TOKENS: &str = r#"
- name: llm-free
  namespace: llm_tokens
  max_value: 50
  seconds: 60
  conditions: ["descriptors[0].generic_key == 'llm'"]
  variables: ["descriptors[0].user"]
"#;

const TWO_LIMITS: &str = r#"
- name: per-user
  namespace: api
  max_value: 5
  seconds: 60
  variables: ["descriptors[0].user"]
- name: global
  namespace: api
  max_value: 8
  seconds: 3600
"#;

fn user(name: &str) -> Vec<(&'static str, String)> {
    vec![("generic_key", "llm".into()), ("user", name.into())]
}

fn entries<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn limitador_path_counts_request_hits_and_zero_means_one(backend: Backend) {
    let server = TestServer::on(backend, TWO_LIMITS).await;
    let alice = descriptor(&[("user", "alice")]);
    // hits_addend 0 counts as 1.
    let r = server.should(request("api", vec![alice.clone()], 0)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(
        r.statuses[0].limit_remaining, 4,
        "per-user is the most restrictive"
    );
    let r = server.should(request("api", vec![alice.clone()], 4)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let r = server.should(request("api", vec![alice.clone()], 1)).await;
    assert_eq!(code(&r), Code::OverLimit);
    let status = &r.statuses[0];
    assert_eq!(status.code, Code::OverLimit as i32);
    let limit = status.current_limit.as_ref().unwrap();
    assert_eq!(limit.name, "per-user");
    assert_eq!(limit.requests_per_unit, 5);
    assert_eq!(limit.unit, Unit::Minute as i32);
    assert_eq!(status.duration_until_reset.unwrap().seconds, 60);
}

async fn limitador_path_is_all_or_nothing(backend: Backend) {
    let server = TestServer::on(backend, TWO_LIMITS).await;
    // bob takes 5 of the global 8.
    let r = server
        .should(request("api", vec![descriptor(&[("user", "bob")])], 5))
        .await;
    assert_eq!(code(&r), Code::Ok);
    // alice asks 4: her per-user limit allows it, the global one (3 left) does not; nothing is
    // charged, so her 3 next still pass.
    let alice = descriptor(&[("user", "alice")]);
    let r = server.should(request("api", vec![alice.clone()], 4)).await;
    assert_eq!(code(&r), Code::OverLimit);
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!(limit.name, "global");
    assert_eq!(limit.unit, Unit::Hour as i32);
    let r = server.should(request("api", vec![alice.clone()], 3)).await;
    assert_eq!(code(&r), Code::Ok, "the refused call charged nothing");
    assert_eq!(r.statuses[0].limit_remaining, 0);
}

async fn every_descriptor_gets_a_status_even_without_a_limit(backend: Backend) {
    let server = TestServer::on(backend, TWO_LIMITS).await;
    let r = server
        .should(request(
            "other",
            vec![descriptor(&[("a", "1")]), descriptor(&[("b", "2")])],
            1,
        ))
        .await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses.len(), 2);
    for status in &r.statuses {
        assert_eq!(status.code, Code::Ok as i32);
        assert!(status.current_limit.is_none());
    }
}

async fn empty_domain_answers_unknown(backend: Backend) {
    let server = TestServer::on(backend, TWO_LIMITS).await;
    let r = server
        .should(request("", vec![descriptor(&[("user", "a")])], 1))
        .await;
    assert_eq!(code(&r), Code::Unknown);
    assert_eq!(r.statuses.len(), 1, "one status per descriptor, even here");
    assert_eq!(r.statuses[0].code, Code::Unknown as i32);
    let r = server
        .check(request("", vec![descriptor(&[("user", "a")])], 1))
        .await;
    assert_eq!(code(&r), Code::Unknown);
}

async fn envoy_check_then_charge_sequence(backend: Backend) {
    let server = TestServer::on(backend, TOKENS).await;
    let alice = user("alice");
    let check = || {
        request(
            "llm_tokens",
            vec![descriptor_with_hits(&entries(&alice), 0)],
            0,
        )
    };
    let charge = |n| {
        request(
            "llm_tokens",
            vec![descriptor_with_hits(&entries(&alice), n)],
            0,
        )
    };

    // A check with a present 0 is a pure check: it passes and counts nothing.
    for _ in 0..3 {
        let r = server.should(check()).await;
        assert_eq!(code(&r), Code::Ok);
        assert_eq!(r.statuses[0].limit_remaining, 50);
    }
    // Charges after each response.
    let r = server.should(charge(30)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 20);
    assert_eq!(code(&server.should(check()).await), Code::Ok);
    // A charge beyond what is left is still counted, and reports OVER_LIMIT.
    let r = server.should(charge(30)).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    // Now the budget is spent: the next check is refused.
    let r = server.should(check()).await;
    assert_eq!(code(&r), Code::OverLimit);
    // The counter holds all 60 tokens.
    let counters = server.counters("llm_tokens").await;
    assert_eq!(counters.len(), 1);
    assert_eq!(used(&counters[0].1.state), 60);
    // Bob is unaffected.
    let bob = user("bob");
    let r = server
        .should(request(
            "llm_tokens",
            vec![descriptor_with_hits(&entries(&bob), 0)],
            0,
        ))
        .await;
    assert_eq!(code(&r), Code::Ok);
    // A new window opens a minute after the first charge.
    server.clock.advance_ms(60_000);
    assert_eq!(code(&server.should(check()).await), Code::Ok);
}

async fn exactly_at_the_limit_a_check_is_refused_and_a_charge_is_not_over(backend: Backend) {
    let server = TestServer::on(backend, TOKENS).await;
    let alice = user("alice");
    let r = server
        .should(request(
            "llm_tokens",
            vec![descriptor_with_hits(&entries(&alice), 50)],
            0,
        ))
        .await;
    assert_eq!(code(&r), Code::Ok, "usage == limit is not over");
    let r = server
        .should(request(
            "llm_tokens",
            vec![descriptor_with_hits(&entries(&alice), 0)],
            0,
        ))
        .await;
    assert_eq!(
        code(&r),
        Code::OverLimit,
        "nothing left: a pure check is refused"
    );
}

async fn per_descriptor_path_judges_each_descriptor_on_its_own(backend: Backend) {
    let server = TestServer::on(backend, TOKENS).await;
    let (alice, bob) = (user("alice"), user("bob"));
    // alice spends her budget first.
    server
        .should(request(
            "llm_tokens",
            vec![descriptor_with_hits(&entries(&alice), 50)],
            0,
        ))
        .await;
    // One request: alice checks (present 0), bob has no hits_addend of his own and takes the
    // request-level cost (3).
    let r = server
        .should(request(
            "llm_tokens",
            vec![
                descriptor_with_hits(&entries(&alice), 0),
                descriptor(&entries(&bob)),
            ],
            3,
        ))
        .await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[1].code, Code::Ok as i32);
    assert_eq!(
        r.statuses[1].limit_remaining, 47,
        "bob was charged the request-level 3"
    );
}

async fn draft03_headers_and_retry_after(backend: Backend) {
    let options = Options {
        backend,
        headers: RateLimitHeaders::DraftVersion03,
        ..Options::default()
    };
    let server = TestServer::start_with(TWO_LIMITS, options).await;
    let alice = descriptor(&[("user", "alice")]);
    let r = server.should(request("api", vec![alice.clone()], 2)).await;
    assert_eq!(
        header(&r, "X-RateLimit-Limit"),
        Some(r#"5, 5;w=60;name="per-user", 8;w=3600;name="global""#)
    );
    assert_eq!(header(&r, "X-RateLimit-Remaining"), Some("3"));
    assert_eq!(header(&r, "X-RateLimit-Reset"), Some("60"));
    assert_eq!(
        header(&r, "Retry-After"),
        None,
        "only refusals carry Retry-After"
    );

    server.clock.advance_ms(10_500);
    let r = server.should(request("api", vec![alice.clone()], 4)).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(
        header(&r, "X-RateLimit-Reset"),
        Some("49"),
        "49.5 s, rounded down"
    );
    assert_eq!(header(&r, "Retry-After"), Some("50"), "49.5 s, rounded up");

    // A cost that no window can ever admit gets no Retry-After.
    let r = server.should(request("api", vec![alice], 6)).await;
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(header(&r, "Retry-After"), None);
}

async fn openai_refusals_carry_the_error_body_and_retry_headers(backend: Backend) {
    let options = Options {
        backend,
        headers: RateLimitHeaders::DraftVersion03,
        over_limit_response: OverLimitResponse::OpenAi,
        ..Options::default()
    };
    let server = TestServer::start_with(TWO_LIMITS, options).await;
    let alice = || vec![descriptor(&[("user", "alice")])];
    let r = server.should(request("api", alice(), 4)).await;
    assert_eq!(code(&r), Code::Ok);
    assert!(r.raw_body.is_empty(), "an admitted call has no body");
    assert_eq!(header(&r, "retry-after-ms"), None);

    server.clock.advance_ms(10_500);
    let r = server.should(request("api", alice(), 2)).await;
    assert_eq!(code(&r), Code::OverLimit);
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
    assert!(body["error"]["param"].is_null(), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("per-user") && message.contains("1 of 5 left"),
        "{message}"
    );
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    assert_eq!(header(&r, "retry-after-ms"), Some("49500"));
    // One Retry-After, though both the draft headers and the OpenAI answer want it.
    let retry_after = r
        .response_headers_to_add
        .iter()
        .filter(|h| h.key.eq_ignore_ascii_case("retry-after"))
        .count();
    assert_eq!(retry_after, 1, "{:?}", r.response_headers_to_add);
    assert_eq!(header(&r, "Retry-After"), Some("50"));

    // A cost no window can ever admit says so, without a retry time.
    let r = server.should(request("api", alice(), 6)).await;
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("larger than the whole limit"), "{message}");
    assert_eq!(header(&r, "retry-after-ms"), None);
}

async fn no_headers_unless_asked(backend: Backend) {
    let server = TestServer::on(backend, TWO_LIMITS).await;
    let r = server
        .should(request("api", vec![descriptor(&[("user", "a")])], 1))
        .await;
    assert!(r.response_headers_to_add.is_empty());
}

async fn a_failing_expression_skips_its_limit_without_harm(backend: Backend) {
    let yaml = r#"
- name: broken
  namespace: ns
  max_value: 1
  seconds: 60
  conditions: ["descriptors[0].n > 3"]
- name: fine
  namespace: ns
  max_value: 2
  seconds: 60
"#;
    let server = TestServer::on(backend, yaml).await;
    // "n" is a string: comparing it with an int fails at run time.
    let d = descriptor(&[("n", "7")]);
    for expected in [Code::Ok, Code::Ok, Code::OverLimit] {
        let r = server.should(request("ns", vec![d.clone()], 1)).await;
        assert_eq!(code(&r), expected);
        assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "fine");
    }
    let failed = &server.observed.evaluation_errors;
    assert_eq!(failed.load(std::sync::atomic::Ordering::Relaxed), 3);
}

async fn refunds_give_back_what_an_estimate_took(backend: Backend) {
    let yaml = r#"
- {name: window, namespace: fixed, max_value: 100, seconds: 60, variables: ["descriptors[0].user"]}
- {name: bucket, namespace: bucket, algorithm: token_bucket, max_value: 100, seconds: 60, refill_tokens: 10, variables: ["descriptors[0].user"]}
- {name: sliding, namespace: sliding, algorithm: sliding_window, max_value: 100, seconds: 60, variables: ["descriptors[0].user"]}
"#;
    let server = TestServer::on(backend, yaml).await;
    let alice = [("user", "alice")];
    for ns in ["fixed", "bucket", "sliding"] {
        // The request path charges an estimate of 60.
        let r = server
            .should(request(ns, vec![descriptor_with_hits(&alice, 60)], 0))
            .await;
        assert_eq!(code(&r), Code::Ok, "{ns}");
        assert_eq!(r.statuses[0].limit_remaining, 40, "{ns}");
        // At stream end: the real usage (25) is charged and the estimate refunded, in one call.
        let done = vec![descriptor_with_hits(&alice, 25), refund(&alice, 60)];
        let r = server.should(request(ns, done, 0)).await;
        assert_eq!(code(&r), Code::Ok, "{ns}");
        assert_eq!(
            r.statuses[0].limit_remaining, 15,
            "{ns}: the charge came first"
        );
        assert_eq!(r.statuses[1].limit_remaining, 75, "{ns}: 25 really used");
        // A refund larger than what was used leaves a full budget, never more.
        let r = server
            .should(request(ns, vec![refund(&alice, 500)], 0))
            .await;
        assert_eq!(code(&r), Code::Ok, "{ns}");
        assert_eq!(r.statuses[0].limit_remaining, 100, "{ns}");
        let r = server
            .should(request(ns, vec![descriptor_with_hits(&alice, 100)], 0))
            .await;
        assert_eq!(code(&r), Code::Ok, "{ns}: the whole budget, not more");
        assert_eq!(r.statuses[0].limit_remaining, 0, "{ns}");
        // A refund never creates a counter.
        let r = server
            .should(request(ns, vec![refund(&[("user", "bob")], 10)], 0))
            .await;
        assert_eq!(code(&r), Code::Ok, "{ns}");
        let counters = server.counters(ns).await;
        let users: Vec<_> = counters.iter().map(|(_, c)| c.key.values()).collect();
        assert_eq!(users, [["alice"]], "{ns}");
    }
}

on_every_storage!(
    openai_refusals_carry_the_error_body_and_retry_headers,
    refunds_give_back_what_an_estimate_took,
    limitador_path_counts_request_hits_and_zero_means_one,
    limitador_path_is_all_or_nothing,
    every_descriptor_gets_a_status_even_without_a_limit,
    empty_domain_answers_unknown,
    envoy_check_then_charge_sequence,
    exactly_at_the_limit_a_check_is_refused_and_a_charge_is_not_over,
    per_descriptor_path_judges_each_descriptor_on_its_own,
    draft03_headers_and_retry_after,
    no_headers_unless_asked,
    a_failing_expression_skips_its_limit_without_harm,
);
