//! End to end with a real Envoy 1.40: at most 4 generations at once per API key.
//! examples/envoy/inflight.yaml takes a slot on the request path (`hits_addend` 1 on the
//! `generic_key: inflight` descriptor) and gives one back when the stream is done
//! (`is_negative_hits`, sent for 429s too); limits/llm-provider-budgets.yaml's `key-inflight`
//! is `algorithm: concurrency` with 4 slots. Bounded waits, loopback ports chosen at run time.

mod common;

use std::sync::Arc;

use common::stack::{Chat, Scenario, Stack};

const INFLIGHT: Scenario = Scenario {
    envoy_config: "examples/envoy/inflight.yaml",
    limits: "limits/llm-provider-budgets.yaml",
    namespace: "llm_budgets",
    options: &[],
};

fn generation(key: &str, ms: u64) -> Chat {
    Chat::new(vec![("x-api-key", key.to_string())], 10).taking_ms(ms)
}

/// `count` generations of `key` at once, each taking `ms`: how many were served and refused.
async fn burst(stack: &Arc<Stack>, key: &'static str, count: usize, ms: u64) -> (usize, usize) {
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..count {
        let stack = stack.clone();
        calls.spawn(async move { stack.send(generation(key, ms)).await.status });
    }
    let statuses = calls.join_all().await;
    let served = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(served + refused, count, "{statuses:?}\n{}", stack.logs());
    (served, refused)
}

/// The slots `key` holds now, from /counters (a counter without slots is not listed).
async fn slots_taken(stack: &Stack, key: &str) -> u64 {
    let url = format!("http://{}/counters/llm_budgets", stack.ratekeeper.http);
    let counters = common::get_json(&stack.client, &url).await;
    (counters.as_array().into_iter().flatten())
        .filter(|c| c["set_variables"]["descriptors[0].key"] == key)
        .map(|c| c["held"].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_generations_run_at_once_per_key_and_their_slots_come_back() {
    let stack = Arc::new(Stack::start(&INFLIGHT).await);
    // 10 at once, each running 2 s (longer than the burst takes to arrive): 4 run, 6 are
    // refused; another key is not affected.
    let (other, busy) = tokio::join!(
        burst(&stack, "team-b", 2, 2_000),
        burst(&stack, "team-a", 10, 2_000)
    );
    assert_eq!(busy, (4, 6), "{}", stack.logs());
    assert_eq!(other, (2, 0), "another key has its own slots");
    // Every slot came back when its stream ended (refused requests' too): 4 run again.
    let mut freed = false;
    for _ in 0..50 {
        if slots_taken(&stack, "team-a").await == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(freed, "slots were not given back\n{}", stack.logs());
    assert_eq!(burst(&stack, "team-a", 6, 1_000).await, (4, 2));
}
