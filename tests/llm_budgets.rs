//! LLM budgets as providers sell them (issue 13): calendar quotas and weighted token costs,
//! through real gRPC clients, on memory, Redis and Redis Cluster. The server's clock is driven
//! (tests/common: a ManualClock from 2026-01-01T00:00:00Z), so a month boundary is crossed
//! without waiting. The window arithmetic itself (DST, leap days) is unit-tested in
//! src/algorithm/calendar.rs.

mod common;

use std::time::Duration;

use common::*;
use ratekeeper::algorithm::{
    Algorithm, Calendar, FixedWindow, Group, Period, Policy, calendar::zone,
};
use ratekeeper::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use ratekeeper::proto::kuadrant::service::ratelimit::v1::CommitRequest;
use ratekeeper::storage::{Batch, CounterKey, CounterRequest, RedisStorage, Storage, counter_key};

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// 2026-02-01T00:00:00Z: the end of January (START_MS is 2026-01-01T00:00:00Z).
const FEBRUARY: u64 = START_MS + 31 * DAY_MS;

/// A monthly quota per team, charged input + 4 × output tokens at stream done; and a daily
/// budget (in Paris) priced per model.
const LIMITS: &str = r#"
- name: team-month
  namespace: month
  max_value: 100000
  calendar: month
  variables: ["descriptors[0].team"]
  cost: "uint(descriptors[0].input_tokens) + 4u * uint(descriptors[0].output_tokens)"
- name: priced
  namespace: priced
  max_value: 1000000
  calendar: day
  timezone: Europe/Paris
  variables: ["descriptors[0].team"]
  cost: >-
    descriptors[0].model == 'large' ? 10u * uint(descriptors[0].output_tokens)
    : descriptors[0].model == 'small' ? uint(descriptors[0].output_tokens)
    : hits
"#;

fn usage(team: &str, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("team", team.to_string()),
        ("input_tokens", input.to_string()),
        ("output_tokens", output.to_string()),
    ]
}

fn entries<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The status of the only descriptor: remaining, ms until reset, unit.
fn status(response: &RateLimitResponse) -> (u32, u64, Unit) {
    let status = &response.statuses[0];
    let reset = status.duration_until_reset.expect("a reset");
    let ms = reset.seconds as u64 * 1000 + reset.nanos as u64 / 1_000_000;
    let unit = status.current_limit.as_ref().expect("a limit").unit;
    (status.limit_remaining, ms, Unit::try_from(unit).unwrap())
}

async fn used_by(server: &TestServer, namespace: &str) -> u64 {
    let counters = server.counters(namespace).await;
    counters.iter().map(|(_, c)| used(&c.state)).sum()
}

/// A month's quota is charged the weighted cost, says MONTH and the exact time to the 1st, and
/// starts again at midnight on the 1st, not a millisecond earlier.
async fn a_monthly_quota_resets_on_the_first(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    // 2026-01-31T23:00:00Z: an hour of January left.
    server.clock.set_ms(FEBRUARY - HOUR_MS);
    let charge = usage("research", "1000", "500");
    // Envoy's stream-done charge: hits_addend 7 is what the descriptor carries; the limit's
    // cost says 1000 + 4 × 500.
    let response = server
        .should(request(
            "month",
            vec![descriptor_with_hits(&entries(&charge), 7)],
            0,
        ))
        .await;
    assert_eq!(code(&response), Code::Ok);
    assert_eq!(status(&response), (97_000, HOUR_MS, Unit::Month));

    // A read-only check 1 ms before the boundary: still January's usage.
    server.clock.set_ms(FEBRUARY - 1);
    let check = vec![descriptor(&[("team", "research")])];
    let response = server.check(request("month", check.clone(), 1)).await;
    assert_eq!(status(&response), (97_000, 1, Unit::Month));
    assert_eq!(used_by(&server, "month").await, 3_000);

    // At midnight on the 1st: a new month, which lasts 28 days (February 2026).
    server.clock.set_ms(FEBRUARY);
    let response = server.check(request("month", check.clone(), 1)).await;
    assert_eq!(status(&response), (100_000, 28 * DAY_MS, Unit::Month));
    let response = server
        .report(request(
            "month",
            vec![descriptor(&entries(&usage("research", "10", "1")))],
            1,
        ))
        .await;
    assert_eq!(code(&response), Code::Ok);
    assert_eq!(used_by(&server, "month").await, 14, "only February's usage");
    server.shutdown().await;
}

/// Per-model prices with `?:`, on every path that charges usage (Report, Envoy's charge,
/// Commit's actual); refunds and checks use the amount they carry.
async fn each_model_has_its_price(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    let priced = |model: &str, output: &str| {
        descriptor(&[("team", "t"), ("model", model), ("output_tokens", output)])
    };
    let with_hits = |model: &str, output: &str, hits: u64| {
        descriptor_with_hits(
            &[("team", "t"), ("model", model), ("output_tokens", output)],
            hits,
        )
    };
    // Report: 10 × 20 for the large model.
    server
        .report(request("priced", vec![priced("large", "20")], 1))
        .await;
    assert_eq!(used_by(&server, "priced").await, 200);
    // Envoy's charge: 1 × 20 for the small one; an unknown model costs what the call carries.
    server
        .should(request("priced", vec![with_hits("small", "20", 3)], 0))
        .await;
    server
        .should(request("priced", vec![with_hits("other", "20", 9)], 0))
        .await;
    assert_eq!(used_by(&server, "priced").await, 229);
    // Commit's actual amount, with no live reservation (a report): 10 × 5.
    let commit = CommitRequest {
        domain: "priced".into(),
        descriptors: vec![priced("large", "5")],
        reservation_id: String::new(),
        actual_amount: 1,
    };
    server.kuadrant.clone().commit(commit).await.unwrap();
    assert_eq!(used_by(&server, "priced").await, 279);
    // A refund gives back exactly what it carries, not a price.
    let refund = refund(
        &[("team", "t"), ("model", "large"), ("output_tokens", "20")],
        79,
    );
    server.should(request("priced", vec![refund], 0)).await;
    assert_eq!(used_by(&server, "priced").await, 200);
    // The day is Paris's: 2026-01-01 ends at 23:00 UTC.
    let response = server
        .check(request("priced", vec![priced("large", "1")], 1))
        .await;
    assert_eq!(
        status(&response),
        (1_000_000 - 200, 23 * HOUR_MS, Unit::Day)
    );
    // Limitador's HTTP /report: 10 × 3.
    let body = serde_json::json!({
        "namespace": "priced",
        "values": {"team": "t", "model": "large", "output_tokens": "3"},
        "delta": 1,
    });
    let response = http_client()
        .post(format!("{}/report", server.http_base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    assert_eq!(used_by(&server, "priced").await, 230);
    assert_eq!(
        server
            .observed
            .cost_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    server.shutdown().await;
}

/// A cost expression that fails at run time (a missing entry, not a number, negative) charges
/// the call's own hits — a charge is never lost — and is counted.
async fn a_failing_cost_charges_the_hits(backend: Backend) {
    let server = TestServer::on(backend, LIMITS).await;
    let bad = [
        vec![
            ("team", "t".to_string()),
            ("input_tokens", "10".to_string()),
        ],
        usage("t", "10", "many"),
        usage("t", "-5", "1"),
    ];
    for (i, entries_) in bad.iter().enumerate() {
        let response = server
            .should(request(
                "month",
                vec![descriptor_with_hits(&entries(entries_), 6)],
                0,
            ))
            .await;
        assert_eq!(code(&response), Code::Ok);
        assert_eq!(used_by(&server, "month").await, 6 * (i as u64 + 1));
    }
    let errors = server
        .observed
        .cost_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errors, 3);
    // And the metric the operator sees.
    let metrics = get_text(&format!("{}/metrics", server.http_base)).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ratekeeper_cost_errors{") && l.contains("namespace=\"month\"")),
        "{metrics}"
    );
    server.shutdown().await;
}

on_every_storage!(
    a_monthly_quota_resets_on_the_first,
    each_model_has_its_price,
    a_failing_cost_charges_the_hits,
);

/// A calendar window's Redis key expires at the boundary: its TTL is the time left in the
/// period (here, from a charge one minute before the end of a UTC month).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calendar_keys_ttl_ends_at_the_boundary() {
    let url = common::redis::shared_url();
    let prefix = format!("budgets{}", std::process::id());
    let storage = RedisStorage::open(&url, &prefix, Duration::from_secs(2)).unwrap();
    let month = Calendar::new(Period::Month, zone("UTC").unwrap());
    let key = CounterKey::new(1, ["team"]);
    let batch = Batch {
        namespace: "ttl",
        hold: None,
        counters: vec![CounterRequest {
            key: key.clone(),
            algorithm: Algorithm::FixedWindow(FixedWindow::calendar(100, month)),
        }],
        groups: vec![Group {
            policy: Policy::Charge,
            cost: 5,
            counters: vec![0],
            costs: Vec::new(),
        }],
    };
    let outcome = storage.apply(&batch, FEBRUARY - 60_000).await.unwrap();
    assert_eq!(outcome[0].counters[0].reset_in_ms, 60_000);
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(counter_key(&prefix, "ttl", &key))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!((55_000..=60_000).contains(&ttl), "PTTL {ttl}");
}
