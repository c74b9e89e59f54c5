//! Redis storage with real processes: several ratekeeper replicas on one Redis share one budget;
//! Redis going away, coming back, or not being up yet; counters outliving a ratekeeper restart;
//! every key carrying a TTL; the `--on-storage-error` modes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::process::*;
use common::redis::{RedisProcess, cli};
use common::{code, descriptor, get_text, grpc_channel, request};
use ratekeeper::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const LIMITS: &str = "limits/llm-tiers.yaml";

/// A ratekeeper process on `redis_url`, with extra arguments before the storage subcommand.
async fn ratekeeper(redis_url: &str, extra: &[&str]) -> Server {
    ratekeeper_with(redis_url, extra, &[]).await
}

/// ... and options of the `redis` subcommand.
async fn ratekeeper_with(redis_url: &str, extra: &[&str], redis_options: &[&str]) -> Server {
    let args: Vec<&str> = extra
        .iter()
        .copied()
        .chain([LIMITS, "redis", redis_url])
        .chain(redis_options.iter().copied())
        .collect();
    Server::start_on_loopback(&args).await
}

async fn ready(server: &Server) -> u16 {
    reqwest::get(format!("http://{}/readyz", server.http))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// gRPC health of the rate limit service.
async fn health(server: &Server) -> ServingStatus {
    let channel = grpc_channel(server.rls).await.unwrap();
    let request = HealthCheckRequest {
        service: "envoy.service.ratelimit.v3.RateLimitService".to_string(),
    };
    HealthClient::new(channel)
        .check(request)
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Polls until `check` is true, at most `limit`.
async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_redis_admit_exactly_the_budget() {
    let redis = RedisProcess::start();
    // A generous timeout: this test is about sharing one budget, and 24 callers and three
    // servers on a busy machine can keep a call longer than half the default 100 ms (the
    // deadline after which Redis refuses to run it).
    let slow_ok = ["--storage-timeout", "2000"];
    let replicas = [
        ratekeeper(&redis.url(), &slow_ok).await,
        ratekeeper(&redis.url(), &slow_ok).await,
        ratekeeper(&redis.url(), &slow_ok).await,
    ];
    // llm-free: 50 tokens a minute per user. 3 replicas x 8 tasks x 10 calls of 1 token.
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for server in &replicas {
        for _ in 0..8 {
            let mut client = server.grpc().await;
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    let r = client
                        .should_rate_limit(llm_tokens("shared", 1))
                        .await
                        .unwrap();
                    if code(&r.into_inner()) == Code::Ok {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_outlive_a_ratekeeper_restart() {
    let redis = RedisProcess::start();
    let mut first = ratekeeper(&redis.url(), &[]).await;
    let r = first.should(llm_tokens("erin", 30)).await;
    assert_eq!(r.statuses[0].limit_remaining, 20);
    assert_eq!(first.terminate().await.code(), Some(0));

    let second = ratekeeper(&redis.url(), &[]).await;
    let r = second.should(llm_tokens("erin", 20)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(
        r.statuses[0].limit_remaining, 0,
        "30 were charged by the first process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_and_coming_back_while_traffic_flows() {
    let mut redis = RedisProcess::start();
    let server = ratekeeper(&redis.url(), &["--storage-timeout", "200"]).await;
    let mut client = server.grpc().await;
    assert_eq!(
        code(
            &client
                .should_rate_limit(llm_tokens("fay", 1))
                .await
                .unwrap()
                .into_inner()
        ),
        Code::Ok
    );

    redis.kill();
    // Every call still answers, quickly, with UNAVAILABLE (Envoy's failure_mode_deny decides).
    for _ in 0..5 {
        let started = Instant::now();
        let error = client
            .should_rate_limit(llm_tokens("fay", 1))
            .await
            .expect_err("no storage, no decision");
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "answered in {:?}",
            started.elapsed()
        );
    }
    assert!(eventually(Duration::from_secs(5), async || ready(&server).await == 503).await);
    assert_eq!(health(&server).await, ServingStatus::NotServing);

    // Redis returns (empty: it saved nothing); ratekeeper reconnects by itself.
    redis.restart();
    let mut back = false;
    for _ in 0..100 {
        if let Ok(r) = client.should_rate_limit(llm_tokens("fay", 1)).await {
            assert_eq!(code(&r.into_inner()), Code::Ok);
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "ratekeeper did not reconnect; log:\n{}", server.log());
    assert!(eventually(Duration::from_secs(5), async || ready(&server).await == 200).await);
    assert_eq!(health(&server).await, ServingStatus::Serving);
    // The log says both: Redis going away, and coming back.
    let log = server
        .log_when(|log| log.contains("ready again: health is SERVING"))
        .await;
    let away = log.find("not ready: health is NOT_SERVING");
    let back = log.find("ready again: health is SERVING");
    assert!(away.is_some() && away < back, "{log}");
    let status = reqwest::get(format!("http://{}/status", server.http))
        .await
        .unwrap();
    assert!(status.status().is_success(), "the process survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_redis_and_serves_once_it_is_up() {
    let port = common::redis::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let server = ratekeeper(&url, &["--storage-timeout", "200"]).await;
    assert!(eventually(Duration::from_secs(5), async || ready(&server).await == 503).await);
    let error = server
        .try_should(llm_tokens("gus", 1))
        .await
        .expect_err("Redis is not up yet");
    assert_eq!(error.code(), tonic::Code::Unavailable);

    let _redis = RedisProcess::start_on_port(port);
    assert!(
        eventually(Duration::from_secs(10), async || ready(&server).await
            == 200)
        .await,
        "never ready; log:\n{}",
        server.log()
    );
    let r = server.should(llm_tokens("gus", 1)).await;
    assert_eq!(code(&r), Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_storage_error_allow_and_deny() {
    let url = format!("redis://127.0.0.1:{}", common::redis::free_port());
    let allow = ratekeeper(
        &url,
        &["--storage-timeout", "100", "--on-storage-error", "allow"],
    )
    .await;
    let deny = ratekeeper(
        &url,
        &["--storage-timeout", "100", "--on-storage-error", "deny"],
    )
    .await;
    assert_eq!(code(&allow.should(llm_tokens("hal", 1)).await), Code::Ok);
    assert_eq!(
        code(&deny.should(llm_tokens("hal", 1)).await),
        Code::OverLimit
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_has_a_ttl_and_the_documented_layout() {
    let redis = RedisProcess::start();
    let server = ratekeeper_with(&redis.url(), &[], &["--key-prefix", "rkttl"]).await;
    for user in ["ivy", "jo", "kim"] {
        server.should(llm_tokens(user, 5)).await;
    }
    let keys = cli(redis.port, &["--scan"]).unwrap();
    let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
    // The three counters, and the readiness check's key (it writes, so a read-only replica is
    // not taken for ready).
    let counters: Vec<&&str> = keys.iter().filter(|k| **k != "rkttl:ping").collect();
    assert_eq!(counters.len(), 3, "{keys:?}");
    for key in keys {
        let layout = key == "rkttl:ping" || key.starts_with("rkttl:{llm_tokens}:");
        assert!(layout, "{key}");
        let ttl: i64 = cli(redis.port, &["PTTL", key])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{key} has PTTL {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_at_most_the_storage_timeout() {
    let redis = RedisProcess::start();
    let server = ratekeeper(&redis.url(), &["--storage-timeout", "150"]).await;
    let mut client = server.grpc().await;
    assert_eq!(
        code(
            &client
                .should_rate_limit(llm_tokens("lou", 1))
                .await
                .unwrap()
                .into_inner()
        ),
        Code::Ok
    );
    // Redis stops answering every client for 3 s.
    cli(redis.port, &["CLIENT", "PAUSE", "3000", "ALL"]).unwrap();
    let started = Instant::now();
    let error = client
        .should_rate_limit(llm_tokens("lou", 1))
        .await
        .expect_err("Redis is paused");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered after {:?}",
        started.elapsed()
    );
}

/// A call answered as failed never takes effect later: Reports sent while Redis is frozen are
/// answered UNAVAILABLE; when Redis runs again it works through the queued scripts, which see
/// they are past their deadline and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_answered_unavailable_while_redis_is_paused_never_charge_later() {
    use ratekeeper::proto::kuadrant::service::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
    let redis = RedisProcess::start();
    // (1 s: a busy machine never makes the calls before the pause miss their deadline.)
    let server = ratekeeper(&redis.url(), &["--storage-timeout", "1000"]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.rls))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let kuadrant = RateLimitServiceClient::new(channel);
    // The shipped free tier: 50 tokens a minute per user.
    let usage = |hits| {
        request(
            "llm/llm-route",
            vec![descriptor(&[
                ("tokenlimit.free__065bb34d", "1"),
                ("auth.identity.userid", "mia"),
            ])],
            hits,
        )
    };
    kuadrant.clone().report(usage(1)).await.unwrap();

    redis.pause();
    let reports: Vec<_> = (0..20)
        .map(|_| {
            let mut kuadrant = kuadrant.clone();
            let report = usage(2);
            tokio::spawn(async move { kuadrant.report(report).await })
        })
        .collect();
    for report in reports {
        let error = report.await.unwrap().expect_err("Redis is paused");
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error}");
    }
    redis.resume();

    // Redis has now run (or refused) the 20 queued scripts, before this one.
    let mut remaining = None;
    for _ in 0..50 {
        if let Ok(r) = kuadrant.clone().check_rate_limit(usage(1)).await {
            remaining = Some(r.into_inner().statuses[0].limit_remaining);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        remaining,
        Some(49),
        "only the first report was charged (20 failed reports of 2 would leave 9); log:\n{}",
        server.log()
    );
}

/// `INFO stats`' `total_connections_received` of the Redis on `port`.
fn connections_received(port: u16) -> u64 {
    let info = cli(port, &["INFO", "stats"]).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_became_a_read_only_replica_is_not_ready_until_promoted_again() {
    let redis = RedisProcess::start();
    let primary = RedisProcess::start();
    let server = ratekeeper(&redis.url(), &[]).await;
    assert_eq!(code(&server.should(llm_tokens("ivy", 1)).await), Code::Ok);
    assert_eq!(ready(&server).await, 200);

    // A failover turned the node behind ratekeeper's address into a replica.
    let port = primary.port.to_string();
    cli(redis.port, &["REPLICAOF", "127.0.0.1", &port]).unwrap();
    let connections = connections_received(redis.port);
    let limit = Duration::from_secs(10);
    assert!(
        eventually(limit, async || ready(&server).await == 503).await,
        "a read-only replica looked ready; log:\n{}",
        server.log()
    );
    assert_eq!(health(&server).await, ServingStatus::NotServing);
    let refused = server.try_should(llm_tokens("ivy", 1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(
        connections_received(redis.port) > connections,
        "READONLY did not make ratekeeper connect anew"
    );

    // Promoted again: ready, and charges count.
    cli(redis.port, &["REPLICAOF", "NO", "ONE"]).unwrap();
    assert!(
        eventually(limit, async || ready(&server).await == 200).await,
        "not ready after the promotion; log:\n{}",
        server.log()
    );
    let r = server.should(llm_tokens("ivy", 1)).await;
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(health(&server).await, ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_reported_and_refused_when_asked() {
    let redis = RedisProcess::start();
    cli(redis.port, &["CONFIG", "SET", "maxmemory", "100mb"]).unwrap();
    cli(
        redis.port,
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
    )
    .unwrap();

    // By default: served, said loudly, in /status and in a metric.
    let server = ratekeeper(&redis.url(), &[]).await;
    let limit = Duration::from_secs(10);
    let evicts = async || server.status().await["storage_evicts"].clone();
    assert!(
        eventually(limit, async || evicts().await.is_string()).await,
        "/status does not say the storage evicts; log:\n{}",
        server.log()
    );
    let reason = evicts().await;
    assert!(reason.as_str().unwrap().contains("allkeys-lru"), "{reason}");
    assert!(server.log().contains("EVICT"), "{}", server.log());
    let metrics = get_text(&format!("http://{}/metrics", server.http)).await;
    assert!(
        metrics.contains("ratekeeper_storage_may_evict 1"),
        "{metrics}"
    );
    assert_eq!(ready(&server).await, 200);

    // With --refuse-evicting-storage: not ready, and /readyz says why.
    let strict = ratekeeper(&redis.url(), &["--refuse-evicting-storage"]).await;
    assert!(
        eventually(limit, async || ready(&strict).await == 503).await,
        "an evicting Redis looked ready; log:\n{}",
        strict.log()
    );
    let body = get_text(&format!("http://{}/readyz", strict.http)).await;
    assert!(body.contains("evict"), "{body}");
    assert_eq!(health(&strict).await, ServingStatus::NotServing);
}
