//! envoyproxy/ratelimit's integration scenarios, in our words, through a real gRPC client
//! against limits in its own configuration format, on memory and on Redis: basic limits,
//! nested descriptors, wildcards, replaces, shadow mode, unlimited, per-descriptor limit
//! overrides, quota mode, how the descriptors of one request are counted, clock-aligned
//! windows and dynamic metadata.

mod common;

use common::*;
use ratekeeper::limits::RatelimitSettings;
use ratekeeper::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, rate_limit::Unit,
};

/// Runs each scenario on memory and on a real Redis.
macro_rules! on_memory_and_redis {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::common::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::common::Backend::Redis).await })*
        }
    };
}

on_memory_and_redis!(
    basic_limits_count_per_value_and_reset_at_the_top_of_the_unit,
    nested_descriptors_take_the_limit_of_the_deepest_matching_node,
    wildcards_count_per_value_unless_the_threshold_is_shared,
    replaces_removes_the_named_limit_from_the_request,
    shadow_mode_counts_but_answers_ok,
    global_shadow_mode_answers_ok_with_over_limit_statuses,
    unlimited_answers_ok_without_counting,
    a_descriptor_limit_overrides_the_configured_one_on_its_own_counter,
    quota_mode_refuses_only_when_every_quota_descriptor_is_over,
    every_descriptor_is_counted_even_when_another_is_over,
    stop_increment_counts_nothing_for_a_refused_request,
    hits_addend_charges_a_token_budget,
    dynamic_metadata_carries_the_passed_descriptors_metadata,
    a_calendar_month_ends_at_midnight_on_the_first_in_its_zone,
    a_cost_weighs_the_usage_each_descriptor_charges,
    a_concurrency_limit_takes_a_slot_per_request_and_a_refund_frees_one,
);

const BASIC: &str = r#"
domain: basic
descriptors:
  - key: key1
    rate_limit: {unit: second, requests_per_unit: 2}
  - key: key1
    value: vip
    rate_limit: {unit: minute, requests_per_unit: 4, name: vip}
  - key: key1
    value: open
  - key: key2
    rate_limit: {unit: minute, requests_per_unit: 3}
"#;

fn options(backend: Backend, ratelimit: RatelimitSettings) -> Options {
    Options {
        backend,
        ratelimit,
        ..Options::default()
    }
}

async fn should(
    server: &TestServer,
    domain: &str,
    descriptors: &[&[(&str, &str)]],
) -> RateLimitResponse {
    let descriptors = descriptors.iter().map(|d| descriptor(d)).collect();
    server.should(request(domain, descriptors, 0)).await
}

fn codes(response: &RateLimitResponse) -> Vec<Code> {
    (response.statuses.iter())
        .map(|s| Code::try_from(s.code).unwrap())
        .collect()
}

async fn basic_limits_count_per_value_and_reset_at_the_top_of_the_unit(backend: Backend) {
    let server = TestServer::on(backend, BASIC).await;
    // A key without value: each value has its own counter.
    for remaining in [1, 0] {
        let r = should(&server, "basic", &[&[("key1", "alice")]]).await;
        assert_eq!(code(&r), Code::Ok);
        let status = &r.statuses[0];
        assert_eq!(status.limit_remaining, remaining);
        let limit = status.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (2, Unit::Second as i32)
        );
    }
    let r = should(&server, "basic", &[&[("key1", "alice")]]).await;
    assert_eq!(code(&r), Code::OverLimit);
    let r = should(&server, "basic", &[&[("key1", "bob")]]).await;
    assert_eq!(code(&r), Code::Ok, "bob has his own counter");
    // A value of its own takes its own limit, with its name.
    let r = should(&server, "basic", &[&[("key1", "vip")]]).await;
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!((limit.requests_per_unit, limit.name.as_str()), (4, "vip"));
    // A node without rate_limit: no limit at all.
    for _ in 0..5 {
        let r = should(&server, "basic", &[&[("key1", "open")]]).await;
        assert_eq!(code(&r), Code::Ok);
        assert!(r.statuses[0].current_limit.is_none());
    }
    // Unknown keys and domains are not limited.
    let r = should(&server, "basic", &[&[("other", "x")]]).await;
    assert_eq!(
        (code(&r), r.statuses[0].current_limit.is_none()),
        (Code::Ok, true)
    );

    // Windows are aligned to the clock: 40 s into the minute, a per-minute window ends in
    // 20 s, not in 60.
    server.clock.advance_ms(40_000);
    for _ in 0..3 {
        let r = should(&server, "basic", &[&[("key2", "k")]]).await;
        assert_eq!(code(&r), Code::Ok);
        assert_eq!(
            r.statuses[0].duration_until_reset.as_ref().unwrap().seconds,
            20
        );
    }
    assert_eq!(
        code(&should(&server, "basic", &[&[("key2", "k")]]).await),
        Code::OverLimit
    );
    server.clock.advance_ms(19_999);
    assert_eq!(
        code(&should(&server, "basic", &[&[("key2", "k")]]).await),
        Code::OverLimit
    );
    server.clock.advance_ms(1);
    let r = should(&server, "basic", &[&[("key2", "k")]]).await;
    assert_eq!(code(&r), Code::Ok, "a new minute, a new window");
    assert_eq!(r.statuses[0].limit_remaining, 2);
}

const NESTED: &str = r#"
domain: nested
descriptors:
  - key: route
    value: chat
    rate_limit: {unit: minute, requests_per_unit: 10}
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 1}
      - key: user
        value: admin
        descriptors:
          - key: tier
            rate_limit: {unit: hour, requests_per_unit: 2}
"#;

async fn nested_descriptors_take_the_limit_of_the_deepest_matching_node(backend: Backend) {
    let server = TestServer::on(backend, NESTED).await;
    let limit_of = |r: &RateLimitResponse| {
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
    };
    let r = should(&server, "nested", &[&[("route", "chat")]]).await;
    assert_eq!(limit_of(&r), Some(10));
    let r = should(&server, "nested", &[&[("route", "chat"), ("user", "u1")]]).await;
    assert_eq!(limit_of(&r), Some(1));
    let r = should(&server, "nested", &[&[("route", "chat"), ("user", "u1")]]).await;
    assert_eq!(code(&r), Code::OverLimit);
    let r = should(&server, "nested", &[&[("route", "chat"), ("user", "u2")]]).await;
    assert_eq!(code(&r), Code::Ok, "per user");
    // The admin node has no limit of its own; its child has.
    let r = should(
        &server,
        "nested",
        &[&[("route", "chat"), ("user", "admin")]],
    )
    .await;
    assert_eq!(limit_of(&r), None);
    let r = should(
        &server,
        "nested",
        &[&[("route", "chat"), ("user", "admin"), ("tier", "x")]],
    )
    .await;
    assert_eq!(limit_of(&r), Some(2));
    // More entries than the tree is deep, or in another order: no limit.
    let r = should(
        &server,
        "nested",
        &[&[("route", "chat"), ("user", "u3"), ("extra", "1")]],
    )
    .await;
    assert_eq!(limit_of(&r), None);
    let r = should(&server, "nested", &[&[("user", "u3"), ("route", "chat")]]).await;
    assert_eq!(limit_of(&r), None);
}

const WILDCARDS: &str = r#"
domain: wild
descriptors:
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: path
    value: /api/health
  - key: path
    value: /v*/models
    share_threshold: true
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: path
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;

async fn wildcards_count_per_value_unless_the_threshold_is_shared(backend: Backend) {
    let server = TestServer::on(backend, WILDCARDS).await;
    let path = |p: &'static str| [("path", p)];
    let r = should(&server, "wild", &[&path("/api/a")]).await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        1
    );
    assert_eq!(
        code(&should(&server, "wild", &[&path("/api/a")]).await),
        Code::OverLimit
    );
    assert_eq!(
        code(&should(&server, "wild", &[&path("/api/b")]).await),
        Code::Ok,
        "per value"
    );
    // An exact value wins over the wildcard.
    let r = should(&server, "wild", &[&path("/api/health")]).await;
    assert!(r.statuses[0].current_limit.is_none());
    // A wildcard in the middle, with a shared threshold: every match counts on one counter.
    assert_eq!(
        code(&should(&server, "wild", &[&path("/v1/models")]).await),
        Code::Ok
    );
    assert_eq!(
        code(&should(&server, "wild", &[&path("/v2/models")]).await),
        Code::Ok
    );
    assert_eq!(
        code(&should(&server, "wild", &[&path("/v3/models")]).await),
        Code::OverLimit
    );
    // No wildcard matches: the key's default.
    let r = should(&server, "wild", &[&path("/v1/embeddings")]).await;
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        100
    );
}

const REPLACES: &str = r#"
domain: replaces
descriptors:
  - key: api
    rate_limit: {unit: minute, requests_per_unit: 1, name: general}
  - key: user
    value: premium
    rate_limit:
      unit: minute
      requests_per_unit: 5
      replaces: [{name: general}]
"#;

async fn replaces_removes_the_named_limit_from_the_request(backend: Backend) {
    let server = TestServer::on(backend, REPLACES).await;
    let premium: &[&[(&str, &str)]] = &[&[("api", "x")], &[("user", "premium")]];
    for _ in 0..5 {
        let r = should(&server, "replaces", premium).await;
        assert_eq!(code(&r), Code::Ok);
        assert!(r.statuses[0].current_limit.is_none(), "replaced");
    }
    assert_eq!(
        code(&should(&server, "replaces", premium).await),
        Code::OverLimit
    );
    // Without the replacing descriptor, the general limit applies (and was not counted).
    let r = should(&server, "replaces", &[&[("api", "x")]]).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(
        code(&should(&server, "replaces", &[&[("api", "x")]]).await),
        Code::OverLimit
    );
}

const SHADOW: &str = r#"
domain: shadow
descriptors:
  - key: k
    value: shadowed
    shadow_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: k
    value: enforced
    rate_limit: {unit: minute, requests_per_unit: 1}
"#;

async fn shadow_mode_counts_but_answers_ok(backend: Backend) {
    let server = TestServer::on(backend, SHADOW).await;
    for remaining in [0, 0, 0] {
        let r = should(&server, "shadow", &[&[("k", "shadowed")]]).await;
        assert_eq!((code(&r), codes(&r)), (Code::Ok, vec![Code::Ok]));
        assert_eq!(r.statuses[0].limit_remaining, remaining);
    }
    let counters = server.counters("shadow").await;
    assert_eq!(used(&counters[0].1.state), 3, "counted all the same");
    should(&server, "shadow", &[&[("k", "enforced")]]).await;
    let r = should(&server, "shadow", &[&[("k", "enforced")]]).await;
    assert_eq!(code(&r), Code::OverLimit);
}

async fn global_shadow_mode_answers_ok_with_over_limit_statuses(backend: Backend) {
    let settings = RatelimitSettings {
        shadow_mode: true,
        ..RatelimitSettings::default()
    };
    let server = TestServer::start_with(SHADOW, options(backend, settings)).await;
    should(&server, "shadow", &[&[("k", "enforced")]]).await;
    let r = should(&server, "shadow", &[&[("k", "enforced")]]).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(codes(&r), [Code::OverLimit]);
}

const UNLIMITED: &str = r#"
domain: unlimited
descriptors:
  - key: user
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: user
    value: root
    rate_limit: {unlimited: true}
"#;

async fn unlimited_answers_ok_without_counting(backend: Backend) {
    let server = TestServer::on(backend, UNLIMITED).await;
    for _ in 0..3 {
        let r = should(&server, "unlimited", &[&[("user", "root")]]).await;
        assert_eq!(code(&r), Code::Ok);
        assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
        assert!(r.statuses[0].current_limit.is_none());
    }
    assert!(
        server.counters("unlimited").await.is_empty(),
        "nothing counted"
    );
    should(&server, "unlimited", &[&[("user", "joe")]]).await;
    let r = should(&server, "unlimited", &[&[("user", "joe")]]).await;
    assert_eq!(code(&r), Code::OverLimit);
}

async fn a_descriptor_limit_overrides_the_configured_one_on_its_own_counter(backend: Backend) {
    let server = TestServer::on(backend, BASIC).await;
    let with_override = |value: &str, per_minute: u32| {
        let mut d = descriptor(&[("key2", value)]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: per_minute,
            unit: Unit::Minute as i32,
        });
        d
    };
    for remaining in (0..5).rev() {
        let r = server
            .should(request("basic", vec![with_override("o", 5)], 0))
            .await;
        assert_eq!(code(&r), Code::Ok);
        let status = &r.statuses[0];
        assert_eq!(status.current_limit.as_ref().unwrap().requests_per_unit, 5);
        assert_eq!(status.limit_remaining, remaining);
    }
    let r = server
        .should(request("basic", vec![with_override("o", 5)], 0))
        .await;
    assert_eq!(code(&r), Code::OverLimit);
    // The configured limit (3 a minute) has its own counter, untouched by the override.
    let r = should(&server, "basic", &[&[("key2", "o")]]).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 2));
    // An override applies even where the tree has no limit.
    let mut d = descriptor(&[("nowhere", "x")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 0,
        unit: Unit::Hour as i32,
    });
    let r = server.should(request("basic", vec![d], 0)).await;
    assert_eq!(code(&r), Code::OverLimit);
}

const QUOTA: &str = r#"
domain: quota
descriptors:
  - key: regular
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: quota1
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: quota2
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 2}
"#;

async fn quota_mode_refuses_only_when_every_quota_descriptor_is_over(backend: Backend) {
    let server = TestServer::on(backend, QUOTA).await;
    let both: &[&[(&str, &str)]] = &[&[("quota1", "a")], &[("quota2", "a")]];
    let r = should(&server, "quota", both).await;
    assert_eq!((code(&r), codes(&r)), (Code::Ok, vec![Code::Ok, Code::Ok]));
    // quota1 over, quota2 not: still OK, quota1's status says OVER_LIMIT.
    let r = should(&server, "quota", both).await;
    assert_eq!(
        (code(&r), codes(&r)),
        (Code::Ok, vec![Code::OverLimit, Code::Ok])
    );
    // Both over: refused.
    let r = should(&server, "quota", both).await;
    assert_eq!(code(&r), Code::OverLimit);
    // A regular descriptor over refuses whatever the quota descriptors say.
    let mixed: &[&[(&str, &str)]] = &[&[("regular", "r")], &[("quota2", "b")]];
    assert_eq!(code(&should(&server, "quota", mixed).await), Code::Ok);
    let r = should(&server, "quota", mixed).await;
    assert_eq!(
        (code(&r), codes(&r)),
        (Code::OverLimit, vec![Code::OverLimit, Code::Ok])
    );
    // A quota descriptor whose limit another replaces no longer counts as a quota one.
    let server = TestServer::on(backend, QUOTA_REPLACED).await;
    let request: &[&[(&str, &str)]] = &[&[("quota1", "q")], &[("quota2", "q")], &[("boss", "b")]];
    should(&server, "quota", request).await;
    let r = should(&server, "quota", request).await;
    assert_eq!(codes(&r), [Code::OverLimit, Code::Ok, Code::Ok]);
    assert_eq!(
        code(&r),
        Code::OverLimit,
        "every quota descriptor left is over"
    );

    // QUOTA_MODE makes every descriptor a quota one.
    let settings = RatelimitSettings {
        quota_mode: true,
        ..RatelimitSettings::default()
    };
    let server = TestServer::start_with(QUOTA, options(backend, settings)).await;
    let mixed: &[&[(&str, &str)]] = &[&[("regular", "r")], &[("quota2", "b")]];
    should(&server, "quota", mixed).await;
    let r = should(&server, "quota", mixed).await;
    assert_eq!(
        (code(&r), codes(&r)),
        (Code::Ok, vec![Code::OverLimit, Code::Ok])
    );
    let r = should(&server, "quota", mixed).await;
    assert_eq!(code(&r), Code::OverLimit, "both over");
}

const QUOTA_REPLACED: &str = r#"
domain: quota
descriptors:
  - key: quota1
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: quota2
    quota_mode: true
    rate_limit: {unit: minute, requests_per_unit: 5, name: replaced}
  - key: boss
    rate_limit: {unit: minute, requests_per_unit: 5, replaces: [{name: replaced}]}
"#;

const TWO: &str = r#"
domain: two
descriptors:
  - key: small
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: large
    rate_limit: {unit: minute, requests_per_unit: 10}
"#;

async fn every_descriptor_is_counted_even_when_another_is_over(backend: Backend) {
    let server = TestServer::on(backend, TWO).await;
    let both: &[&[(&str, &str)]] = &[&[("small", "s")], &[("large", "l")]];
    for _ in 0..3 {
        should(&server, "two", both).await;
    }
    let r = should(&server, "two", &[&[("large", "l")]]).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 6,
        "the refused requests counted too"
    );
}

async fn stop_increment_counts_nothing_for_a_refused_request(backend: Backend) {
    let settings = RatelimitSettings {
        stop_increment_when_over: true,
        ..RatelimitSettings::default()
    };
    let server = TestServer::start_with(TWO, options(backend, settings)).await;
    let both: &[&[(&str, &str)]] = &[&[("small", "s")], &[("large", "l")]];
    for _ in 0..3 {
        should(&server, "two", both).await;
    }
    let r = should(&server, "two", &[&[("large", "l")]]).await;
    assert_eq!(
        r.statuses[0].limit_remaining, 8,
        "only the admitted request counted"
    );
    let r = should(&server, "two", both).await;
    assert_eq!(
        (code(&r), codes(&r)),
        (Code::OverLimit, vec![Code::OverLimit, Code::Ok])
    );
}

const TOKENS: &str = r#"
domain: llm
descriptors:
  - key: user
    rate_limit: {unit: minute, requests_per_unit: 100}
"#;

async fn hits_addend_charges_a_token_budget(backend: Backend) {
    let server = TestServer::on(backend, TOKENS).await;
    // The request path: a pure check (hits_addend 0).
    let check = descriptor_with_hits(&[("user", "u")], 0);
    let r = server.should(request("llm", vec![check.clone()], 0)).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 100));
    // Usage charged at stream end: 70, then 50 (past the budget: charged anyway).
    let r = server
        .should(request(
            "llm",
            vec![descriptor_with_hits(&[("user", "u")], 70)],
            0,
        ))
        .await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 30));
    let r = server
        .should(request(
            "llm",
            vec![descriptor_with_hits(&[("user", "u")], 50)],
            0,
        ))
        .await;
    assert_eq!(code(&r), Code::OverLimit);
    let r = server.should(request("llm", vec![check], 0)).await;
    assert_eq!(code(&r), Code::OverLimit, "the budget is spent");
    // Request-level hits_addend counts for each descriptor without its own.
    let r = server
        .should(request("llm", vec![descriptor(&[("user", "v")])], 40))
        .await;
    assert_eq!(r.statuses[0].limit_remaining, 60);
}

const METADATA: &str = r#"
domain: meta
descriptors:
  - key: a
    metadata: {team: {name: one}, plan: free}
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: b
    metadata: {team: {id: 2}, plan: paid}
    rate_limit: {unit: minute, requests_per_unit: 5}
"#;

async fn dynamic_metadata_carries_the_passed_descriptors_metadata(backend: Backend) {
    let settings = RatelimitSettings {
        dynamic_metadata: true,
        ..RatelimitSettings::default()
    };
    let server = TestServer::start_with(METADATA, options(backend, settings)).await;
    let both: &[&[(&str, &str)]] = &[&[("a", "x")], &[("b", "y")]];
    let r = should(&server, "meta", both).await;
    let json = |r: &RateLimitResponse| {
        let fields = &r.dynamic_metadata.as_ref().unwrap().fields;
        let text = |k: &str| format!("{:?}", fields.get(k).map(|v| &v.kind));
        (text("domain"), text("descriptors"), text("metadata"))
    };
    let (domain, descriptors, metadata) = json(&r);
    assert!(domain.contains("\"meta\""), "{domain}");
    assert!(
        descriptors.contains("a=x") && descriptors.contains("b=y"),
        "{descriptors}"
    );
    // Merged, the first descriptor's values winning, mappings merged key by key.
    assert!(
        metadata.contains("\"one\"") && metadata.contains("2.0"),
        "{metadata}"
    );
    assert!(
        metadata.contains("\"free\"") && !metadata.contains("paid"),
        "{metadata}"
    );
    // `a` is over now: only `b`'s metadata.
    let r = should(&server, "meta", both).await;
    let (_, _, metadata) = json(&r);
    assert!(
        metadata.contains("paid") && !metadata.contains("\"one\""),
        "{metadata}"
    );
    // Off by default.
    let server = TestServer::on(backend, METADATA).await;
    assert!(
        should(&server, "meta", both)
            .await
            .dynamic_metadata
            .is_none()
    );
}

/// `POST /explain` on a domain of this format: only the limit the descriptor reaches in the
/// tree applies; the others say why not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_tells_which_limit_the_tree_reaches() {
    let server = TestServer::start(BASIC).await;
    let ask = serde_json::json!({"namespace": "basic", "values": {"key2": "k"}});
    let body = post_json(
        &http_client(),
        &format!("{}/explain", server.http_base),
        &ask,
    )
    .await;
    let limits = body["limits"].as_array().unwrap();
    let applying: Vec<u64> = (limits.iter())
        .filter(|l| l["applies"] == true)
        .map(|l| l["limit"]["max_value"].as_u64().unwrap())
        .collect();
    assert_eq!(applying, [3], "{body:#}");
    let other = limits.iter().find(|l| l["applies"] == false).unwrap();
    assert_eq!(other["reason"]["kind"], "no_match", "{body:#}");
}

/// Our `calendar:` extension in this format: a monthly budget in Paris's time zone, from the
/// test clock's start (2026-01-01T00:00Z, 01:00 in Paris) to Feb 1 00:00 Paris (Jan 31 23:00Z).
const CALENDAR: &str = r#"
domain: monthly
descriptors:
  - key: team
    rate_limit: {calendar: month, timezone: Europe/Paris, requests_per_unit: 3}
"#;

async fn a_calendar_month_ends_at_midnight_on_the_first_in_its_zone(backend: Backend) {
    let server = TestServer::on(backend, CALENDAR).await;
    let to_boundary_s = 31 * 86_400 - 3_600;
    for remaining in [2, 1, 0] {
        let r = should(&server, "monthly", &[&[("team", "research")]]).await;
        assert_eq!(code(&r), Code::Ok);
        let status = &r.statuses[0];
        assert_eq!(status.limit_remaining, remaining);
        assert_eq!(
            status.current_limit.as_ref().unwrap().unit,
            Unit::Month as i32
        );
        assert_eq!(
            status.duration_until_reset.as_ref().unwrap().seconds,
            to_boundary_s
        );
    }
    assert_eq!(
        code(&should(&server, "monthly", &[&[("team", "research")]]).await),
        Code::OverLimit
    );
    server.clock.advance_ms(to_boundary_s as u64 * 1000 - 1);
    assert_eq!(
        code(&should(&server, "monthly", &[&[("team", "research")]]).await),
        Code::OverLimit,
        "1 ms before the boundary"
    );
    server.clock.advance_ms(1);
    let r = should(&server, "monthly", &[&[("team", "research")]]).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 2));
    // February: 28 days to March 1 00:00 Paris.
    assert_eq!(
        r.statuses[0].duration_until_reset.as_ref().unwrap().seconds,
        28 * 86_400
    );
}

/// Our `cost:` extension in this format: the large model's tokens cost 10 each; a failing
/// expression (no `tokens` entry) charges the call's own hits.
const PRICED: &str = r#"
domain: priced
descriptors:
  - key: model
    rate_limit:
      unit: hour
      requests_per_unit: 1000
      cost: "descriptors[0].model == 'large' ? 10u * hits : hits"
  - key: metered
    rate_limit:
      unit: hour
      requests_per_unit: 1000
      cost: "uint(descriptors[0].tokens)"
"#;

async fn a_cost_weighs_the_usage_each_descriptor_charges(backend: Backend) {
    let server = TestServer::on(backend, PRICED).await;
    let charge = |entries: &'static [(&'static str, &'static str)], hits: u64| {
        request("priced", vec![descriptor_with_hits(entries, hits)], 0)
    };
    // Usage charged at stream done: 20 tokens of each model.
    let r = server.should(charge(&[("model", "large")], 20)).await;
    assert_eq!(r.statuses[0].limit_remaining, 800, "20 × 10");
    let r = server.should(charge(&[("model", "small")], 20)).await;
    assert_eq!(r.statuses[0].limit_remaining, 980, "20 × 1");
    // A check (cost 0) is not weighed and charges nothing.
    let r = server.should(charge(&[("model", "large")], 0)).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 800));
    // The expression fails (no `tokens` entry): the call's 7 are charged, never nothing.
    let r = server.should(charge(&[("metered", "x")], 7)).await;
    assert_eq!(r.statuses[0].limit_remaining, 993);
}

/// Our `algorithm: concurrency` in this format: 2 requests of one key at once.
const SLOTS: &str = r#"
domain: slots
descriptors:
  - key: key
    rate_limit: {unit: minute, requests_per_unit: 2, algorithm: concurrency}
"#;

async fn a_concurrency_limit_takes_a_slot_per_request_and_a_refund_frees_one(backend: Backend) {
    let server = TestServer::on(backend, SLOTS).await;
    let take = || request("slots", vec![descriptor_with_hits(&[("key", "k")], 1)], 0);
    let r = server.should(take()).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 1));
    let r = server.should(take()).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 0));
    assert_eq!(code(&server.should(take()).await), Code::OverLimit);
    // A usage report takes no slot; the refunds (the refused one's first) free them.
    server
        .report(request(
            "slots",
            vec![descriptor_with_hits(&[("key", "k")], 5)],
            0,
        ))
        .await;
    for _ in 0..2 {
        server
            .should(request("slots", vec![refund(&[("key", "k")], 1)], 0))
            .await;
    }
    let r = server.should(take()).await;
    assert_eq!((code(&r), r.statuses[0].limit_remaining), (Code::Ok, 0));
}
