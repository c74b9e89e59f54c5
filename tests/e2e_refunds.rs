//! End to end with a real Envoy 1.40: a token budget that holds while generations are in
//! flight. examples/envoy/refunds.yaml charges each request's estimate (its `max_tokens`, or
//! 256 without one) on the way in and, when the stream is done, charges `usage.total_tokens` and
//! refunds the estimate (`is_negative_hits`); limits/llm-refunds.yaml gives each user 1,000
//! tokens per minute. Every process runs on loopback ports chosen at run time; every wait is
//! bounded (tests/common/stack.rs).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::stack::{Chat, Scenario, Stack};

const REFUNDS: Scenario = Scenario {
    envoy_config: "examples/envoy/refunds.yaml",
    limits: "limits/llm-refunds.yaml",
    namespace: "llm_refunds",
    options: &[],
};

fn chat(user: &str, estimate: u64, used: u64) -> Chat {
    Chat::new(vec![("x-user", user.to_string())], used).max_tokens(estimate)
}

/// Waits (bounded) until `user`'s budget shows `remaining`.
async fn settled(stack: &Stack, user: &str, remaining: u64) {
    stack
        .wait_for_remaining(user, "llm-budget", remaining)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_budget_holds_while_32_generations_are_in_flight() {
    let stack = Arc::new(Stack::start(&REFUNDS).await);
    // 32 requests at once, each estimating 100 tokens and using 40 after 2 s (longer than the
    // burst takes to arrive, however busy the machine). Without the
    // estimate every one of them would pass (nothing is charged until a response ends).
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let stack = stack.clone();
        burst.spawn(async move {
            stack
                .send(chat("alice", 100, 40).taking_ms(2_000))
                .await
                .status
        });
    }
    let statuses = burst.join_all().await;
    let served = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(
        (served, refused),
        (10, 22),
        "1,000 tokens hold exactly ten estimates of 100\n{}",
        stack.logs()
    );
    // Settled: the ten used 40 each, the estimates (refused ones too) came back.
    settled(&stack, "alice", 600).await;

    // No phantom usage: the 600 left are all usable, and not one token more.
    for round in 1..=6 {
        let reply = stack.send(chat("alice", 100, 100)).await;
        assert_eq!(
            reply.status,
            200,
            "round {round}: {reply:#?}\n{}",
            stack.logs()
        );
        settled(&stack, "alice", 600 - round * 100).await;
    }
    stack.expect(chat("alice", 100, 100), 429).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_max_tokens_is_estimated_at_256_until_it_ends() {
    let stack = Stack::start(&REFUNDS).await;
    let bob = Chat::new(vec![("x-user", "bob".to_string())], 20).taking_ms(1_500);
    let in_flight = stack.send(bob);
    let watch = async {
        // While the generation runs, the default estimate is held.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            if stack.counter("bob").await == Some(("llm-budget".to_string(), 744)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (reply, held) = tokio::join!(in_flight, watch);
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", stack.logs());
    assert!(
        held,
        "the estimate of 256 was not charged\n{}",
        stack.logs()
    );
    // Settled: 20 used, the 256 refunded.
    settled(&stack, "bob", 980).await;
}

/// The same stack, with ratekeeper answering refusals as OpenAI does.
const REFUNDS_OPENAI: Scenario = Scenario {
    options: &["--over-limit-response", "openai"],
    ..REFUNDS
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sends_the_openai_refusal_as_the_429() {
    let stack = Stack::start(&REFUNDS_OPENAI).await;
    // 900 of carol's 1,000 tokens are held by a generation in flight; 200 more do not fit.
    let in_flight = stack.send(chat("carol", 900, 900).taking_ms(1_500));
    let refused = async {
        // Let the first request's estimate land first.
        let deadline = Instant::now() + Duration::from_secs(1);
        while stack.counter("carol").await.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stack.send(chat("carol", 200, 200)).await
    };
    let (served, refused) = tokio::join!(in_flight, refused);
    assert_eq!(served.status, 200, "{served:#?}\n{}", stack.logs());
    assert_eq!(refused.status, 429, "{refused:#?}\n{}", stack.logs());
    let error = &refused.json()["error"];
    assert_eq!(error["code"], "rate_limit_exceeded", "{refused:#?}");
    assert!(
        error["message"].as_str().unwrap().contains("llm-budget"),
        "{refused:#?}"
    );
    assert_eq!(refused.header("content-type"), Some("application/json"));
    let retry_ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
    assert!(retry_ms > 0 && retry_ms <= 60_000, "{refused:#?}");
    assert!(refused.header("retry-after").is_some(), "{refused:#?}");
}
