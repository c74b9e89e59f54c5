//! End to end with a real Envoy 1.40: token costs weighed per model. examples/envoy/llm-costs.yaml
//! checks the team's budgets on the request path and, when the stream is done, sends the
//! response's `usage.prompt_tokens` / `usage.completion_tokens` and the request's `model` as
//! descriptor entries; limits/llm-provider-budgets.yaml prices them with `cost:` expressions
//! (a monthly quota per team, a daily budget per team and model). The mock LLM answers
//! `x-mock-total-tokens` tokens, 5 of them prompt tokens.

mod common;

use std::time::{Duration, Instant};

use common::get_json;
use common::stack::{Chat, Scenario, Stack};

const COSTS: Scenario = Scenario {
    envoy_config: "examples/envoy/llm-costs.yaml",
    limits: "limits/llm-provider-budgets.yaml",
    namespace: "llm_budgets",
    options: &[],
};

const MONTH: u64 = 2_000_000;
const DAY: u64 = 500_000;

fn chat(team: &str, model: &str, tokens: u64) -> Chat {
    Chat::new(vec![("x-team", team.to_string())], tokens).model(model)
}

/// Remaining of every live counter of `team`: (limit name, model or "", remaining), sorted.
async fn budgets(stack: &Stack, team: &str) -> Vec<(String, String, u64)> {
    let url = format!("http://{}/counters/llm_budgets", stack.ratekeeper.http);
    let counters = get_json(&stack.client, &url).await;
    let mut found: Vec<_> = counters
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["set_variables"]["descriptors[0].team"] == team)
        .map(|c| {
            (
                c["limit"]["name"].as_str().unwrap().to_string(),
                c["set_variables"]["descriptors[0].model"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                c["remaining"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    found
}

/// Waits (bounded) until `team`'s counters are `expected`: Envoy's charge at stream done is
/// sent after the response.
async fn settled(stack: &Stack, team: &str, expected: &[(&str, &str, u64)]) {
    let expected: Vec<(String, String, u64)> = expected
        .iter()
        .map(|(l, m, r)| (l.to_string(), m.to_string(), *r))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = budgets(stack, team).await;
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{team}'s budgets are {now:?}, not {expected:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_charged_at_each_models_price() {
    let stack = Stack::start(&COSTS).await;
    // 100 tokens of the large model: 5 in, 95 out. The month: 5 + 4 × 95 = 385; the large
    // model's day: 2 × 5 + 10 × 95 = 960.
    stack.expect(chat("research", "large", 100), 200).await;
    settled(
        &stack,
        "research",
        &[
            ("team-model-day", "large", DAY - 960),
            ("team-month", "", MONTH - 385),
        ],
    )
    .await;
    // The small model: the month is weighed the same (385), its day counts output only (95).
    stack.expect(chat("research", "small", 100), 200).await;
    // Any other model: its day is charged what Envoy carries, total_tokens (100).
    stack.expect(chat("research", "mock", 100), 200).await;
    settled(
        &stack,
        "research",
        &[
            ("team-model-day", "large", DAY - 960),
            ("team-model-day", "mock", DAY - 100),
            ("team-model-day", "small", DAY - 95),
            ("team-month", "", MONTH - 3 * 385),
        ],
    )
    .await;
    // Another team's budgets are its own.
    stack.expect(chat("ops", "small", 20), 200).await;
    settled(
        &stack,
        "ops",
        &[
            ("team-model-day", "small", DAY - 15),
            ("team-month", "", MONTH - (5 + 4 * 15)),
        ],
    )
    .await;
    // A response without `usage`: Envoy sends no usage descriptor, nothing is charged (the
    // next request's charge lands after where that one's would have).
    stack
        .expect(chat("quiet", "small", 40).without_usage(), 200)
        .await;
    stack.expect(chat("quiet", "small", 20), 200).await;
    settled(
        &stack,
        "quiet",
        &[
            ("team-model-day", "small", DAY - 15),
            ("team-month", "", MONTH - (5 + 4 * 15)),
        ],
    )
    .await;
    assert!(
        !stack.ratekeeper.log().contains("cost expression failed"),
        "{}",
        stack.logs()
    );
}

/// The request path checks what is left (a pure check: hits_addend 0 charges nothing); usage
/// that went past the budget is charged in full, and the next request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_refuses_the_next_request() {
    let stack = Stack::start(&COSTS).await;
    // 60,000 tokens of the large model: 10 + 10 × 59,995 = 599,960 > 500,000 for the day.
    stack.expect(chat("lab", "large", 60_000), 200).await;
    let month_left = MONTH - (5 + 4 * 59_995);
    let spent = [
        ("team-model-day", "large", 0),
        ("team-month", "", month_left),
    ];
    settled(&stack, "lab", &spent).await;
    let served = stack.mock.requests().await;
    let refused = stack.expect(chat("lab", "large", 10), 429).await;
    assert_eq!(stack.mock.requests().await, served, "{refused:#?}");
    // Another model's day is untouched, and the checks charged nothing.
    stack.expect(chat("lab", "small", 10), 200).await;
    let month_left = month_left - (5 + 4 * 5);
    settled(
        &stack,
        "lab",
        &[
            ("team-model-day", "large", 0),
            ("team-model-day", "small", DAY - 5),
            ("team-month", "", month_left),
        ],
    )
    .await;
}
